"""Entry point: `python -m emonet_jax.main --config=configs/hq.py[:demo] --workdir=DIR`.

Stages so far: (1) make sure the records exist (the demo generates and prepares the
synthetic EmoNet-Face on first use), (2) open the grain pipelines the trainer will use and
assemble one global batch of each on the device mesh, (3) write `WORKDIR/data_summary.json`.
Training itself arrives with the trainer (see README: status).
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from emonet_jax.data import pipeline, prepare

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/hq.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where outputs go.")
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


def inspect_pipelines(config, data_dir) -> dict:
    """Pulls one global batch from each training source and the eval source."""
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = pipeline.batch_sharding(mesh)
    out = {}
    for name, split in config.data.train:
        source = pipeline.open_split(f"{name}/{config.data.resolution}", split, data_dir)
        ds = pipeline.train_dataset(source, global_batch_size=config.input.batch_size,
                                    image_size=config.input.image_size, seed=config.seed,
                                    num_workers=config.input.num_workers, threads=config.input.threads)
        batch = pipeline.device_batch(next(iter(ds)), sharding)
        out[f"{name}:{split}"] = {"rows": len(source), "batch": {k: "x".join(map(str, v.shape)) for k, v in batch.items()}}
    name, split = config.data.eval
    source = pipeline.open_split(f"{name}/{config.data.resolution}", split, data_dir)
    ds = pipeline.eval_dataset(source, global_batch_size=config.input.batch_size,
                               image_size=config.input.image_size, crop=config.input.eval_crop)
    masks = [np.asarray(b["mask"]) for b in ds]
    out[f"{name}:{split}"] = {"rows": len(source), "eval_batches": len(masks),
                              "real_rows_seen": int(sum(m.sum() for m in masks))}
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    config = FLAGS.config
    workdir = pathlib.Path(FLAGS.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, prepared = records_dir(config)
    summary = {"records": str(data_dir), "prepared": prepared,
               "devices": [str(d) for d in jax.devices()],
               "pipelines": inspect_pipelines(config, data_dir)}
    (workdir / "data_summary.json").write_text(json.dumps(summary, indent=2))
    logging.info("data summary written to %s", workdir / "data_summary.json")
    print(json.dumps(summary["pipelines"], indent=2))
    print(f"Records in {data_dir}; summary in {workdir / 'data_summary.json'}. "
          "Training is not implemented yet (issue: model and trainer).")


if __name__ == "__main__":
    app.run(main)
