"""Entry point: `python -m emonet_jax.main --config=configs/hq.py[:demo] --workdir=DIR`.

Prepares the records if the config asks for synthetic data, then trains and evaluates
(emonet_jax/train.py). Re-running the same command on the same workdir resumes from its
latest checkpoint; `--config.key=value` overrides any config key (a misspelled key fails,
naming it).
"""

from __future__ import annotations

import json
import logging as py_logging
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from emonet_jax import train
from emonet_jax.data import prepare

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hq.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and evaluations go.")
flags.mark_flags_as_required(["config", "workdir"])


def records_dir(config) -> tuple[pathlib.Path, dict]:
    """The TFDS data dir holding the records, preparing synthetic data if asked."""
    data_dir = pathlib.Path(config.data.data_dir).expanduser()
    if not config.data.synthetic:
        return data_dir, {}
    spec = prepare.SyntheticSpec(num_hq=config.data.num_hq, num_binary=config.data.num_binary,
                                 num_big=config.data.num_big, seed=config.seed)
    summary = prepare.prepare_synthetic(data_dir, config.data.resolution, spec)
    return pathlib.Path(summary["data_dir"]), summary


class _QuietLibraries(py_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings, drop the chatter."""

    def filter(self, record) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = FLAGS.config
    workdir = pathlib.Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("devices: %s", jax.devices())
    data_dir, prepared = records_dir(config)
    if prepared and jax.process_index() == 0:
        (workdir / "data_summary.json").write_text(json.dumps(prepared, indent=2))
    result = train.train_and_evaluate(config, workdir, data_dir)
    if result["preempted"]:
        print(f"Preempted at step {result['step']}: checkpoint saved; re-run the same command to resume.")
        return
    summary = result["eval"].get("summary", {})
    print(json.dumps({"step": result["step"], **summary}, indent=2))
    print(f"HQ agreement table: {workdir / 'eval' / 'hq_agreement.md'}")


if __name__ == "__main__":
    app.run(main)
