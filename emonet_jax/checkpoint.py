"""Checkpoints under WORKDIR/checkpoints/<step>/: the train state and the data-iterator state.

    ckpt = Checkpoints(workdir)                      # fails at once if workdir is not writable
    restored = ckpt.restore_latest(abstract_state)   # None, or (step, state, data_state)
    ckpt.save(step, state, data_state)               # asynchronous; ckpt.close() waits

What can go wrong on disk, and what happens (each case is a test in tests/faults_test.py):

- Killed while saving: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it
  when complete, so the previous step stays the latest; the unfinished directory is never
  restored, and is replaced when that step is saved again.
- A write fails (a full disk): saving is asynchronous, so the failure surfaces at the next
  `save`, `wait` or `close` as `CheckpointWriteError`, naming the step, the directory and the
  cause. The steps already on disk stay as they were: orbax deletes old steps only after a
  new one is complete.
- The newest step cannot be read (a truncated or garbage file, a missing item):
  `restore_latest` logs which step it skips and why, restores the newest readable step, and
  moves the skipped ones to WORKDIR/unreadable_checkpoints/ (kept for inspection, and out of
  the way of the steps the resumed run saves again). If no step is readable it raises
  `NoReadableCheckpoint` naming the workdir and each step's error, and moves nothing.
- The checkpoint holds another model or optimizer (a different `model.variant`):
  `CheckpointMismatch` lists the names and shapes that differ, before any array is read.
- The workdir holds a run with another config: `record_config` keeps the old config.json as
  config.previous.json and warns, listing the keys that changed. Changes that the state
  cannot follow fail elsewhere (the model's shapes here, the data mixture in the input
  pipeline's state); others (a longer schedule, another learning rate) are allowed.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from emonet_jax import tree

UNREADABLE_DIR = "unreadable_checkpoints"
_LISTED = 8  # names listed per kind of difference in a CheckpointMismatch


class WorkdirNotWritable(OSError):
    """The workdir cannot be created or written; the message names it."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the message names the step, the directory and the cause."""


class CheckpointMismatch(ValueError):
    """The checkpoint's state has other names or shapes than the one this run builds."""


class NoReadableCheckpoint(RuntimeError):
    """Checkpoints exist but none can be read; the message names the workdir and each error."""


class Restored(NamedTuple):
    step: int
    state: Any
    data_state: Any


def check_writable(directory: pathlib.Path) -> None:
    """Creates `directory` if needed and writes a file there, or fails naming it.

    Called before anything is compiled or trained, so a typo in --workdir or a read-only
    mount costs seconds, not the first checkpoint interval.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            pass
    except OSError as e:
        raise WorkdirNotWritable(e.errno, f"cannot write to the workdir {directory}: {e.strerror or e}") from e


class Checkpoints:
    """The `keep` newest checkpoints of WORKDIR (see the module docstring)."""

    def __init__(self, workdir, keep: int = 3, async_save: bool = True):
        self.workdir = pathlib.Path(workdir).absolute()
        check_writable(self.workdir)
        self.directory = self.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._in_flight: int | None = None  # the step being written in the background

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # --- saving -------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: Any, force: bool = False) -> bool:
        """Starts writing `step` (False if it is already saved, e.g. a periodic checkpoint that a
        preemption at the same step asks for again: orbax would raise StepAlreadyExistsError)."""
        if step in self._manager.all_steps():
            return False
        self.wait()  # a failed background write surfaces here, naming its own step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - whatever the storage raised, say which step failed
            raise self._write_error(step, e) from e
        if saved:
            self._in_flight = step
        return saved

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._in_flight, e) from e
        finally:
            self._in_flight = None

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
        self._manager.reload()  # what is on disk, not what orbax hoped to write
        return CheckpointWriteError(
            f"could not write checkpoint step {step} to {self.directory}: {_first_line(error)}; "
            f"the checkpoints already on disk (steps {self.all_steps()}) are unchanged, and a restart "
            "resumes from the newest of them")

    # --- restoring ----------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any]:
        """(state laid out like `abstract_state` (shapes, dtypes, shardings), data-iterator state).

        Raises CheckpointMismatch, listing the differences, if the step holds other names or
        shapes than `abstract_state`.
        """
        self.check_matches(step, abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest checkpoint that can be read, or None if there is no checkpoint.

        Newer steps that cannot be read are skipped with a warning and, once an older step
        restores, moved to WORKDIR/unreadable_checkpoints/. A CheckpointMismatch is raised
        as is (an older step of the same run would not match either).
        """
        unreadable: dict[int, str] = {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state)
                error = None
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read makes the step unusable
                error = f"{type(e).__name__}: {_first_line(e)}"
            if _on_every_process(error is None):
                self._move_aside(unreadable)
                return Restored(step, state, data_state)
            unreadable[step] = error or "unreadable on another process"
            logging.warning("checkpoint step %d in %s cannot be read, trying an older one: %s",
                            step, self.directory, unreadable[step])
        if unreadable:
            listing = "; ".join(f"step {s}: {e}" for s, e in unreadable.items())
            raise NoReadableCheckpoint(
                f"no checkpoint in {self.directory} can be read ({listing}); nothing was moved or deleted. "
                f"Move {self.directory} away to start {self.workdir} from scratch.")
        return None

    def check_matches(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointMismatch unless `step` holds exactly the names and shapes of `abstract_state`."""
        stored = {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in
                  tree.flatten(self._manager.item_metadata(step)["state"]).items()}
        wanted = {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in tree.flatten(abstract_state).items()}
        differences = {
            "only in the checkpoint": [p for p in stored if p not in wanted],
            "only in this run": [p for p in wanted if p not in stored],
            "different shape or dtype": [f"{p}: checkpoint {stored[p][0]} {stored[p][1]}, this run {v[0]} {v[1]}"
                                         for p, v in wanted.items() if p in stored and stored[p] != v],
        }
        if any(differences.values()):
            lines = "\n".join(f"  {kind} ({len(names)}): {_some(names)}" for kind, names in differences.items()
                              if names)
            raise CheckpointMismatch(
                f"checkpoint step {step} in {self.directory} holds another model or optimizer state than "
                f"this run builds:\n{lines}\nResume it with the config it was written with "
                f"({self.workdir / 'config.json'}), or train in a new workdir "
                f"(--config.init_from={self.workdir} starts from its parameters).")

    def _move_aside(self, unreadable: dict[int, str]) -> None:
        if not unreadable:
            return
        target = self.workdir / UNREADABLE_DIR
        if jax.process_index() == 0:
            target.mkdir(exist_ok=True)
            for step in unreadable:
                destination = _free_name(target / str(step))
                (self.directory / str(step)).rename(destination)
                logging.warning("moved unreadable checkpoint step %d to %s", step, destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("emonet_jax: unreadable checkpoints moved aside")
        self._manager.reload()


def record_config(workdir, config) -> list[str]:
    """Writes WORKDIR/config.json and returns the keys whose values differ from the file already
    there, which is then kept as config.previous.json (.1, .2, ... if that exists), with a warning."""
    path = pathlib.Path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2)
    changed = []
    if path.exists():
        try:
            before = _flat_items(json.loads(path.read_text()))
        except ValueError:  # cut short by a kill: nothing to compare, but keep it
            before = {"(unreadable config.json)": None}
        after = _flat_items(json.loads(text))
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if changed:
        kept = _free_name(path.with_name("config.previous.json"))
        path.rename(kept)
        logging.warning("%s holds a run with another config; kept it as %s. Changed: %s", workdir, kept.name,
                        _some([f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed]))
    path.write_text(text)
    return changed


def _flat_items(node, prefix: str = "") -> dict[str, Any]:
    """{'a.b': leaf} of nested dicts: a config's keys as --config.a.b names them."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat = {}
    for key, value in node.items():
        flat.update(_flat_items(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _on_every_process(ok: bool) -> bool:
    """True if `ok` is True on every process: all processes must restore the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


def _some(names: list[str]) -> str:
    # Parameters first: an optimizer moment repeats its parameter's difference.
    names = sorted(names, key=lambda p: (not p.startswith("params/"), p))
    more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _free_name(path: pathlib.Path) -> pathlib.Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}.{n}"), n + 1
    return candidate


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
