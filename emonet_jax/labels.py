"""Label semantics: from raw expert ratings and votes to training targets.

Three kinds of supervision, one representation per kind:

* Ratings (HQ experts, Big's VLM): every rater gives each emotion an intensity 0..7.
  We keep the raw `ratings` [MAX_RATERS, 40] (-1 = not rated) with a `rater_mask`, because
  the agreement evaluation compares raters, and derive the `soft_label` [40, 8]: for each
  emotion, the distribution of the raters' intensities (a fractional rating r is split
  between floor(r) and ceil(r) in proportion, so the mean of the distribution is the mean
  rating). `mean_intensity` [40] is that mean.
* Binary votes (Binary experts): per (image, emotion) up to 3 present/absent votes. The
  soft target is the fraction of "present" votes; the hard label follows PRESENCE_RULE;
  `binary_mask` marks the emotions somebody judged (2 of 40 per image in the real data).

Invalid input raises `LabelError`; callers add the row or line that carried it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from emonet_jax import taxonomy

NUM_LEVELS = 8        # intensities 0..7
MAX_INTENSITY = NUM_LEVELS - 1
MAX_RATERS = 4        # HQ: 4 experts per image; Big: 1 VLM in row 0.

PRESENCE_RULE = "present iff more than half of the votes say present (strict majority)"


class LabelError(ValueError):
    """A rating, vote or key that cannot become a label."""


@dataclasses.dataclass(frozen=True)
class RatingLabels:
    ratings: np.ndarray          # int32 [MAX_RATERS, 40], -1 where not rated
    rater_mask: np.ndarray       # bool [MAX_RATERS]
    raters: tuple[str, ...]      # MAX_RATERS names, '' for empty slots
    soft_label: np.ndarray       # float32 [40, NUM_LEVELS]
    soft_label_mask: np.ndarray  # bool [40]: at least one rating
    mean_intensity: np.ndarray   # float32 [40]
    extra: np.ndarray            # float32 [4]: mean over raters of the extra dimensions
    extra_mask: np.ndarray       # bool [4]


@dataclasses.dataclass(frozen=True)
class BinaryLabels:
    votes: np.ndarray            # int32 [40]: number of votes
    yes: np.ndarray              # int32 [40]: number of "present" votes
    target: np.ndarray           # float32 [40]: yes / votes (0 where no votes)
    present: np.ndarray          # bool [40]: PRESENCE_RULE
    mask: np.ndarray             # bool [40]: votes > 0


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        try:
            value = float(str(value).strip())
        except ValueError:
            raise LabelError(f"{what}: {value!r} is not a number") from None
    value = float(value)
    if not math.isfinite(value):
        raise LabelError(f"{what}: {value!r} is not a finite number")
    return value


def _intensity(value: Any, what: str, integer: bool) -> float:
    value = _number(value, what)
    if not 0 <= value <= MAX_INTENSITY:
        raise LabelError(f"{what}: rating {value:g} is outside 0..{MAX_INTENSITY}")
    if integer and value != int(value):
        raise LabelError(f"{what}: rating {value:g} is not an integer")
    return value


def soft_label(ratings: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Distribution over intensity levels per emotion, averaged over valid raters.

    ratings: [R, E] in 0..7 (fractions allowed); valid: [R, E] bool. Emotions with no
    valid rating get an all-zero row.
    """
    ratings = np.where(valid, ratings, 0.0).astype(np.float64)
    low = np.floor(ratings).astype(np.int64)
    high = np.minimum(low + 1, MAX_INTENSITY)
    frac = ratings - low
    dist = np.zeros(ratings.shape + (NUM_LEVELS,))
    np.put_along_axis(dist, low[..., None], (1 - frac)[..., None], axis=-1)
    # `+=` through take/put: high == low only when frac == 0, which adds nothing.
    upper = np.take_along_axis(dist, high[..., None], axis=-1) + frac[..., None]
    np.put_along_axis(dist, high[..., None], upper, axis=-1)
    dist *= valid[..., None]
    count = valid.sum(axis=0)[:, None]
    return (dist.sum(axis=0) / np.maximum(count, 1)).astype(np.float32)


def rating_labels(per_rater: Mapping[str, Mapping[str, Any]], *, integer: bool = True) -> RatingLabels:
    """Labels from `{rater: {'Family|Emotion': rating}}` (the published HQ layout).

    `integer=True` (experts) requires whole intensities; `False` (VLM labels) accepts
    fractions in 0..7. Extra-dimension keys must lie in their documented range.
    """
    if not per_rater:
        raise LabelError("no rater in the annotations")
    if len(per_rater) > MAX_RATERS:
        raise LabelError(f"{len(per_rater)} raters, at most {MAX_RATERS} are supported: {sorted(per_rater)}")
    E, X = taxonomy.NUM_EMOTIONS, taxonomy.NUM_EXTRA_DIMENSIONS
    ratings = np.full((MAX_RATERS, E), -1.0)
    extra = np.full((MAX_RATERS, X), np.nan)
    raters = []
    for r, (rater, scores) in enumerate(per_rater.items()):
        if not isinstance(scores, Mapping):
            raise LabelError(f"rater {rater!r}: expected a mapping of 'Family|Emotion' keys, got {type(scores).__name__}")
        raters.append(str(rater))
        for key, value in scores.items():
            try:
                parsed = taxonomy.parse_key(key)
            except taxonomy.UnknownEmotionError as e:
                raise LabelError(f"rater {rater!r}: {e}") from None
            what = f"rater {rater!r}, key {key!r}"
            if parsed.kind == "extra":
                dim = taxonomy.EXTRA_DIMENSIONS[parsed.index]
                v = _number(value, what)
                if not dim.low <= v <= dim.high:
                    raise LabelError(f"{what}: {v:g} is outside {dim.low:g}..{dim.high:g}")
                extra[r, parsed.index] = v
                continue
            if ratings[r, parsed.index] >= 0:
                raise LabelError(f"{what}: emotion {taxonomy.NAMES[parsed.index]!r} is rated twice")
            ratings[r, parsed.index] = _intensity(value, what, integer)
    valid = ratings >= 0
    if not valid.any():
        raise LabelError(f"raters {raters} rated no emotion")
    extra_mask = ~np.isnan(extra).all(axis=0)
    return RatingLabels(
        # Experts' ratings are whole already; a fractional VLM rating keeps its floor here
        # (the soft label and the mean keep the fraction).
        ratings=np.where(valid, np.floor(ratings), -1).astype(np.int32),
        rater_mask=np.arange(MAX_RATERS) < len(raters),
        raters=tuple(raters) + ("",) * (MAX_RATERS - len(raters)),
        soft_label=soft_label(ratings, valid),
        soft_label_mask=valid.any(axis=0),
        mean_intensity=(np.where(valid, ratings, 0).sum(0) / np.maximum(valid.sum(0), 1)).astype(np.float32),
        extra=np.where(extra_mask, np.nanmean(np.where(extra_mask, extra, 0.0), axis=0), 0.0).astype(np.float32),
        extra_mask=extra_mask,
    )


def empty_rating_labels() -> RatingLabels:
    """Rating fields of an image that has no ratings (a Binary image)."""
    E = taxonomy.NUM_EMOTIONS
    return RatingLabels(
        ratings=np.full((MAX_RATERS, E), -1, np.int32), rater_mask=np.zeros(MAX_RATERS, bool),
        raters=("",) * MAX_RATERS, soft_label=np.zeros((E, NUM_LEVELS), np.float32),
        soft_label_mask=np.zeros(E, bool), mean_intensity=np.zeros(E, np.float32),
        extra=np.zeros(taxonomy.NUM_EXTRA_DIMENSIONS, np.float32),
        extra_mask=np.zeros(taxonomy.NUM_EXTRA_DIMENSIONS, bool))


def binary_labels(votes: Iterable[tuple[int, bool]]) -> BinaryLabels:
    """Aggregates (emotion index, present?) votes of one image."""
    n = np.zeros(taxonomy.NUM_EMOTIONS, np.int32)
    yes = np.zeros(taxonomy.NUM_EMOTIONS, np.int32)
    for index, value in votes:
        n[index] += 1
        yes[index] += bool(value)
    target = (yes / np.maximum(n, 1)).astype(np.float32)
    return BinaryLabels(votes=n, yes=yes, target=target, present=2 * yes > n, mask=n > 0)


def empty_binary_labels() -> BinaryLabels:
    return binary_labels(())


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def parse_vote(value: Any) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise LabelError(f"vote {value!r} is not True/False")


@dataclasses.dataclass
class BinaryVoteTable:
    """The published `binary.csv`: votes per image id, and the lines that were skipped."""
    votes: dict[str, list[tuple[int, bool]]]
    bad_lines: list[tuple[int, str]]      # (1-based line number, reason)
    num_lines: int

    def labels(self, image_id: str) -> BinaryLabels | None:
        votes = self.votes.get(image_id)
        return None if votes is None else binary_labels(votes)


BINARY_CSV_COLUMNS = ("path", "annotator", "value", "emotion")


def read_binary_votes(path) -> BinaryVoteTable:
    """Reads `path,annotator,value,emotion` rows (the published `data/binary.csv`).

    Image ids are the `path` column as written (5-digit strings such as '00042').
    A line with an unknown emotion, a vote that is not True/False, a missing field or a
    repeated (image, annotator, emotion) vote is skipped and reported in `bad_lines`.
    A file without the expected header raises `LabelError` naming the columns.
    """
    votes: dict[str, list[tuple[int, bool]]] = {}
    seen: set[tuple[str, str, int]] = set()
    bad: list[tuple[int, str]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in BINARY_CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise LabelError(f"{path}: columns {reader.fieldnames} lack {missing}; expected {list(BINARY_CSV_COLUMNS)}")
        num_lines = 0
        for num_lines, row in enumerate(reader, start=1):
            line = reader.line_num  # physical line: DictReader skips blank lines
            try:
                if any(not (row.get(c) or "").strip() for c in BINARY_CSV_COLUMNS):
                    raise LabelError(f"missing field in {row}")
                image_id, annotator = row["path"].strip(), row["annotator"].strip()
                index = taxonomy.emotion_index(row["emotion"])
                value = parse_vote(row["value"])
                if (image_id, annotator, index) in seen:
                    raise LabelError(f"repeated vote of {annotator!r} on {row['emotion']!r} for image {image_id}")
            except (LabelError, taxonomy.UnknownEmotionError) as e:
                bad.append((line, str(e)))
                continue
            seen.add((image_id, annotator, index))
            votes.setdefault(image_id, []).append((index, value))
    return BinaryVoteTable(votes=votes, bad_lines=bad, num_lines=num_lines)
