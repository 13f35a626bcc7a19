"""Two processes joined by `jax.distributed` train exactly like one process.

`python -m emonet_jax.main` runs as 2 processes on 127.0.0.1 with 4 simulated CPU devices
each, and at the same time as 1 process with 8 devices, both preparing the same tiny
synthetic records into one directory (3 processes racing to prepare: one builds, the others
reuse): the per-step losses agree to 1e-5 and so does the HQ evaluation. The 2-process run
is also preempted: SIGTERM to process 1 alone makes both processes save at the same step
and exit 0, and the same command then resumes from that checkpoint instead of starting over.

Slow by nature (each process imports TensorFlow through clu and compiles for 8 devices;
see the runtime in BENCHMARKS.md). Every wait is bounded, every process runs in its own
process group and is killed in a `finally`, and a failure prints each process's log tail.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from train_test import REPO, main_command

from emonet_jax import main, sharding
from emonet_jax.data import pipeline

STEPS = 12
# lr 1e-2: 12 steps spread the HQ predictions over several intensity levels, so that the
# κ of the two runs is compared on a model that is not constant.
FLAGS = (f"--config.total_steps={STEPS}", "--config.log_every_steps=1", "--config.checkpoint_every_steps=1000",
         "--config.optimizer.lr=1e-2",
         "--config.data.synthetic=True", "--config.data.num_hq=24", "--config.data.num_binary=40",
         "--config.data.num_big=48")
TIMEOUT = 600  # seconds for any one launch (a loaded 2-core machine takes about a third of it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """One run of main.py as `num_processes` processes with `devices` CPU devices each."""

    def __init__(self, workdir, data_dir, num_processes: int, devices: int, name: str):
        flags = list(FLAGS)
        if num_processes > 1:
            flags += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={num_processes}"]
        xla = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{xla} --xla_force_host_platform_device_count={devices}".strip())
        # No persistent compilation cache: on CPU only process 0 hits it, and the other,
        # compiling, would reach the first collective too late (gloo waits 30 s).
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        self.logs = [workdir.parent / f"{name}.{i}.log" for i in range(num_processes)]
        self.processes = []
        for i, log in enumerate(self.logs):
            process_flags = flags + ([f"--process_id={i}"] if num_processes > 1 else [])
            with open(log, "w") as out:  # the child keeps its own descriptor
                self.processes.append(subprocess.Popen(
                    main_command(workdir, data_dir, *process_flags), cwd=REPO, env=env, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True))

    def wait(self, deadline: float) -> list[int]:
        codes = []
        for p in self.processes:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                pytest.fail(f"timed out\n{self.tails()}")
        return codes

    def running(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {log.name} (tail) ---\n{log.read_text()[-chars:]}" for log in self.logs)


def train_losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged twice (a second writer?): {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def preempted_at(launch: Launch, i: int) -> int:
    found = re.search(r"Preempted at step (\d+)", launch.log(i))
    assert found, f"process {i} did not stop for the preemption\n{launch.tails()}"
    return int(found.group(1))


def wait_until(condition, launch: Launch, deadline: float) -> None:
    while not condition():
        if time.time() > deadline or not launch.running():
            pytest.fail(f"gave up waiting (running: {launch.running()})\n{launch.tails()}")
        time.sleep(0.2)


def test_two_processes_train_like_one_and_resume_together_after_sigterm(tmp_path):
    data_dir = tmp_path / "records"  # prepared by the runs themselves, all at once
    one, two = tmp_path / "one", tmp_path / "two"
    launches = []
    try:
        deadline = time.time() + TIMEOUT
        launches.append(reference := Launch(one, data_dir, 1, 8, "one"))
        launches.append(pair := Launch(two, data_dir, 2, 4, "two"))
        # Preempt once step 1 is logged: only process 1 gets the signal.
        metrics = two / "metrics.jsonl"
        wait_until(lambda: metrics.is_file() and "train/loss" in metrics.read_text(), pair, deadline)
        pair.processes[1].send_signal(signal.SIGTERM)
        assert pair.wait(deadline) == [0, 0], pair.tails()
        stopped = {preempted_at(pair, i) for i in (0, 1)}
        assert len(stopped) == 1 and 1 <= min(stopped) < STEPS, (stopped, pair.tails())
        assert not (two / "eval").exists()

        deadline = time.time() + TIMEOUT
        launches.append(resumed := Launch(two, data_dir, 2, 4, "resumed"))
        assert resumed.wait(deadline) == [0, 0], resumed.tails()
        assert all(f"at step {min(stopped)}" in resumed.log(i) and "resumed from" in resumed.log(i) for i in (0, 1))
        assert reference.wait(deadline) == [0], reference.tails()
    finally:
        for launch in launches:
            launch.kill()

    assert len(list(data_dir.glob("synthetic-*"))) == 1
    summaries = [json.loads((d / "data_summary.json").read_text()) for d in (one, two)]
    assert summaries[0]["data_dir"] == summaries[1]["data_dir"]
    assert summaries[0]["big"]["splits"] == summaries[1]["big"]["splits"]

    losses_one, losses_two = train_losses(one), train_losses(two)
    assert sorted(losses_one) == sorted(losses_two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses_two[s] for s in range(1, STEPS + 1)],
                               [losses_one[s] for s in range(1, STEPS + 1)], rtol=1e-5)
    print("step  1 process x 8 devices  2 processes x 4 devices")
    for s in range(1, STEPS + 1):
        print(f"{s:4d}  {losses_one[s]:.7f}              {losses_two[s]:.7f}")

    predictions = [np.load(d / "eval" / "hq_predictions.npz") for d in (one, two)]
    np.testing.assert_array_equal(predictions[0]["image_id"], predictions[1]["image_id"])
    np.testing.assert_allclose(predictions[1]["intensity"], predictions[0]["intensity"], rtol=1e-5, atol=1e-6)
    assert len(np.unique(predictions[0]["intensity"].astype(int))) > 1  # κ below is not of a constant model
    models = [json.loads((d / "eval" / "hq_agreement.json").read_text())["annotators"]["model"] for d in (one, two)]
    assert models[1]["mean_kappa"] == pytest.approx(models[0]["mean_kappa"], abs=1e-9)
    assert models[1]["per_emotion_kappa"] == pytest.approx(models[0]["per_emotion_kappa"], abs=1e-9)


def test_distributed_auto_joins_only_when_told_or_launched_by_a_cluster():
    assert main.launcher_in_environment({}) is None
    assert main.launcher_in_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None  # sbatch, not srun
    assert main.launcher_in_environment({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "1"}) is None
    assert main.launcher_in_environment({"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "16"}) == "SLURM"
    assert main.launcher_in_environment({"OMPI_MCA_orte_hnp_uri": "1;tcp://x:1", "OMPI_COMM_WORLD_SIZE": "2"}) \
        == "Open MPI"
    assert main.launcher_in_environment({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    assert main.join_processes("auto", environ={}) is False
    assert main.join_processes("no", environ={"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2"}) is False
    with pytest.raises(main.app.UsageError, match="contradicts"):
        main.join_processes("no", process_id=1, environ={})


def test_a_batch_layout_that_does_not_match_the_loaded_rows_is_an_error(monkeypatch):
    mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
    pipeline.check_process_rows(sharding.batch_sharding(mesh), 16)  # one process holds every row
    # Pretend to be process 0 of 2: it loads rows 0-7 but this mesh puts all 16 on its devices.
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: 0)
    with pytest.raises(ValueError, match=r"loads rows 0-7"):
        pipeline.check_process_rows(sharding.batch_sharding(mesh), 16)
