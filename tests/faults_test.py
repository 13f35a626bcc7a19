"""The fault and bad-input catalogue: what goes wrong around a training run, and what happens.

One test per fault, named `test_<fault>` (parametrised where a fault comes in kinds or seeds);
`test_every_catalogued_fault_has_its_test` keeps this table and the tests in step. List the
cases with `python -m pytest tests/faults_test.py --collect-only -q`; `python
tests/faults_test.py` prints the table for the README.

| fault | behaviour |
| --- | --- |
| `sigkill_at_a_random_step`: SIGKILL a random time after a random step, before the first checkpoint, mid-run and at the end (3 seeds) | the same command resumes from the newest complete checkpoint and ends with parameters bit-identical to an uninterrupted run; no metrics row is logged twice |
| `sigkill_while_a_checkpoint_is_written`: SIGKILL after a checkpoint's files are written, before orbax renames its directory | the unfinished `<step>.orbax-checkpoint-tmp` is never restored: the restart resumes from the step before and ends bit-identical |
| `sigterm_at_a_random_step`: SIGTERM at a random step between checkpoints (2 seeds) and at a checkpoint step | the step in flight finishes, a checkpoint is saved, the run returns `preempted`; the restart ends bit-identical |
| `unreadable_latest_checkpoint`: the newest step's largest array file cut to 1 KiB, overwritten with random bytes, or deleted | restore logs the step it skips and why, resumes from the previous step (ending bit-identical) and moves the bad step to `WORKDIR/unreadable_checkpoints/`: nothing deleted |
| `no_readable_checkpoint`: every step unreadable | `NoReadableCheckpoint` naming the workdir and each step's error; nothing moved or deleted |
| `checkpoint_of_another_model`: resuming a workdir with another `model.variant` | `CheckpointMismatch` listing the names and shapes that differ, before any array is read; the checkpoints untouched |
| `init_from_a_mismatched_checkpoint`: `init_from` a run whose parameters do not fit | one error listing every missing or mis-shaped parameter (`init_skip` regexes exempt new heads) |
| `another_config_in_the_workdir`: resuming with another learning rate, or another data mixture | a changed key is allowed with a warning naming it, the old `config.json` kept as `config.previous.json`; another data mixture is refused, naming both |
| `unwritable_workdir`: the workdir below a file, or read-only (non-root only) | `WorkdirNotWritable` naming the path, before anything is compiled |
| `disk_full_while_saving_a_checkpoint`: ENOSPC inside orbax's asynchronous write | `CheckpointWriteError` naming the step, the directory and the cause; the steps already on disk are unchanged (old steps are not cleaned up) and the restart ends bit-identical |
| `disk_full_while_writing_metrics`: ENOSPC half-way through a `metrics.jsonl` line | an error naming `metrics.jsonl`; the checkpoints and complete rows stay; the restart drops the cut line and ends bit-identical |
| `nan_in_a_batch`: a batch of NaN images | the non-finite update is not applied; the run stops naming the step, before writing a checkpoint of it |
| `missing_shard_file`: an array_record shard of a prepared split deleted | a `FileNotFoundError` naming the file when the split is opened, before anything is compiled |
| `records_not_prepared`: `data.data_dir` without the records | an error naming the dataset, the folder it looked for and the prepare command |
| `empty_split`: a training split or the evaluation split with 0 rows, or a split that preparing would leave empty | an error naming the split (and, when preparing, the rows read, bad and in other splits) |
| `config_key_typo`: `--config.totl_steps`, `--config.model.varaint` (2 keys) | the command fails naming the key; nothing is written |
| `invalid_config_value`: a batch not divisible by the devices, a bad `grad_accum_steps`, a freeze of everything, an unknown config argument | an error naming the key, before anything is compiled |
| `non_image_files`: text, empty, truncated files and a decompression bomb among images (`read_images`, `transfer --images`, `embed --images`) | each is skipped and named, the skips are counted, the readable images go on |

Runs are the tiny model for 12 steps (checkpoints every 3, metrics every 2), compared with one
uninterrupted reference run. This module and the child processes it kills share a persistent
compilation cache, so a run after the first costs its steps, not a compile; the same program
compiles to the same executable, so results do not change. Slow by nature (minutes on 2 cores,
measured in the README's reliability section): each killed child process imports TensorFlow
(through clu) before it trains, and the two config typos run the command line.
"""

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _helpers import REPO, abstract_state, final_params, first_batch, main_command, max_difference, setup
from _helpers import tiny_config, train_run
from jax.experimental.compilation_cache import compilation_cache
from PIL import Image

from configs import hq
from emonet_jax import checkpoint, inference, train, tree, writers

RUN = {"total_steps": 12, "checkpoint_every_steps": 3, "log_every_steps": 2}
LOGGED_STEPS = [2, 4, 6, 8, 10, 12]


def catalogue() -> dict[str, str]:
    """{fault: behaviour}, from the table above."""
    rows = (re.match(r"\| `(\w+)`.*? \| (.*) \|$", line) for line in __doc__.splitlines())
    return {row[1]: row[2] for row in rows if row}


def test_every_catalogued_fault_has_its_test():
    tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert tests - {"every_catalogued_fault_has_its_test"} == set(catalogue())


# --- shared runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs and its child processes."""
    path = tmp_path_factory.mktemp("jax_cache")
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    compilation_cache.set_cache_dir(str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()  # the settings are read once per process; read them again
    yield path
    compilation_cache.set_cache_dir(before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data_dir(synthetic_records):
    return synthetic_records["data_dir"]


class Reference(NamedTuple):
    workdir: Any
    params: Any
    model_eval: dict  # the HQ agreement of the model


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Reference:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train_run(workdir, data_dir, **RUN)
    assert result["step"] == 12 and logged_steps(workdir) == LOGGED_STEPS
    return Reference(workdir, final_params(workdir), result["eval"]["annotators"]["model"])


def logged_steps(workdir) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_ends_like_the_reference(workdir, result, reference):
    assert result["step"] == 12 and not result["preempted"]
    for got, want in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(reference.params), strict=True):
        np.testing.assert_array_equal(got, want)  # bit-identical
    assert result["eval"]["annotators"]["model"] == reference.model_eval
    assert logged_steps(workdir) == LOGGED_STEPS  # nothing logged twice, nothing missing


def copy_of(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference.workdir, workdir)
    return workdir


def data_files(step_dir) -> list[pathlib.Path]:
    """The array data files of one checkpoint step (orbax OCDBT's `d/` folders), relative to it.

    All of them, not the largest: which data files the final manifest references depends on how
    the asynchronous writes were chunked, so damaging one file need not damage what is read.
    """
    files = sorted(p.relative_to(step_dir) for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, f"no data files under {step_dir}"
    return files


def join_checkpoint_writes():
    """After a run raised, lets its asynchronous checkpoint write finish (a process that exits
    waits for it too: orbax's thread is not a daemon)."""
    for thread in threading.enumerate():
        if thread.name == "save_finalize":
            thread.join(timeout=300)


def compiling_fails(monkeypatch):
    """Makes the trainer's first compile fail the test: a fault must be caught before it."""
    monkeypatch.setattr(train, "initial_state", lambda trainer: pytest.fail("compiled before failing"))


# --- killed runs ----------------------------------------------------------------------------------

# A child process trains like `train_run(workdir, data_dir, **RUN)` and SIGKILLs itself: `delay`
# seconds after the batch of step `step` is handed to the devices, or just before orbax renames
# the finished directory of checkpoint `rename`.
CHILD = """
import json, os, signal, sys, threading
sys.path.insert(0, "tests")
from _helpers import tiny_config
from emonet_jax import train
workdir, data_dir, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if "step" in spec:
    device_batch, calls = train.pipeline.device_batch, []
    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == spec["step"]:
            threading.Timer(spec["delay"], kill).start()
        return device_batch(*args, **kwargs)
    train.pipeline.device_batch = counting
else:
    from orbax.checkpoint._src.path import atomicity
    finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def rename_or_die(self):
        if self.get_final().name == str(spec["rename"]):
            kill()
        return await finalize(self)
    atomicity.AtomicRenameTemporaryPath.finalize = rename_or_die
train.train_and_evaluate(tiny_config(**spec["run"]), workdir, data_dir)
"""


def run_killed_child(workdir, data_dir, compile_cache, **spec):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compile_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    child = subprocess.run([sys.executable, "-c", CHILD, str(workdir), str(data_dir), json.dumps(dict(spec, run=RUN))],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]


KILL_STEPS = [(1, 3), (3, 9), (9, 13)]  # seed i kills in range i: before the first checkpoint, mid-run, at the end


@pytest.mark.parametrize("seed", range(len(KILL_STEPS)))
def test_sigkill_at_a_random_step(tmp_path, data_dir, reference, compile_cache, seed):
    rng = np.random.default_rng(seed)
    step, delay = int(rng.integers(*KILL_STEPS[seed])), float(rng.uniform(0, 0.5))
    run_killed_child(tmp_path, data_dir, compile_cache, step=step, delay=delay)
    assert_ends_like_the_reference(tmp_path, train_run(tmp_path, data_dir, **RUN), reference)


def test_sigkill_while_a_checkpoint_is_written(tmp_path, data_dir, reference, compile_cache):
    run_killed_child(tmp_path, data_dir, compile_cache, rename=9)
    assert (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp").is_dir()  # written, never renamed
    assert saved_steps(tmp_path) == [3, 6]
    assert checkpoint.Checkpoints(tmp_path).latest_step() == 6
    assert_ends_like_the_reference(tmp_path, train_run(tmp_path, data_dir, **RUN), reference)
    assert saved_steps(tmp_path) == [6, 9, 12] and not list((tmp_path / "checkpoints").glob("*tmp*"))


BETWEEN_CHECKPOINTS = [s for s in range(1, RUN["total_steps"]) if s % RUN["checkpoint_every_steps"]]


@pytest.mark.parametrize("step", [int(np.random.default_rng(seed).choice(BETWEEN_CHECKPOINTS)) for seed in (0, 1)]
                         + [6], ids=["seed0", "seed1", "checkpoint_step"])
def test_sigterm_at_a_random_step(tmp_path, data_dir, reference, monkeypatch, step):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    device_batch, calls = train.pipeline.device_batch, []

    def sigterm_at_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:  # the signal lands while the batch of `step` is handed over
            os.kill(os.getpid(), signal.SIGTERM)
        return device_batch(*args, **kwargs)

    monkeypatch.setattr(train.pipeline, "device_batch", sigterm_at_step)
    first = train_run(tmp_path, data_dir, **RUN)
    monkeypatch.undo()
    assert first["preempted"] and first["step"] == step and saved_steps(tmp_path)[-1] == step
    assert not (tmp_path / "eval").exists()
    assert_ends_like_the_reference(tmp_path, train_run(tmp_path, data_dir, **RUN), reference)


# --- checkpoints on disk --------------------------------------------------------------------------

def truncate(path):
    path.write_bytes(path.read_bytes()[:1024])  # a write cut short (data past a file's middle may be unused)


def garbage(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [truncate, garbage, os.remove], ids=["truncated", "garbage", "deleted"])
def test_unreadable_latest_checkpoint(tmp_path, data_dir, reference, caplog, damage):
    workdir = copy_of(reference, tmp_path)
    step_12 = workdir / "checkpoints" / "12"
    bad_files = data_files(step_12)
    for bad_file in bad_files:
        damage(step_12 / bad_file)
    result = train_run(workdir, data_dir, **RUN)
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint step 12" in warnings[0], warnings
    moved = workdir / checkpoint.UNREADABLE_DIR / "12"  # kept, with the damaged file as it was
    assert moved.is_dir() and all((moved / f).exists() == (damage is not os.remove) for f in bad_files)
    assert saved_steps(workdir) == [6, 9, 12]  # 12 trained again from 9
    assert_ends_like_the_reference(workdir, result, reference)


def test_no_readable_checkpoint(tmp_path, data_dir, reference):
    workdir = copy_of(reference, tmp_path)
    for step in saved_steps(workdir):
        step_dir = workdir / "checkpoints" / str(step)
        for bad_file in data_files(step_dir):
            truncate(step_dir / bad_file)
    with pytest.raises(checkpoint.NoReadableCheckpoint, match=re.escape(str(workdir))) as error:
        train_run(workdir, data_dir, **RUN)
    assert all(f"step {s}:" in str(error.value) for s in (6, 9, 12))
    assert saved_steps(workdir) == [6, 9, 12] and not (workdir / checkpoint.UNREADABLE_DIR).exists()


def test_checkpoint_of_another_model(tmp_path, reference):
    workdir = copy_of(reference, tmp_path)
    listing = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    ckpt = checkpoint.Checkpoints(workdir)
    with pytest.raises(checkpoint.CheckpointMismatch) as patch4:
        ckpt.restore_latest(abstract_state(tiny_config(**RUN, **{"model.variant": "mu/4"})))
    assert "params/img/embedding/kernel: checkpoint (8, 8, 3, 32) float32, this run (4, 4, 3, 32)" in str(patch4.value)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"only in this run \(\d+\): params/img/Transformer"):
        ckpt.restore_latest(abstract_state(tiny_config(**RUN, **{"model.variant": "Ti/8"})))
    ckpt.close()
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == listing


def test_init_from_a_mismatched_checkpoint(tmp_path, reference):
    workdir, params = reference.workdir, reference.params
    target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_state()["params"])
    loaded, paths = checkpoint.load_params(workdir, target)
    assert max_difference(loaded, params) == 0 and len(paths) == len(tree.flatten(target))
    wider = dict(target, emotion_head={"kernel": np.zeros((32, 400)), "bias": np.zeros(400)})
    with pytest.raises(ValueError, match="emotion_head/kernel: checkpoint"):
        checkpoint.load_params(workdir, wider)
    kept, paths = checkpoint.load_params(workdir, wider, skip=("emotion_head/.*",))
    assert kept["emotion_head"]["kernel"].shape == (32, 400) and "emotion_head/kernel" not in paths
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_params(tmp_path / "nothing", target)


def test_another_config_in_the_workdir(tmp_path, data_dir, reference, caplog):
    workdir = copy_of(reference, tmp_path)
    train_run(workdir, data_dir, **RUN, **{"optimizer.lr": 5e-4})
    assert any("Changed: optimizer.lr: 0.001 -> 0.0005" in r.getMessage() for r in caplog.records)
    assert json.loads((workdir / "config.previous.json").read_text())["optimizer"]["lr"] == 1e-3
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == 5e-4
    with pytest.raises(ValueError, match=r"iterator state has sources .*emonet_face_binary:train.*"
                                         r"this run trains on \['emonet_face_big:train'\]"):
        train_run(workdir, data_dir, **RUN, **{"data.train": (("emonet_face_big", "train", 1.0),)})


# --- the workdir's disk ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["below_a_file", "read_only"])
def test_unwritable_workdir(tmp_path, data_dir, monkeypatch, kind):
    if kind == "below_a_file":
        (tmp_path / "file").write_text("")
        workdir = tmp_path / "file" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only directories")
        workdir = tmp_path / "read_only"
        workdir.mkdir(mode=0o500)
    compiling_fails(monkeypatch)
    with pytest.raises(checkpoint.WorkdirNotWritable, match=f"cannot write to the workdir {re.escape(str(workdir))}"):
        train_run(workdir, data_dir, **RUN)


def test_disk_full_while_saving_a_checkpoint(tmp_path, data_dir, reference, monkeypatch):
    write_json = ocp.JsonCheckpointHandler._save_fn

    async def no_space_for_step_9(self, item, directory):
        if "/9.orbax-checkpoint-tmp/" in f"{directory}/":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await write_json(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space_for_step_9)
    with pytest.raises(checkpoint.CheckpointWriteError) as error:
        train_run(tmp_path, data_dir, **RUN, keep_checkpoints=2)
    monkeypatch.undo()
    message = str(error.value)
    assert f"checkpoint step 9 to {tmp_path / 'checkpoints'}" in message and "No space left on device" in message
    assert "steps [3, 6]" in message
    assert saved_steps(tmp_path) == [3, 6]  # keeping 2, orbax would have deleted step 3 after a good save of 9
    assert_ends_like_the_reference(tmp_path, train_run(tmp_path, data_dir, **RUN), reference)


class _DiskFullAtStep8:
    """metrics.jsonl's file: writes half of step 8's row, then fails like a full disk."""

    def __init__(self, file):
        self._file = file

    def write(self, text):
        if '"step": 8,' in text and "train/loss" in text:
            self._file.write(text[: len(text) // 2])
            self._file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(text)

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_disk_full_while_writing_metrics(tmp_path, data_dir, reference, monkeypatch):
    open_jsonl = writers.JsonlWriter.__init__

    def init_then_fill_the_disk(self, path):
        open_jsonl(self, path)
        self._file = _DiskFullAtStep8(self._file)

    monkeypatch.setattr(writers.JsonlWriter, "__init__", init_then_fill_the_disk)
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(tmp_path / 'metrics.jsonl'))}: No space left"):
        train_run(tmp_path, data_dir, **RUN)
    monkeypatch.undo()
    join_checkpoint_writes()
    assert saved_steps(tmp_path) == [3, 6]
    assert not (tmp_path / "metrics.jsonl").read_text().endswith("\n")  # the cut line is there
    assert_ends_like_the_reference(tmp_path, train_run(tmp_path, data_dir, **RUN), reference)


# --- bad batches and bad records ------------------------------------------------------------------

def test_nan_in_a_batch(tmp_path, data_dir, monkeypatch):
    trainer, step, state = setup(**RUN)
    local = first_batch(trainer.config, data_dir)
    state, _ = step(state, train.pipeline.device_batch(local, trainer.batch_sharding))
    good = jax.device_get((state["params"], state["opt_state"]))
    poisoned = dict(local, image=np.full_like(local["image"], np.nan))
    state, _ = step(state, train.pipeline.device_batch(poisoned, trainer.batch_sharding))
    # The update was not applied: parameters and optimizer moments are the last good ones.
    assert max_difference(jax.device_get((state["params"], state["opt_state"])), good) == 0
    with pytest.raises(train.NonFiniteLoss, match="at step 2"):
        train.check_finite(state, 2)

    device_batch, calls = train.pipeline.device_batch, []

    def nan_at_step_5(local, sharding):
        calls.append(1)
        return device_batch(dict(local, image=np.full_like(local["image"], np.nan)) if len(calls) == 5 else local,
                            sharding)

    monkeypatch.setattr(train.pipeline, "device_batch", nan_at_step_5)
    with pytest.raises(train.NonFiniteLoss, match="at step 5 .*checked at step 6"):
        train_run(tmp_path, data_dir, **RUN)
    join_checkpoint_writes()
    assert saved_steps(tmp_path) == [3] and logged_steps(tmp_path) == [2, 4]


def test_missing_shard_file(tmp_path, data_dir, monkeypatch):
    records = tmp_path / "records"
    shutil.copytree(data_dir, records)
    shard = next((records / "emonet_face_big" / "64").rglob("emonet_face_big-train.array_record-*"))
    shard.unlink()
    compiling_fails(monkeypatch)
    with pytest.raises(FileNotFoundError, match=f"shard files missing: .*{re.escape(str(shard))}"):
        train_run(tmp_path / "run", records, **RUN)
    assert not (tmp_path / "run").exists()


def test_records_not_prepared(tmp_path, monkeypatch):
    compiling_fails(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"no prepared records of emonet_face_big/64 in .*nothing "
                                                r"\(no folder .*nothing/emonet_face_big/64\); prepare them"):
        train_run(tmp_path / "run", tmp_path / "nothing", **RUN)


@pytest.mark.parametrize("where", ["training", "evaluation", "preparing"])
def test_empty_split(tmp_path, data_dir, monkeypatch, where):
    compiling_fails(monkeypatch)
    if where == "preparing":
        from emonet_jax.data import builder, prepare
        spec = prepare.SyntheticSpec(num_hq=2, num_binary=4, num_big=4, image_size=32, seed=3)
        with pytest.raises(builder.EmptySplit, match=r"emonet_face_binary: no row falls in the 'validation' split "
                                                     r"\(4 rows read, 0 bad, 4 in other splits\)"):
            prepare.prepare_synthetic(tmp_path, 64, spec)
        return
    empty = {"training": {"data.train": (("emonet_face_big", "train[:0]", 3.0), ("emonet_face_binary", "train", 1.0))},
             "evaluation": {"data.eval": ("emonet_face_hq", "test[:0]")}}[where]
    named = {"training": "'train[:0]' of emonet_face_big/64", "evaluation": "'test[:0]' of emonet_face_hq/64"}[where]
    with pytest.raises(ValueError, match=f"split {re.escape(named)} in .* has no rows"):
        train_run(tmp_path / "run", data_dir, **RUN, **empty)


# --- the command line and the config -------------------------------------------------------------

@pytest.mark.parametrize("flag,named", [("--config.totl_steps=3", "totl_steps"),
                                        ("--config.model.varaint=B/16", "varaint")])
def test_config_key_typo(tmp_path, data_dir, flag, named):
    run = subprocess.run(main_command(tmp_path, data_dir, flag), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert named in run.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_invalid_config_value():
    with pytest.raises(ValueError, match="dmeo"):
        hq.get_config("dmeo")
    mesh = train.make_mesh(tiny_config())
    with pytest.raises(ValueError, match="batch_size 12 is not divisible by the 8 devices"):
        train.check_config(tiny_config(batch_size=12), mesh)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        train.check_config(tiny_config(grad_accum_steps=3), mesh)
    with pytest.raises(ValueError, match="optimizer.freeze"):
        train.build(tiny_config(**{"optimizer.freeze": (".*",)}), mesh)


# --- image folders --------------------------------------------------------------------------------

def image_folder(directory, names):
    """Readable PNGs (RGB, RGBA, 16-bit grey) under `names[:3]`, then four files that are not images."""
    directory.mkdir()
    rng = np.random.default_rng(0)
    good, bad = names[:3], names[3:]
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8)).save(directory / good[0])
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), np.uint8)).save(directory / good[1])
    Image.fromarray(rng.integers(0, 65535, (16, 24), np.uint16)).save(directory / good[2])
    (directory / bad[0]).write_text("not an image\n")
    (directory / bad[1]).write_bytes(b"")
    truncated = (directory / good[0]).read_bytes()
    (directory / bad[2]).write_bytes(truncated[: len(truncated) // 2])
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(directory / bad[3])  # a bomb below, by the limit
    return [directory / n for n in good], [directory / n for n in bad]


FERD_NAMES = ["0000_Happy.png", "0001_Sad.png", "0002_Anger.png",
              "0003_Happy.png", "0004_Sad.png", "0005_Anger.png", "0006_Happy.png"]


@pytest.mark.parametrize("reader", ["read_images", "transfer", "embed"])
def test_non_image_files(tmp_path, request, monkeypatch, capsys, reader):
    good, bad = image_folder(tmp_path / "images", FERD_NAMES)
    # The trained run (and the session's synthetic records behind it) must exist before the
    # pixel limit drops: under it every 64 px synthetic face would be a "bomb" too.
    workdir = request.getfixturevalue("reference").workdir if reader == "transfer" else None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # 64x64 is more than twice it: an error
    if reader == "read_images":
        images, kept, errors = inference.read_images(good + bad, 32)
        assert images.shape == (3, 32, 32, 3) and kept == [0, 1, 2]
        assert [e.split(": cannot read image")[0] for e in errors] == [str(p) for p in bad]
        return
    if reader == "transfer":
        from emonet_jax.evaluate import transfer
        assert transfer.main([f"--images={tmp_path / 'images'}", "--dataset=ferd", f"--workdir={workdir}",
                              f"--out={tmp_path / 'out'}"]) == 0
        assert json.loads((tmp_path / "out" / "transfer.json").read_text())["n"] == 3
        out = capsys.readouterr()
        assert "scored 3 images" in out.out and "4 left out" in out.out
    else:
        from emonet_jax import embed
        tower = REPO / "tests" / "fixtures" / "siglip_tiny" / "vision"
        assert embed.main([f"--backbone={tower}", f"--images={tmp_path / 'images'}", f"--out={tmp_path / 'emb.npz'}",
                           "--batch=8"]) == 0
        with np.load(tmp_path / "emb.npz") as saved:
            assert saved["paths"].tolist() == [p.name for p in good]
            assert saved["skipped"].tolist() == [p.name for p in bad]
        out = capsys.readouterr()
        assert "3 images embedded, 4 skipped" in out.out
    for path in bad:
        assert f"skipped {path}: cannot read image" in out.err


if __name__ == "__main__":
    print(__doc__[__doc__.index("| fault"):__doc__.index("\n\nRuns are")])
    print(f"\n{len(catalogue())} faults.")
