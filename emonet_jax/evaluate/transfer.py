"""Transfer to real faces: scoring the 40 emotion heads on FERD and AffectNet's 8 basic classes.

    python -m emonet_jax.evaluate.transfer --scores=FILE.jsonl --dataset=ferd|affectnet --out=DIR
        [--mappings=FILE] [--strict]

Provenance: the head -> class mappings (`transfer_mappings.json`, packaged beside this file),
AffectNet's label ids, FERD's file-name rule and the scoring rule come from the EmoNet-Face
authors' `eval/config.py` and `eval/eval.ipynb` (github.com/LAION-AI/emonet-face; code MIT,
data CC BY 4.0; attribute the EmoNet-Face paper, arXiv 2505.20033). This module is our own
implementation of that protocol; no code was copied.

Protocol (as the published notebook computes it):

* Each emotion head `model_<slug>_best` maps to one of 8 classes, per dataset (the FERD and
  AffectNet maps differ). A head mapped to null is unmapped and takes no part.
* Per image: softmax over the mapped heads' `mean_subtracted` scores; with M mapped heads
  (40 in both published maps) the cutoff is 1.5 / M. The image is correct iff some head mapped
  to its ground-truth class has probability > cutoff (so more than one class can "win").
* Per-class accuracy over the images of each class; `mean_per_class_accuracy` is their mean.
  `overall_accuracy` is the image-weighted accuracy, which is what the published notebook
  prints as "Mean Acc." (equal to the class mean on the balanced FERD, not on AffectNet).

Checked against the authors' own FERD score file (`eval/results/ferd.jsonl`, 152 images, not
shipped here): this module gives exactly their published FERD column, per class and mean 0.7829.

Where we differ from the notebook, on purpose: it counts an image without usable scores or
ground truth as wrong; here such an image is skipped and reported (`skipped` in the output,
with line numbers). Images of a class that no head maps to are skipped the same way and the
class is listed in `classes_without_mapped_head`: they could never be right, and hiding them
in the accuracy would blame the model for the map. Unknown head names that are not one of the
four extra dimensions (valence, arousal, dominance, emotional vulnerability) are an error.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from emonet_jax import taxonomy

MAPPINGS_FILE = pathlib.Path(__file__).with_name("transfer_mappings.json")
DATASETS = ("ferd", "affectnet")
# Alphabetical, as the published table and AffectNet's ids (0 anger ... 7 surprise) order them.
CLASSES = ("anger", "contempt", "disgust", "fear", "happy", "neutral", "sad", "surprise")
CUTOFF_NUMERATOR = 1.5
# Heads of the published score files that are not emotions; ignored (and counted).
EXTRA_HEADS = frozenset(f"model_{taxonomy.slugify(n)}_best" for n in taxonomy.EXTRA_NAMES)
# FERD spells one class differently from AffectNet.
CLASS_ALIASES = {"surprised": "surprise"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_DETAILS = 20   # per skip reason, in transfer.json; line numbers are always complete


class TransferError(ValueError):
    """Input that cannot be scored; the message names the file, line and key."""


# ---------------------------------------------------------------------------
# Mappings.

@dataclasses.dataclass(frozen=True)
class TransferMapping:
    dataset: str
    head_class: tuple[str | None, ...]     # per taxonomy index; None = unmapped
    affectnet_labels: dict[int, str]
    source: str

    @property
    def mapped(self) -> np.ndarray:
        return np.array([c is not None for c in self.head_class])

    @property
    def n_mapped(self) -> int:
        return int(self.mapped.sum())

    @property
    def cutoff(self) -> float:
        return CUTOFF_NUMERATOR / self.n_mapped

    def classes_without_head(self) -> list[str]:
        return [c for c in CLASSES if c not in self.head_class]


def load_mapping(dataset: str, path=None) -> TransferMapping:
    """The `dataset` map from `path` (default: the packaged copy of the published file).

    The file is the published layout: {"ferd": {head: class}, "affectnet": {...},
    "affectnet_label_ids": {"0": class, ...}}; a user file may also be a bare {head: class}.
    Every one of the 40 heads must appear (null leaves it unmapped), so a typo cannot
    silently drop a head.
    """
    if dataset not in DATASETS:
        raise TransferError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    where = str(path) if path else f"packaged {MAPPINGS_FILE.name}"
    try:
        data = json.loads(pathlib.Path(path or MAPPINGS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise TransferError(f"{where}: cannot read the mapping file: {e}") from None
    if not isinstance(data, dict):
        raise TransferError(f"{where}: expected a JSON object")
    heads = data.get(dataset, data if _looks_like_head_map(data) else None)
    if not isinstance(heads, dict):
        raise TransferError(f"{where}: no {dataset!r} head map (expected a key {dataset!r} or a bare head map)")
    default_ids = json.loads(MAPPINGS_FILE.read_text())["affectnet_label_ids"]
    return TransferMapping(
        dataset=dataset,
        head_class=_parse_head_map(heads, f"{where} [{dataset!r}]"),
        affectnet_labels=_parse_label_ids(data.get("affectnet_label_ids", default_ids), where),
        source=where)


def _looks_like_head_map(data: dict) -> bool:
    return bool(data) and all(str(k).startswith("model_") for k in data)


def _parse_head_map(heads: dict, where: str) -> tuple[str | None, ...]:
    out: list[str | None] = [None] * taxonomy.NUM_EMOTIONS
    seen: dict[int, str] = {}
    for key, value in heads.items():
        try:
            index = taxonomy.emotion_index(key)
        except taxonomy.UnknownEmotionError as e:
            raise TransferError(f"{where}: key {key!r}: {e}") from None
        if index in seen:
            raise TransferError(f"{where}: keys {seen[index]!r} and {key!r} are the same head")
        seen[index] = key
        if value is not None and value not in CLASSES:
            raise TransferError(f"{where}: key {key!r} maps to {value!r}, not one of {list(CLASSES)} or null")
        out[index] = value
    missing = [h for i, h in enumerate(taxonomy.HEAD_NAMES) if i not in seen]
    if missing:
        raise TransferError(f"{where}: heads {missing} are missing (map a head to null to leave it out)")
    if not any(out):
        raise TransferError(f"{where}: no head is mapped to a class")
    return tuple(out)


def _parse_label_ids(ids, where: str) -> dict[int, str]:
    if not isinstance(ids, dict):
        raise TransferError(f"{where}: 'affectnet_label_ids' must be an object")
    out = {}
    for key, value in ids.items():
        if not str(key).strip().lstrip("-").isdigit() or value not in CLASSES:
            raise TransferError(f"{where}: affectnet_label_ids entry {key!r}: {value!r} is not "
                                f"an integer id -> one of {list(CLASSES)}")
        out[int(key)] = value
    return out


# ---------------------------------------------------------------------------
# Ground truth.

def normalize_class(token) -> str | None:
    """A class from a name in any case ('Surprised' -> 'surprise'), or None if unknown."""
    name = str(token).strip().lower()
    name = CLASS_ALIASES.get(name, name)
    return name if name in CLASSES else None


def ferd_token(path) -> str:
    """The last '_'-separated token of the file name, extension dropped ('0000_Happy.jpg' -> 'Happy')."""
    name = pathlib.PurePath(str(path).replace("\\", "/")).name
    return name.rsplit("_", 1)[-1].split(".")[0]


def ferd_class(path) -> str | None:
    return normalize_class(ferd_token(path))


def label_class(value, dataset: str, mapping: TransferMapping) -> str | None:
    """Class of a folder name or CSV label: a class name, or for AffectNet an integer id."""
    if dataset == "affectnet" and not isinstance(value, bool):
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            return mapping.affectnet_labels.get(int(text))
    return normalize_class(value)


# ---------------------------------------------------------------------------
# Scoring.

def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))   # shift for stability only
    return z / z.sum(axis=axis, keepdims=True)


def correct(mean_subtracted: np.ndarray, truth: Sequence[str], mapping: TransferMapping) -> np.ndarray:
    """bool [N]: the protocol's verdict for each image (scores [N, 40] in taxonomy order)."""
    cols = np.flatnonzero(mapping.mapped)
    probs = softmax(np.asarray(mean_subtracted, dtype=np.float64)[:, cols], axis=1)
    head_class = np.array([mapping.head_class[c] for c in cols])
    own_class = head_class[None, :] == np.asarray(truth, dtype=object)[:, None]
    return np.any(own_class & (probs > mapping.cutoff), axis=1)


@dataclasses.dataclass
class Skips:
    """Lines that were not scored, by reason; `strict` turns the first one into an error."""
    where: str
    strict: bool = False
    lines: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    details: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def add(self, reason: str, line: int, detail: str) -> None:
        """Records a skipped line (returns None, so parsers can `return skips.add(...)`)."""
        if self.strict:
            raise TransferError(f"{self.where}:{line}: {detail} ({reason}; drop --strict to skip and count it)")
        self.lines[reason].append(line)
        if len(self.details[reason]) < MAX_DETAILS:
            self.details[reason].append(f"line {line}: {detail}")

    def as_dict(self) -> dict:
        return {r: {"count": len(v), "lines": v, "details": self.details[r]} for r, v in self.lines.items()}


@dataclasses.dataclass
class ScoreTable:
    mean_subtracted: np.ndarray        # float [N, 40], NaN where a head is absent (unmapped)
    truth: list[str]
    lines: list[int]
    n_lines: int
    skips: Skips
    ignored_extra_heads: dict[str, int]


def read_scores_jsonl(path, dataset: str, mapping: TransferMapping, strict: bool = False) -> ScoreTable:
    """Reads the published per-image score format, one JSON object per line.

    A line is `{"image_path": ... or "label": int, "results": {head: {"mean_subtracted": x, ...}}}`.
    Unknown heads raise `TransferError`; every other problem skips the line under a reason
    (see module doc), or raises with `strict`.
    """
    skips = Skips(str(path), strict)
    rows, truth, lines, extra = [], [], [], collections.Counter()
    seen_paths: dict[str, int] = {}
    n = 0
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            parsed = _parse_line(text, n, dataset, mapping, skips, extra, seen_paths, str(path))
            if parsed is not None:
                rows.append(parsed[0])
                truth.append(parsed[1])
                lines.append(n)
    scores = np.array(rows, dtype=np.float64).reshape(-1, taxonomy.NUM_EMOTIONS)
    return ScoreTable(scores, truth, lines, n, skips, dict(sorted(extra.items())))


def _parse_line(text, n, dataset, mapping, skips, extra, seen_paths, where):
    """(scores [40], class) of one line, or None after recording why it was skipped."""
    if not text.strip():
        return skips.add("blank_line", n, "empty line")
    try:
        record = json.loads(text)
    except ValueError as e:
        return skips.add("bad_json", n, f"not JSON: {e}")
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        return skips.add("missing_results", n, "no 'results' object")
    scores = _line_scores(record["results"], n, mapping, skips, extra, where)
    if scores is None:
        return None
    truth = _line_truth(record, n, dataset, mapping, skips)
    if truth is None:
        return None
    image = record.get("image_path")
    if isinstance(image, str):
        if image in seen_paths:
            return skips.add("duplicate_image", n, f"{image!r} already scored on line {seen_paths[image]}")
        seen_paths[image] = n
    return scores, truth


def _line_scores(results, n, mapping, skips, extra, where):
    scores = np.full(taxonomy.NUM_EMOTIONS, np.nan)
    keys: dict[int, str] = {}
    bad: list[str] = []
    for key, entry in results.items():
        if str(key).lower() in EXTRA_HEADS:
            extra[str(key)] += 1
            continue
        try:
            index = taxonomy.emotion_index(key)
        except taxonomy.UnknownEmotionError:
            raise TransferError(
                f"{where}:{n}: unknown head {key!r} in 'results'; expected the 40 emotion heads "
                f"'model_<slug>_best' or an extra head {sorted(EXTRA_HEADS)}") from None
        if index in keys:
            raise TransferError(f"{where}:{n}: heads {keys[index]!r} and {key!r} are the same emotion")
        keys[index] = key
        value = entry.get("mean_subtracted") if isinstance(entry, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            bad.append(f"{key!r} has no finite 'mean_subtracted' (got {value!r})")
        else:
            scores[index] = value
    # Only after every key was checked, so an unknown head is an error on any line.
    if bad:
        return skips.add("bad_score", n, "; ".join(bad[:3]))
    missing = [taxonomy.HEAD_NAMES[i] for i in np.flatnonzero(mapping.mapped & np.isnan(scores))]
    if missing:
        return skips.add("missing_heads", n, f"{len(missing)} mapped heads missing, e.g. {missing[:3]}")
    return scores


def _line_truth(record, n, dataset, mapping, skips):
    if dataset == "ferd":
        image = record.get("image_path")
        if not isinstance(image, str) or not image.strip():
            return skips.add("missing_ground_truth", n, "no 'image_path' to read the FERD class from")
        cls = ferd_class(image)
        if cls is None:
            return skips.add("unknown_class", n,
                             f"{image!r}: class token {ferd_token(image)!r} is not one of {list(CLASSES)}")
    else:
        label = record.get("label")
        if label is None:
            return skips.add("missing_ground_truth", n, "no 'label'")
        ok = isinstance(label, int) and not isinstance(label, bool)
        cls = mapping.affectnet_labels.get(label) if ok else None
        if cls is None:
            return skips.add("unknown_class", n, f"label {label!r} is not one of the AffectNet ids "
                                                 f"{sorted(mapping.affectnet_labels)}")
    if cls not in mapping.head_class:
        return skips.add("class_without_mapped_head", n, f"class {cls!r} has no mapped head in the {dataset} map")
    return cls


def summarize(table: ScoreTable, mapping: TransferMapping) -> dict:
    """The transfer.json dict for a read score file."""
    ok = correct(table.mean_subtracted, table.truth, mapping) if table.truth else np.zeros(0, bool)
    truth = np.asarray(table.truth, dtype=object)
    per_class, per_n = {}, {}
    for c in CLASSES:
        of_class = truth == c
        per_n[c] = int(of_class.sum())
        per_class[c] = float(ok[of_class].mean()) if per_n[c] else None
    defined = [v for v in per_class.values() if v is not None]
    return {
        "dataset": mapping.dataset,
        "n": int(ok.size),
        "n_correct": int(ok.sum()),
        "per_class_accuracy": per_class,
        "per_class_n": per_n,
        "mean_per_class_accuracy": float(np.mean(defined)) if defined else None,
        "n_classes_in_mean": len(defined),
        "overall_accuracy": float(ok.mean()) if ok.size else None,
        "classes_without_mapped_head": mapping.classes_without_head(),
        "classes_without_images": [c for c in CLASSES if per_n[c] == 0],
        "n_mapped_heads": mapping.n_mapped,
        "unmapped_heads": [h for h, c in zip(taxonomy.HEAD_NAMES, mapping.head_class) if c is None],
        "cutoff": mapping.cutoff,
        "ignored_extra_heads": table.ignored_extra_heads,
        "n_lines": table.n_lines,
        "skipped": table.skips.as_dict(),
        "mapping_file": mapping.source,
        "protocol": json.loads(MAPPINGS_FILE.read_text())["protocol"],
    }


def evaluate_scores_file(path, dataset: str, mappings=None, strict: bool = False) -> dict:
    mapping = load_mapping(dataset, mappings)
    result = summarize(read_scores_jsonl(path, dataset, mapping, strict), mapping)
    result["scores_file"] = str(path)
    return result


# ---------------------------------------------------------------------------
# Report.

def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


def markdown_table(result: dict) -> str:
    """The paper's layout: one row per dataset, the classes as columns, then Avg. and Overall."""
    name = {"ferd": "FERD", "affectnet": "AffectNet"}[result["dataset"]]
    head = ["Dataset", "n", *(c.capitalize() for c in CLASSES), "Avg.", "Overall"]
    cells = [name, str(result["n"]), *(_fmt(result["per_class_accuracy"][c]) for c in CLASSES),
             f"**{_fmt(result['mean_per_class_accuracy'])}**", _fmt(result["overall_accuracy"])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |", ""]
    lines.append(f"Avg. = mean of the {result['n_classes_in_mean']} per-class accuracies; Overall = "
                 "image-weighted accuracy (the published notebook's \"Mean Acc.\"). Correct = some "
                 f"head of the true class has softmax > 1.5/{result['n_mapped_heads']} over the mapped "
                 "heads' mean-subtracted scores.")
    if result["classes_without_mapped_head"]:
        lines.append(f"No head maps to: {', '.join(result['classes_without_mapped_head'])} "
                     "(their images are skipped, not counted wrong).")
    if result["skipped"]:
        parts = [f"{r.replace('_', ' ')}: {v['count']}" for r, v in result["skipped"].items()]
        lines.append(f"Skipped lines ({result['n_lines']} read): " + "; ".join(parts) + " (see transfer.json).")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir) -> tuple[pathlib.Path, pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "transfer.json", out / "transfer.md"
    js.write_text(json.dumps(result, indent=1) + "\n")
    md.write_text(markdown_table(result))
    return js, md


# ---------------------------------------------------------------------------
# Writing our own model's scores in the published format.

def write_scores_jsonl(image_paths: Sequence, scores_raw, reference_means, out, labels=None) -> pathlib.Path:
    """Writes one published-format line per image, for `--scores`.

    scores_raw: float [N, 40], the heads' raw outputs in taxonomy order.
    reference_means: float [40], the per-head mean of the raw scores over a reference image
      set; `mean_subtracted = raw - reference_means`. (In the published files the offsets are
      the same for every image but are not the evaluated set's own mean, so the reference set
      is the caller's choice: document it with the results.)
    labels: optional N AffectNet ids, written as "label".
    Each line's "results" is `published_results`.
    """
    raw = np.asarray(scores_raw, dtype=np.float64)
    means = np.asarray(reference_means, dtype=np.float64)
    E = taxonomy.NUM_EMOTIONS
    if raw.ndim != 2 or raw.shape[1] != E or means.shape != (E,):
        raise ValueError(f"scores_raw must be [N, {E}] and reference_means [{E}]; got "
                         f"{list(raw.shape)} and {list(means.shape)}")
    if len(image_paths) != raw.shape[0] or (labels is not None and len(labels) != raw.shape[0]):
        raise ValueError(f"{raw.shape[0]} score rows but {len(image_paths)} image paths"
                         + ("" if labels is None else f" and {len(labels)} labels"))
    if not (np.isfinite(raw).all() and np.isfinite(means).all()):
        raise ValueError("scores_raw and reference_means must be finite")
    results = published_results(raw, means)
    out = pathlib.Path(out)
    with open(out, "w", encoding="utf-8") as f:
        for i, path in enumerate(image_paths):
            record = {"image_path": str(path)}
            if labels is not None:
                record["label"] = int(labels[i])
            record["results"] = results[i]
            f.write(json.dumps(record) + "\n")
    return out


def published_results(scores_raw, reference_means) -> list[dict]:
    """Per image, the published "results" object: {head: {"raw", "mean_subtracted", "softmax"}}
    for the 40 heads in taxonomy order (raw [N, 40], means [40]; computed in float64).

    mean_subtracted = raw - means. "softmax" is the softmax over the 40 heads' mean-subtracted
    scores, which is what the published files hold (checked on their FERD file to 1e-8; over raw
    it is off by 0.04). The scoring never reads it: it takes its own softmax over the mapped heads.
    """
    raw = np.asarray(scores_raw, dtype=np.float64)
    centred = raw - np.asarray(reference_means, dtype=np.float64)
    probs = softmax(centred, axis=1)
    return [{h: {"raw": float(raw[i, e]), "mean_subtracted": float(centred[i, e]), "softmax": float(probs[i, e])}
             for e, h in enumerate(taxonomy.HEAD_NAMES)} for i in range(len(raw))]


# ---------------------------------------------------------------------------
# Ground truth of an image folder (for --images).

@dataclasses.dataclass
class LabeledImages:
    paths: list[str]
    classes: list[str]
    skipped: list[str]        # 'where: why', one per image or row left out


def images_from_ferd_dir(directory) -> LabeledImages:
    """FERD naming: every image directly in `directory` is `<anything>_<Class>.<ext>`."""
    out = LabeledImages([], [], [])
    for p in _images_in(directory):
        cls = ferd_class(p.name)
        if cls is None:
            out.skipped.append(f"{p}: class token {ferd_token(p.name)!r} is not one of {list(CLASSES)}")
        else:
            out.paths.append(str(p))
            out.classes.append(cls)
    return out


def images_from_class_folders(directory, dataset: str, mapping: TransferMapping) -> LabeledImages:
    """One sub-folder per class, named by the class (any case) or, for AffectNet, its id."""
    out = LabeledImages([], [], [])
    root = pathlib.Path(directory)
    for p in _images_in(root):
        out.skipped.append(f"{p}: not inside a class folder")
    for sub in sorted(d for d in root.iterdir() if d.is_dir()):
        cls = label_class(sub.name, dataset, mapping)
        images = _images_in(sub)
        if cls is None:
            out.skipped.extend(f"{p}: folder {sub.name!r} is not a class" for p in images)
            continue
        out.paths.extend(str(p) for p in images)
        out.classes.extend([cls] * len(images))
    return out


def images_from_csv(csv_path, dataset: str, mapping: TransferMapping) -> LabeledImages:
    """A CSV with columns `path,label` (relative paths are relative to the CSV's folder)."""
    out = LabeledImages([], [], [])
    csv_path = pathlib.Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise TransferError(f"{csv_path}: columns {reader.fieldnames} lack 'path' and 'label'")
        for row in reader:
            where = f"{csv_path}:{reader.line_num}"
            cls = label_class(row["label"] or "", dataset, mapping)
            path = csv_path.parent / (row["path"] or "").strip()
            if cls is None:
                out.skipped.append(f"{where}: label {row['label']!r} is not a {dataset} class")
            elif not (row["path"] or "").strip() or not path.is_file():
                out.skipped.append(f"{where}: image {row['path']!r} not found")
            else:
                out.paths.append(str(path))
                out.classes.append(cls)
    return out


def read_labeled_images(images, dataset: str, mapping: TransferMapping, layout: str = "auto") -> LabeledImages:
    """Dispatches on `layout`: 'csv', 'folders', 'ferd', or 'auto' (a .csv file, a folder with
    sub-folders, else FERD naming)."""
    p = pathlib.Path(images)
    if not p.exists():
        raise TransferError(f"--images {p}: no such file or folder")
    if layout == "auto":
        layout = "csv" if p.is_file() else "folders" if any(d.is_dir() for d in p.iterdir()) else "ferd"
    if layout == "csv":
        return images_from_csv(p, dataset, mapping)
    if layout == "folders":
        return images_from_class_folders(p, dataset, mapping)
    if layout == "ferd":
        return images_from_ferd_dir(p)
    raise TransferError(f"unknown layout {layout!r}; expected auto, csv, folders or ferd")


def _images_in(directory) -> list[pathlib.Path]:
    return sorted(p for p in pathlib.Path(directory).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ---------------------------------------------------------------------------
# CLI.

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emonet_jax.evaluate.transfer", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scores", help="per-image scores, published JSONL format")
    src.add_argument("--images", help="image folder (FERD naming or one folder per class) or a path,label CSV")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--out", required=True, help="folder for transfer.json and transfer.md")
    p.add_argument("--mappings", default=None, help=f"head -> class map (default: packaged {MAPPINGS_FILE.name})")
    p.add_argument("--strict", action="store_true", help="a malformed line is an error, not a counted skip")
    p.add_argument("--workdir", default=None, help="with --images: the training run whose checkpoint scores them")
    p.add_argument("--layout", default="auto", choices=("auto", "ferd", "folders", "csv"), help="with --images")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.images is not None:
            return _images_mode(args)
        return main_scores(args)
    except (TransferError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def main_scores(args) -> int:
    result = evaluate_scores_file(args.scores, args.dataset, args.mappings, args.strict)
    js, md = write_outputs(result, args.out)
    skipped = sum(v["count"] for v in result["skipped"].values())
    print(markdown_table(result))
    print(f"wrote {js} and {md}; {result['n']} images scored, {skipped} lines skipped")
    if result["n"] == 0:
        print("error: no image could be scored", file=sys.stderr)
        return 1
    return 0


def _images_mode(args) -> int:
    if args.workdir is None:
        raise SystemExit("error: --images needs --workdir (the training run whose checkpoint scores the images)")
    from emonet_jax import inference  # JAX and the model only when images are scored here
    mapping = load_mapping(args.dataset, args.mappings)
    found = read_labeled_images(args.images, args.dataset, mapping, args.layout)
    run = inference.Run.load(args.workdir)
    means, means_source = inference.reference_means(args.workdir)
    images, kept, errors = inference.read_images(found.paths, run.image_size)
    for line in found.skipped + errors:
        print(f"skipped {line}", file=sys.stderr)
    if not kept:
        raise SystemExit(f"error: no readable labelled image in {args.images}")
    raw = run.predict(images)["intensity"]
    paths = [found.paths[i] for i in kept]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = None
    if args.dataset == "affectnet":  # AffectNet's ground truth travels as the integer label
        ids = {name: i for i, name in mapping.affectnet_labels.items()}
        labels = [ids[found.classes[i]] for i in kept]
    scores = write_scores_jsonl(paths, raw, means, out / "scores.jsonl", labels=labels)
    print(f"scored {len(paths)} images with {args.workdir} (means subtracted: {means_source}); "
          f"{len(found.skipped) + len(errors)} left out; scores in {scores}")
    args.scores, args.images = str(scores), None
    return main_scores(args)


if __name__ == "__main__":
    sys.exit(main())
