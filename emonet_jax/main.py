"""Entry point: `python -m emonet_jax.main --config=configs/hq.py[:demo] --workdir=DIR`.

Prepares the records if the config asks for synthetic data, then trains and evaluates
(emonet_jax/train.py). Re-running the same command on the same workdir resumes from its
latest checkpoint; `--config.key=value` overrides any config key (a misspelled key fails,
naming it).

Several processes (a TPU pod slice, a GPU cluster) run the same command, one per host (or
per GPU), and join through `jax.distributed.initialize` before anything else touches JAX.
`--distributed` decides whether to join:

  auto (default)  join when any of --coordinator_address / --num_processes / --process_id is
                  given, or the environment names a multi-process launch: JAX_COORDINATOR_ADDRESS,
                  a SLURM step of several tasks (srun), Open MPI (mpirun) with several ranks.
                  Otherwise run as one process.
  yes             always join; flags left unset are auto-detected by JAX (Cloud TPU VM metadata,
                  SLURM, Open MPI). Use this on a TPU pod slice, which no variable announces.
  no              never join.

The global batch (`config.batch_size`) is split over all devices of all processes and is
the same batch one process would train on, so a run gives the same losses on 1 or N
processes. WORKDIR and the records must be on a file system every process sees (orbax
writes each checkpoint from all processes into WORKDIR/checkpoints); only process 0 writes
metrics, config.json, data_summary.json and the evaluation tables. SIGTERM on any process
makes all of them save at the same step and exit 0; re-running the command resumes.

    # A TPU pod slice (e.g. v5litepod-32, 8 hosts); WORKDIR on a shared mount (NFS, Filestore, gcsfuse):
    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="cd emonet_jax && \
      .venv/bin/python -m emonet_jax.main --distributed=yes --config=configs/hq.py \
      --workdir=/mnt/shared/workdirs/hq --config.data.data_dir=/mnt/shared/tensorflow_datasets"
    # A 2-node SLURM GPU job, one process per GPU (JAX reads SLURM's variables):
    srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 .venv/bin/python -m emonet_jax.main \
      --config=configs/hq.py --workdir=/shared/workdirs/hq --config.data.data_dir=/shared/tensorflow_datasets
    # 2 processes on one machine, 4 simulated CPU devices each (what tests/multihost_test.py runs):
    for i in 0 1; do XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      python -m emonet_jax.main --config=configs/hq.py:demo --workdir=workdirs/demo2 \
      --coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=$i & done; wait
"""

from __future__ import annotations

import fcntl
import json
import logging as py_logging
import os
import pathlib

import jax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from emonet_jax import host_memory, train
from emonet_jax.data import prepare

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hq.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and evaluations go.")
flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                  "Join a multi-process run through jax.distributed.initialize (see the module docstring).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, reachable by every process.")
flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 ... num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])

PREPARE_TIMEOUT_S = 3600  # how long the other processes wait for process 0 to prepare synthetic data


def launcher_in_environment(environ=os.environ) -> str | None:
    """The multi-process launcher the environment names, if any (what `--distributed=auto` joins)."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def join_processes(mode: str, coordinator_address=None, num_processes=None, process_id=None,
                   environ=os.environ) -> bool:
    """Calls `jax.distributed.initialize` if `mode` (auto | yes | no) says so; returns whether it did.

    Must run before any other JAX call (the backend is created on the first one).
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if mode == "no":
        if any(given):
            raise app.UsageError("--distributed=no contradicts --coordinator_address/--num_processes/--process_id")
        return False
    if mode == "auto" and not any(given) and launcher_in_environment(environ) is None:
        return False
    # Cross-process collectives on CPU devices (tests, CPU clusters) go through gloo; the
    # setting is ignored by GPU and TPU backends. Named here so a JAX whose default differs still works.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


def records_dir(config) -> tuple[pathlib.Path, dict]:
    """The TFDS data dir holding the records, preparing synthetic data if asked.

    With several processes, process 0 prepares first and the others wait; then each of them
    prepares too, which reads the records back from a shared disk, or builds a copy on a
    machine that does not share it (one process at a time per machine, under a file lock).
    The wait is a barrier of the coordination service, not a device collective: CPU
    collectives (gloo) give up when processes arrive more than 30 s apart.
    """
    data_dir = pathlib.Path(config.data.data_dir).expanduser()
    if not config.data.synthetic:
        return data_dir, {}
    spec = prepare.SyntheticSpec(num_hq=config.data.num_hq, num_binary=config.data.num_binary,
                                 num_big=config.data.num_big, seed=config.seed)

    def prepare_locked():
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(data_dir / ".prepare.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return prepare.prepare_synthetic(data_dir, config.data.resolution, spec)

    summary = prepare_locked() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        wait_for_all = ocp.multihost.get_barrier_sync_fn()
        wait_for_all(key="synthetic_records_prepared_by_process_0", timeout_ms=PREPARE_TIMEOUT_S * 1000)
        summary = summary or prepare_locked()
    return pathlib.Path(summary["data_dir"]), summary


class _QuietLibraries(py_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings, drop the chatter."""

    def filter(self, record) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    host_memory.apply_flag()    # before JAX starts its threads
    logging.get_absl_handler().addFilter(_QuietLibraries())
    join_processes(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    workdir = pathlib.Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("process %d of %d; devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    data_dir, prepared = records_dir(config)
    if prepared and jax.process_index() == 0:
        (workdir / "data_summary.json").write_text(json.dumps(prepared, indent=2))
    result = train.train_and_evaluate(config, workdir, data_dir)
    if result["preempted"]:
        print(f"Preempted at step {result['step']}: checkpoint saved; re-run the same command to resume.")
        return
    if jax.process_index() != 0:
        return
    summary = result["eval"].get("summary", {})
    print(json.dumps({"step": result["step"], **summary}, indent=2))
    print(f"HQ agreement table: {workdir / 'eval' / 'hq_agreement.md'}")


if __name__ == "__main__":
    app.run(main)
