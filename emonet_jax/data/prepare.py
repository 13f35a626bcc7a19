"""Builds EmoNet-Face records: the real splits, or the synthetic stand-in.

    # Real data (fetches the parquet shards from the Hugging Face Hub, or reads --manual_dir):
    python -m emonet_jax.data.prepare --dataset=hq --resolution=224 --data_dir=~/tensorflow_datasets
    # Synthetic data in every observed layout (what `make demo` and the tests use):
    python -m emonet_jax.data.prepare --synthetic --resolution=64 --data_dir=/tmp/emonet_synth

`tfds build tfds_builders/emonet_face_hq --config=224` does the same as the first line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import tensorflow_datasets as tfds
from absl import app, flags, logging

from emonet_jax.data import synthetic

DATASETS = {"hq": "emonet_face_hq", "binary": "emonet_face_binary", "big": "emonet_face_big"}


def builder_class(kind: str):
    """The registered builder of `kind` (imports its module from tfds_builders)."""
    import importlib
    module = importlib.import_module(f"tfds_builders.{DATASETS[kind]}")
    return module.Builder


def build(kind: str, data_dir, resolution: int, manual_dir=None, **builder_kwargs):
    """Prepares one dataset (no-op if already prepared) and returns its builder."""
    builder = builder_class(kind)(config=str(resolution), data_dir=str(data_dir), **builder_kwargs)
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=download_config)
    return builder


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and layouts of the synthetic EmoNet-Face (`synthetic.write_split`)."""
    num_hq: int = 120
    num_binary: int = 400
    num_big: int = 1200
    image_size: int = 128            # the "original" PNGs (the real ones are 1024x1024)
    seed: int = 0
    schemas: tuple[tuple[str, str], ...] = (("hq", "path_label"), ("binary", "path_emotion"), ("big", "card"))
    # Part of the cache key, so data made by an older generator is never reused by a newer one.
    generator: int = synthetic.GENERATOR_VERSION


def prepare_synthetic(data_dir, resolution: int, spec: SyntheticSpec = SyntheticSpec(),
                      workers: int | None = None) -> dict:
    """Generates the synthetic parquet (once per spec) and builds the three datasets.

    The faces are drawn by `workers` processes (default: one per CPU); the files do not depend
    on how many.

    The raw parquet lives under `data_dir/raw/<spec hash>/`; the records under
    `data_dir/<spec hash>/` so that a different spec never reads stale records.
    Returns a summary per dataset (name, splits, sizes, bad rows, seconds).
    """
    key = _spec_key(spec)
    root = pathlib.Path(data_dir)
    summary = {"data_dir": str(root / key), "resolution": resolution, "spec": dataclasses.asdict(spec)}
    for kind, schema in spec.schemas:
        start = time.time()
        raw = root / "raw" / key / kind
        if not (raw / "truth.npz").exists():
            synthetic.write_split(raw, kind, getattr(spec, f"num_{kind}"), seed=spec.seed,
                                  size=spec.image_size, schema=schema, workers=workers or os.cpu_count() or 1)
        builder = build(kind, root / key, resolution, manual_dir=raw)
        summary[kind] = describe(builder) | {"seconds": round(time.time() - start, 2), "raw": str(raw)}
    return summary


def _spec_key(spec: SyntheticSpec) -> str:
    import hashlib
    text = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    return "synthetic-" + hashlib.sha1(text.encode()).hexdigest()[:10]


def describe(builder) -> dict:
    info = builder.info
    return {"name": f"{info.name}/{info.config_name}", "dir": str(builder.data_dir),
            "splits": {name: split.num_examples for name, split in info.splits.items()},
            "schema": info.metadata.get("schema"),
            "bad_rows": (info.metadata.get("bad_rows") or {}).get("count")}


FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, list(DATASETS), "Real dataset to prepare.")
flags.DEFINE_bool("synthetic", False, "Prepare the synthetic EmoNet-Face instead.")
flags.DEFINE_integer("resolution", 224, "Stored image resolution (a builder config).")
flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data dir.")
flags.DEFINE_string("manual_dir", None, "Local copy of the parquet shards (and binary.csv).")
flags.DEFINE_float("max_bad_fraction", 0.01, "Fail the build above this fraction of bad rows.")


def main(argv):
    del argv
    data_dir = pathlib.Path(FLAGS.data_dir).expanduser()
    if FLAGS.synthetic == (FLAGS.dataset is not None):
        raise app.UsageError("give exactly one of --dataset=hq|binary|big and --synthetic")
    if FLAGS.synthetic:
        summary = prepare_synthetic(data_dir, FLAGS.resolution)
    else:
        builder = build(FLAGS.dataset, data_dir, FLAGS.resolution, FLAGS.manual_dir,
                        max_bad_fraction=FLAGS.max_bad_fraction)
        summary = describe(builder)
    logging.info("prepared: %s", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
