"""Checkpoints under WORKDIR/checkpoints/<step>/: the train state and the data-iterator state.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed while saving leaves the previous checkpoint as the latest one. Saving is
asynchronous (training goes on while the arrays are written); `close()` waits.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from emonet_jax import tree


class Checkpoints:
    def __init__(self, workdir, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """(state laid out like `abstract_state` (shapes, dtypes, shardings), data-iterator state)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _latest_state_dir(path: pathlib.Path) -> pathlib.Path:
    """A workdir, its checkpoints/ dir, or one step's dir -> that step's 'state' item."""
    for candidate in (path / "state", path / "checkpoints", path):
        if candidate.name == "state" and candidate.is_dir():
            return candidate
        if candidate.is_dir():
            steps = sorted((int(p.name), p) for p in candidate.iterdir() if p.name.isdigit())
            if steps:
                return steps[-1][1] / "state"
    raise FileNotFoundError(f"no checkpoint under {path} (expected WORKDIR, WORKDIR/checkpoints or a step directory)")


def load_params(path, target: Any, skip: tuple[str, ...] = ()) -> tuple[Any, list[str]]:
    """Parameters of another run's latest checkpoint, for initialising this one.

    Every parameter of `target` (an initialised tree) must be in the checkpoint with the
    same shape, except those matched by a `skip` regex (e.g. new task heads), which keep
    their fresh values. Returns (params, loaded paths). Mismatches are listed in one error.
    """
    state_dir = _latest_state_dir(pathlib.Path(path).expanduser())
    restored = ocp.StandardCheckpointer().restore(state_dir.absolute())
    if "params" not in restored:
        raise ValueError(f"{state_dir} holds no 'params' (keys: {sorted(restored)})")
    source = tree.flatten(restored["params"])
    skip_patterns = tree.compile_patterns(skip, "init_skip")
    wanted = tree.flatten(target)
    missing = [p for p in wanted if p not in source and not tree.matches_any(p, skip_patterns)]
    shape = [f"{p}: checkpoint {np.shape(source[p])} vs model {np.shape(v)}" for p, v in wanted.items()
             if p in source and not tree.matches_any(p, skip_patterns) and np.shape(source[p]) != np.shape(v)]
    if missing or shape:
        raise ValueError(f"cannot initialise from {state_dir}:\n  missing: {missing}\n  wrong shape: {shape}\n"
                         "(add regexes to init_skip for parameters that should keep their fresh init)")
    loaded = {p: (v if tree.matches_any(p, skip_patterns) else np.asarray(source[p], dtype=np.asarray(v).dtype))
              for p, v in wanted.items()}
    return jax.tree.map(lambda _, x: x, target, tree.unflatten(loaded)), \
        sorted(p for p in wanted if not tree.matches_any(p, skip_patterns))
