"""Benchmarks; each prints one JSON object on stdout.

    python -m emonet_jax.bench pipeline [--images=64 --batch=32 --steps=20 --threads=2]

`pipeline`: images/s of the training input pipeline at 224 px (random resized crop + flip,
values in [-1, 1]) reading prepared 224 px records, against the same pipeline decoding the
1024x1024 PNG originals (what training straight from the Hugging Face parquet would do).
Both run through identical grain code with the same threads; the originals are synthetic
faces rendered at 1024 px, PNG-encoded like the real ones.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import tempfile
import time

import grain
import numpy as np
import pyarrow.parquet as pq
from absl import app, flags
from PIL import Image

from emonet_jax.data import pipeline, prepare, synthetic

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 64, "Number of synthetic 1024 px originals.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("steps", 20, "Timed batches (after 2 warm-up batches).")
flags.DEFINE_integer("threads", 2, "grain reader threads (the reference machine has 2 cores).")
flags.DEFINE_integer("image_size", 224, "Training resolution.")
flags.DEFINE_string("cache", os.path.join(tempfile.gettempdir(), "emonet_bench"), "Scratch dir.")


class PngSource:
    """Random access over the PNG bytes of parquet shards, decoded on read."""

    def __init__(self, files):
        self._images = [row["image"]["bytes"] for f in files
                        for row in pq.read_table(f, columns=["image"]).to_pylist()]

    def __len__(self):
        return len(self._images)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self._images[i])) as im:
            return {"image": np.asarray(im.convert("RGB"))}


def _rate(dataset: grain.IterDataset, steps: int, batch: int) -> float:
    it = iter(dataset)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - start)


def _augment_only(source, size, seed, batch, threads):
    """The training transform without labels (the PNG source has none)."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)

    def transform(x, rng):
        return pipeline.to_unit_range(pipeline.augment_image(x["image"], rng, size, pipeline.Augment()))

    ds = ds.random_map(transform, seed=seed).batch(batch, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))


def bench_pipeline() -> dict:
    root = pathlib.Path(FLAGS.cache)
    spec = prepare.SyntheticSpec(num_hq=FLAGS.images, num_binary=0, num_big=0, image_size=1024,
                                 schemas=(("hq", "card"),))
    summary = prepare.prepare_synthetic(root, FLAGS.image_size, spec)
    records = pipeline.open_split(f"emonet_face_hq/{FLAGS.image_size}", "test", summary["data_dir"])
    prepared = pipeline.train_dataset(records, global_batch_size=FLAGS.batch, image_size=FLAGS.image_size,
                                      seed=0, process_index=0, process_count=1, threads=FLAGS.threads)
    originals = PngSource(sorted(pathlib.Path(summary["hq"]["raw"]).glob("*.parquet")))
    decode = _augment_only(originals, FLAGS.image_size, 0, FLAGS.batch, FLAGS.threads)
    records_rate = _rate(prepared, FLAGS.steps, FLAGS.batch)
    png_rate = _rate(decode, FLAGS.steps, FLAGS.batch)
    return {"benchmark": "pipeline", "image_size": FLAGS.image_size, "original_size": 1024,
            "images": FLAGS.images, "batch": FLAGS.batch, "steps": FLAGS.steps, "threads": FLAGS.threads,
            "cpus": os.cpu_count(), "records_images_per_s": round(records_rate, 1),
            "original_png_images_per_s": round(png_rate, 1), "speedup": round(records_rate / png_rate, 2)}


BENCHMARKS = {"pipeline": bench_pipeline}


def main(argv):
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise app.UsageError(f"usage: python -m emonet_jax.bench {{{'|'.join(BENCHMARKS)}}} [flags]")
    print(json.dumps(BENCHMARKS[argv[1]]()))


if __name__ == "__main__":
    app.run(main)
