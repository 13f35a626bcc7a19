"""Binary metrics: how well per-emotion scores separate the Binary experts' present/absent votes.

EmoNet-Face Binary has expert votes on only ~2 of the 40 emotions per image, so every input
comes with a `mask` [N, 40] that marks the judged (image, emotion) pairs; unjudged pairs are
neither right nor wrong and never enter a metric.

Protocol (what `binary_metrics` computes):

* Targets may be hard (0/1) or soft (the fraction of "present" votes, as `labels.BinaryLabels.
  target`). Soft targets become hard by `labels.PRESENCE_RULE`: present iff strictly more than
  half of the votes say present (1 yes of 2 is absent).
* Images are split by id into a *threshold fold* and a *test fold* with the same md5 rule the
  builders use for the Binary validation split (`emonet_jax.data.sources.in_validation`), fed
  a salted id (`THRESHOLD_SALT + image_id`) so the fold is independent of that split: the
  evaluated images are usually the held-out Binary validation split themselves
  (`binary_heldout`, 10% by image id), and half of them (`THRESHOLD_PERCENT`) choose the
  thresholds. The split depends only on the id, so it is the same on every run and machine.
* Per emotion, on the threshold fold: the threshold that maximises F1, scanning every distinct
  score (predict present iff score >= threshold); among equal F1, the highest threshold.
* Per emotion, on the test fold: ROC-AUC and average precision (threshold-free; same
  definitions as scikit-learn: AUC counts ties as 1/2, AP is the step sum over distinct
  thresholds without interpolation), F1 and accuracy at the chosen threshold.
* An emotion whose test fold holds only one class (or nothing) has no AUC/AP/F1/accuracy:
  it is listed in `skipped` and left out of the macro averages, never given a made-up 0.5.
  An emotion with no positive in its threshold fold has no threshold, hence no F1/accuracy
  (`skipped["no_threshold"]`), but keeps its AUC/AP. Macro averages are plain means over the
  emotions where the metric is defined; `macro_n_emotions` says how many that was.

Pure numpy; scikit-learn is used only by the tests, as the reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emonet_jax import labels as labels_lib
from emonet_jax import taxonomy
from emonet_jax.data import sources

# Share of the evaluated images (by salted md5 of the id) that choose the thresholds.
THRESHOLD_PERCENT = 50.0
THRESHOLD_SALT = "binary-threshold/"
# The Binary builder's VALIDATION_PERCENT (tfds_builders/emonet_face_binary); a test checks it.
BINARY_VALIDATION_PERCENT = 10.0
METRICS = ("roc_auc", "average_precision", "f1", "accuracy")


# ---------------------------------------------------------------------------
# Splits by image id.

def binary_heldout(image_ids: Sequence[str], percent: float = BINARY_VALIDATION_PERCENT) -> np.ndarray:
    """bool [N]: the images the Binary builder puts in its validation split (the evaluation part).

    Calls `sources.in_validation` exactly as the builder does, so the held-out images are the
    same whether they are read from the TFDS records or from the raw parquet.
    """
    return np.array([sources.in_validation(str(i), percent) for i in image_ids], dtype=bool)


def threshold_fold(image_ids: Sequence[str], percent: float = THRESHOLD_PERCENT) -> np.ndarray:
    """bool [N]: the images that choose the thresholds; the others are the test fold.

    The salt makes this fold independent of the validation split drawn from the same hash.
    """
    return np.array([sources.in_validation(THRESHOLD_SALT + str(i), percent) for i in image_ids],
                    dtype=bool)


# ---------------------------------------------------------------------------
# Single-emotion metrics on 1-D arrays (scores float, y bool). Callers guarantee both classes
# are present where a metric needs them.

def roc_auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Mann-Whitney form of the ROC area: ties between a positive and a negative count 1/2."""
    ranks = _average_ranks(scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each sorted element belongs to.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    run = np.cumsum(np.r_[True, sorted_x[1:] != sorted_x[:-1]]) - 1
    ends = np.r_[starts[1:], x.size]                    # exclusive
    mean_rank = (starts + 1 + ends) / 2.0               # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size)
    ranks[order] = mean_rank[run]
    return ranks


def _cumulative_counts(scores: np.ndarray, y: np.ndarray):
    """Distinct thresholds (descending) and the true/false positives at `score >= threshold`."""
    order = np.argsort(-scores, kind="mergesort")
    s, yy = scores[order], y[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]          # a threshold sits at the end of each tie run
    tp = np.cumsum(yy)[last_of_run]
    fp = np.cumsum(~yy)[last_of_run]
    return s[last_of_run], tp, fp


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    """sum_k (R_k - R_{k-1}) P_k over distinct thresholds, as scikit-learn defines it."""
    _, tp, fp = _cumulative_counts(scores, y)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(scores: np.ndarray, y: np.ndarray) -> float | None:
    """The F1-maximising threshold (highest among ties), or None if there is no positive."""
    n_pos = int(y.sum())
    if n_pos == 0:
        return None   # every threshold has F1 = 0: nothing to choose from
    thresholds, tp, fp = _cumulative_counts(scores, y)
    f1 = 2 * tp / (tp + fp + n_pos)
    # argmax returns the first maximiser, i.e. the highest threshold since they descend.
    return float(thresholds[int(np.argmax(f1))])


def f1_and_accuracy(scores: np.ndarray, y: np.ndarray, threshold: float) -> tuple[float, float]:
    predicted = scores >= threshold
    tp = int(np.sum(predicted & y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    # Callers guarantee a positive in y, so the denominator is never 0.
    return 2 * tp / (2 * tp + fp + fn), float(np.mean(predicted == y))


# ---------------------------------------------------------------------------
# Input checks.

def _validate(scores, targets, mask, image_ids):
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    mask = np.asarray(mask)
    ids = [str(i) for i in image_ids]
    E = taxonomy.NUM_EMOTIONS
    for name, a in (("scores", scores), ("targets", targets), ("mask", mask)):
        if a.ndim != 2 or a.shape[1] != E:
            raise ValueError(f"{name} must have shape [N, {E}], got {list(a.shape)}")
    if not (scores.shape[0] == targets.shape[0] == mask.shape[0] == len(ids)):
        raise ValueError(f"scores, targets, mask and image_ids disagree on N: {scores.shape[0]}, "
                         f"{targets.shape[0]}, {mask.shape[0]}, {len(ids)}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1)")
        mask = mask.astype(bool)
    _check_unique(ids)
    _check_values(scores, mask, ids, "score", lambda v: np.isfinite(v), "is not finite")
    _check_values(targets, mask, ids, "target", lambda v: (v >= 0) & (v <= 1),
                  "is not in [0, 1] (a 0/1 label or a fraction of present votes)")
    return scores, targets, mask, ids


def _check_unique(ids):
    seen = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"image id {i!r} appears more than once; the folds are drawn by id")
        seen.add(i)


def _check_values(values, mask, ids, what, ok, why):
    bad = np.argwhere(mask & ~ok(values))   # NaN compares False, so it lands here too
    if bad.size:
        n, e = bad[0]
        raise ValueError(f"{what} {float(values[n, e])!r} of image {ids[n]!r} (row {n}), emotion "
                         f"{taxonomy.NAMES[e]!r} {why}; {len(bad)} such judged entries in all")


def hard_targets(targets: np.ndarray) -> np.ndarray:
    """bool: `labels.PRESENCE_RULE` (strict majority); 0/1 targets stay as they are."""
    return 2 * np.asarray(targets, dtype=np.float64) > 1


# ---------------------------------------------------------------------------
# The evaluation.

def binary_metrics(scores, targets, mask, image_ids: Sequence[str], *,
                   fold: np.ndarray | None = None) -> dict:
    """Per-emotion and macro ROC-AUC, AP, F1 and accuracy on the Binary votes.

    Args:
      scores: float [N, 40], any score that grows with presence (probability or logit).
      targets: [N, 40], 0/1 or the fraction of "present" votes (hard by strict majority).
      mask: bool [N, 40], True where the image has votes on that emotion.
      image_ids: N distinct ids; they decide the threshold/test folds (see module doc).
      fold: optional bool [N] overriding the id-based threshold fold (True = threshold fold).

    Returns a JSON-ready dict: `per_emotion` {name: {...}}, `macro` {metric: value or None},
    `macro_n_emotions` {metric: count}, `n_images` (images with at least one vote),
    `n_threshold_images`, `n_test_images`, `n_images_without_votes`, `skipped`
    {reason: {"count", "emotions"}}, and `protocol` (a one-line reminder).
    """
    scores, targets, mask, ids = _validate(scores, targets, mask, image_ids)
    if fold is None:
        fold = threshold_fold(ids)
    fold = np.asarray(fold, dtype=bool)
    if fold.shape != (len(ids),):
        raise ValueError(f"fold must have shape [{len(ids)}], got {list(fold.shape)}")
    y = hard_targets(targets)
    has_votes = mask.any(axis=1)

    per_emotion, skipped = {}, {"no_test_examples": [], "one_class_in_test": [], "no_threshold": []}
    for e, name in enumerate(taxonomy.NAMES):
        entry, reason = _emotion_metrics(scores[:, e], y[:, e], mask[:, e], fold)
        per_emotion[name] = entry
        for r in reason:
            skipped[r].append(name)

    macro, counts = {}, {}
    for m in METRICS:
        values = [v[m] for v in per_emotion.values() if v[m] is not None]
        macro[m] = float(np.mean(values)) if values else None
        counts[m] = len(values)
    return {
        "per_emotion": per_emotion,
        "macro": macro,
        "macro_n_emotions": counts,
        "n_images": int(has_votes.sum()),
        "n_threshold_images": int((has_votes & fold).sum()),
        "n_test_images": int((has_votes & ~fold).sum()),
        "n_images_without_votes": int((~has_votes).sum()),
        "skipped": {r: {"count": len(names), "emotions": names} for r, names in skipped.items()},
        "protocol": ("threshold = F1-maximising score on the threshold fold (salted md5 of the "
                     f"image id, {THRESHOLD_PERCENT:g}%); metrics on the other images; targets "
                     f"hard by {labels_lib.PRESENCE_RULE!r}"),
    }


def _emotion_metrics(s, y, judged, fold):
    """Metrics of one emotion and the skip reasons that apply to it."""
    val, test = judged & fold, judged & ~fold
    s_test, y_test = s[test], y[test]
    n_pos = int(y_test.sum())
    entry = {"n_test": int(test.sum()), "n_test_positive": n_pos,
             "n_threshold": int(val.sum()), "n_threshold_positive": int(y[val].sum()),
             "threshold": best_f1_threshold(s[val], y[val])}
    entry.update(dict.fromkeys(METRICS))
    if entry["n_test"] == 0:
        return entry, ["no_test_examples"]
    if n_pos == 0 or n_pos == entry["n_test"]:
        return entry, ["one_class_in_test"]
    entry["roc_auc"] = roc_auc(s_test, y_test)
    entry["average_precision"] = average_precision(s_test, y_test)
    if entry["threshold"] is None:
        return entry, ["no_threshold"]
    entry["f1"], entry["accuracy"] = f1_and_accuracy(s_test, y_test, entry["threshold"])
    return entry, []


# ---------------------------------------------------------------------------
# Report.

def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def markdown_table(result: dict) -> str:
    """A Markdown table: one row per emotion (taxonomy order), then the macro row."""
    lines = ["| Emotion | test n (pos) | ROC-AUC | AP | F1 | Acc. | threshold |",
             "|---|---|---|---|---|---|---|"]
    for name, m in result["per_emotion"].items():
        cells = [_fmt(m[k]) for k in METRICS]
        lines.append(f"| {name} | {m['n_test']} ({m['n_test_positive']}) | "
                     + " | ".join(cells) + f" | {_fmt(m['threshold'])} |")
    macro, counts = result["macro"], result["macro_n_emotions"]
    cells = [f"**{_fmt(macro[k])}** ({counts[k]})" for k in METRICS]
    lines.append(f"| **Macro** (emotions) | {result['n_test_images']} images | " + " | ".join(cells) + " | |")
    notes = [f"{r.replace('_', ' ')}: {v['count']} ({', '.join(v['emotions'])})"
             for r, v in result["skipped"].items() if v["count"]]
    lines.append("")
    lines.append(f"Images with votes: {result['n_images']} ({result['n_threshold_images']} choose "
                 f"thresholds, {result['n_test_images']} are scored).")
    if notes:
        lines.append("Skipped emotions — " + "; ".join(notes) + ".")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# CLI: a training run scored on the held-out Binary split.

def score_split(run, source, batch_size: int = 64) -> dict:
    """Presence probabilities of a `inference.Run` on every row of a Binary split."""
    from emonet_jax.data import pipeline
    ids, targets, masks, scores = [], [], [], []
    for start in range(0, len(source), batch_size):
        rows = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        images = np.stack([pipeline.resize(r["image"], run.image_size) for r in rows])
        scores.append(run.predict(images)["presence"])
        ids += [pipeline.as_text(r["image_id"]) for r in rows]
        targets.append(np.stack([r["binary_target"] for r in rows]))
        masks.append(np.stack([r["binary_mask"] for r in rows]))
    return {"image_ids": ids, "scores": np.concatenate(scores), "targets": np.concatenate(targets),
            "mask": np.concatenate(masks)}


def main(argv=None) -> int:
    import argparse
    import json
    import pathlib
    parser = argparse.ArgumentParser(prog="python -m emonet_jax.evaluate.binary",
                                     description="Binary metrics of a training run on the held-out Binary split.")
    parser.add_argument("--workdir", required=True, help="the training run (WORKDIR/config.json + checkpoints)")
    parser.add_argument("--data_dir", required=True, help="TFDS data dir with the prepared emonet_face_binary")
    parser.add_argument("--resolution", type=int, default=224, help="builder config of the records")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from emonet_jax import inference
    from emonet_jax.data import pipeline
    run = inference.Run.load(args.workdir)
    source = pipeline.open_split(f"emonet_face_binary/{args.resolution}", args.split, args.data_dir)
    scored = score_split(run, source)
    result = binary_metrics(scored["scores"], scored["targets"], scored["mask"], scored["image_ids"])
    result["source"] = {"workdir": str(args.workdir), "split": f"emonet_face_binary/{args.resolution}:{args.split}"}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "binary.json").write_text(json.dumps(result, indent=1))
    (out / "binary.md").write_text(markdown_table(result))
    print(markdown_table(result))
    print(f"wrote {out / 'binary.json'} and {out / 'binary.md'}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
