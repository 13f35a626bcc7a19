"""Benchmarks; each prints one JSON object on stdout.

    python -m emonet_jax.bench pipeline [--images=64 --batch=32 --steps=20 --threads=2]
    python -m emonet_jax.bench agreement [--hq_images=2500 --hq_models=14 --hq_cli_runs=3]

`pipeline`: images/s of the training input pipeline at 224 px (random resized crop + flip,
values in [-1, 1]) reading prepared 224 px records, against the same pipeline decoding the
1024x1024 PNG originals (what training straight from the Hugging Face parquet would do).
Both run through identical grain code with the same threads; the originals are synthetic
faces rendered at 1024 px, PNG-encoded like the real ones.

`agreement`: seconds for the whole HQ agreement evaluation (a subprocess running
`python -m emonet_jax.evaluate.agreement` with every output: JSON, tables, CSV, figures; the
median of --hq_cli_runs runs) on a synthetic hq.csv of the published size (2,500 images, 8
experts with 4 per image, 14 model annotators: 45,000 rows), against `reference_mean_kappas`,
the same κ protocol written the
straightforward way (pandas + a scikit-learn call per rater pair and emotion), timed in this
process after pandas and scikit-learn are imported. Checks that both give the same mean κ of
every annotator (to 1e-9). Also reports CPU seconds (the CLI's include its figure worker) and
the 1-minute load average at the start: the reference machine is shared.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import itertools
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import warnings

import grain
import numpy as np
import pyarrow.parquet as pq
from absl import app, flags
from PIL import Image

from emonet_jax import taxonomy
from emonet_jax.data import pipeline, prepare, synthetic

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 64, "Number of synthetic 1024 px originals.")
flags.DEFINE_integer("batch", 32, "Batch size.")
flags.DEFINE_integer("steps", 20, "Timed batches (after 2 warm-up batches).")
flags.DEFINE_integer("threads", 2, "grain reader threads (the reference machine has 2 cores).")
flags.DEFINE_integer("image_size", 224, "Training resolution.")
flags.DEFINE_string("cache", os.path.join(tempfile.gettempdir(), "emonet_bench"), "Scratch dir.")
flags.DEFINE_integer("hq_images", 2500, "agreement: synthetic HQ images (the published HQ has 2,500).")
flags.DEFINE_integer("hq_models", 14, "agreement: model annotators (the published hq.csv has 14).")
flags.DEFINE_integer("hq_cli_runs", 3, "agreement: CLI runs; their median is compared with one reference run.")


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


def reference_mean_kappas(csv_path, rescale=("Hume Face*",)) -> dict[str, float]:
    """Each annotator's mean κ, the straightforward way: pandas + one scikit-learn call per pair.

    The protocol of `emonet_jax.evaluate.agreement`: 'Hume Face*' ratings x 7; a missing key is
    missing; level = int(rating) clipped to 0..7; κ per emotion and rater pair over the images
    both rated; a rater's κ per emotion = mean over the (other) humans; mean over the emotions.
    """
    import pandas as pd
    from sklearn.metrics import cohen_kappa_score

    df = pd.read_csv(csv_path, dtype={"image": str, "annotator": str})
    column = {}                                        # 'Family|Emotion' -> emotion name, None for extras

    def emotion(key):
        if key not in column:
            parsed = taxonomy.parse_key(key)
            column[key] = taxonomy.NAMES[parsed.index] if parsed.kind == "emotion" else None
        return column[key]

    records = []
    for annotator, text in zip(df["annotator"], df["annotations"]):
        scale = 7 if any(fnmatch.fnmatchcase(annotator, p) for p in rescale) else 1
        records.append({emotion(k): v * scale for k, v in ast.literal_eval(text).items() if emotion(k)})
    wide = pd.DataFrame(records, index=pd.MultiIndex.from_arrays([df["image"], df["annotator"]]))
    names = list(dict.fromkeys(df["annotator"]))
    humans = list(dict.fromkeys(df.loc[df["human"].astype(str) == "True", "annotator"]))
    per_emotion = {name: [] for name in names}
    for emotion in taxonomy.NAMES:
        table = np.clip(np.trunc(wide[emotion].unstack("annotator")), 0, 7)   # images x annotators
        pair = {}
        for a, b in itertools.combinations(names, 2):
            if a not in humans and b not in humans:
                continue
            both = table[[a, b]].dropna()
            k = np.nan
            if len(both):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")   # undefined κ: nan, as the protocol says
                    k = cohen_kappa_score(both[a].astype(int), both[b].astype(int), weights="quadratic",
                                          labels=list(range(8)))
            pair[a, b] = pair[b, a] = k
        for a in names:
            ks = [pair[a, h] for h in humans if h != a and not np.isnan(pair[a, h])]
            per_emotion[a].append(np.mean(ks) if ks else np.nan)
    return {a: float(np.nanmean(v)) for a, v in per_emotion.items()}


def bench_agreement() -> dict:
    from emonet_jax.evaluate import agreement

    models = agreement.SYNTHETIC_MODELS[:FLAGS.hq_models]
    if len(models) < FLAGS.hq_models:
        raise app.UsageError(f"--hq_models: at most {len(agreement.SYNTHETIC_MODELS)}")
    load = os.getloadavg()[0]                  # a shared machine: say how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        rows, _ = agreement.synthetic_hq(FLAGS.hq_images, seed=0, models=models)
        csv_path = agreement.write_hq_csv(rows, pathlib.Path(tmp) / "hq.csv")
        out = pathlib.Path(tmp) / "out"
        command = [sys.executable, "-m", "emonet_jax.evaluate.agreement", f"--ratings={csv_path}", f"--out={out}"]
        cli_runs, cli_cpu = [], []
        for _ in range(FLAGS.hq_cli_runs):     # a few runs: one short run can hit a busy moment
            before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            cli_runs.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI and its figure worker
            cli_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        cli_s = float(np.median(cli_runs))
        result = json.loads((out / "agreement.json").read_text())
        outputs = sorted(p.name for p in out.iterdir())
        import pandas  # noqa: F401  (imports outside the reference's timing)
        import sklearn.metrics  # noqa: F401
        start, start_cpu = time.perf_counter(), time.process_time()
        reference = reference_mean_kappas(csv_path)
        reference_s, reference_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        table = agreement.read_annotations(csv_path)
        start = time.perf_counter()
        agreement.hq_agreement(table.ratings, table.names, table.human, full=False)
        kappa_only_s = time.perf_counter() - start
    ours = {name: a["mean_kappa"] for name, a in result["annotators"].items()}
    diff = max(abs(ours[n] - reference[n]) for n in reference)
    if set(ours) != set(reference) or not diff <= 1e-9:
        raise AssertionError(f"mean κ differ from the reference by {diff}")
    experts = len({r["annotator"] for r in rows if r["human"]})
    return {"benchmark": "agreement", "images": FLAGS.hq_images, "experts": experts,
            "experts_per_image": sum(r["human"] for r in rows) // FLAGS.hq_images, "models": len(models),
            "rows": len(rows),
            "cpus": os.cpu_count(), "cli_seconds": round(cli_s, 2), "reference_seconds": round(reference_s, 2),
            "speedup": round(reference_s / cli_s, 1), "cli_seconds_each": [round(t, 2) for t in cli_runs],
            "cli_cpu_seconds": round(float(np.median(cli_cpu)), 2),
            "reference_cpu_seconds": round(reference_cpu, 2), "in_process_kappa_only_seconds": round(kappa_only_s, 3),
            "max_abs_diff_mean_kappa": diff, "load_avg_1min_at_start": round(load, 2), "outputs": outputs}


BENCHMARKS = {"pipeline": bench_pipeline, "agreement": bench_agreement}


def main(argv):
    if len(argv) != 2 or argv[1] not in BENCHMARKS:
        raise app.UsageError(f"usage: python -m emonet_jax.bench {{{'|'.join(BENCHMARKS)}}} [flags]")
    print(json.dumps(BENCHMARKS[argv[1]]()))


if __name__ == "__main__":
    app.run(main)
