"""Reading the Hugging Face parquet shards of EmoNet-Face, whatever their schema.

The published shards come in more than one layout (see `SCHEMAS`): the dataset cards
describe `image, prompt, demographics, annotations`, while the HQ parquet has been seen as
`path` (an Image struct) + `label` (a Python-literal string) and the Binary parquet as
`path` + `emotion`, with the votes in the separate `binary.csv`. `detect_schema` picks the
layout from the column names; `parse_row` turns one row into the builders' example dict
or raises `BadRow` naming the row. Rows are streamed in small batches, so memory stays
bounded whatever the size of a shard.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import json
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from emonet_jax import labels as labels_lib
from emonet_jax import taxonomy

Kind = Literal["hq", "binary", "big"]
DEMOGRAPHICS = ("ethnicity", "gender", "age")
JPEG_QUALITY = 95


class BadRow(ValueError):
    """A row that cannot become an example; the message names the row."""


class SchemaError(ValueError):
    """No known layout fits the columns of a parquet file."""


@dataclasses.dataclass(frozen=True)
class Schema:
    name: str
    columns: tuple[str, ...]   # required columns
    image_column: str


CARD = Schema("card", ("image", "prompt", "demographics", "annotations"), "image")
PATH_LABEL = Schema("path_label", ("path", "label"), "path")
PATH_EMOTION = Schema("path_emotion", ("path", "emotion"), "path")

SCHEMAS: dict[str, tuple[Schema, ...]] = {
    "hq": (CARD, PATH_LABEL),
    "binary": (CARD, PATH_EMOTION),   # PATH_EMOTION takes its votes from binary.csv
    "big": (CARD, PATH_LABEL),
}


def detect_schema(kind: Kind, columns: Sequence[str], where: str = "") -> Schema:
    for schema in SCHEMAS[kind]:
        if set(schema.columns) <= set(columns):
            return schema
    expected = " or ".join(str(list(s.columns)) for s in SCHEMAS[kind])
    raise SchemaError(
        f"{where or 'parquet'}: columns {list(columns)} fit no known EmoNet-Face {kind} "
        f"layout; expected {expected}")


def file_schema(kind: Kind, path) -> Schema:
    return detect_schema(kind, pq.read_schema(path).names, str(path))


@dataclasses.dataclass(frozen=True)
class Row:
    index: int                  # position over all shards, in file order
    source: str                 # 'file.parquet:row', row counted within that file
    values: Mapping[str, Any]


def iter_rows(files: Sequence, schema: Schema, batch_size: int = 16) -> Iterator[Row]:
    """Streams the rows of `files` (all in `schema`), a few at a time."""
    index = 0
    for path in files:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        columns = [c for c in names if c in set(schema.columns) | {"image_id", "id"}]
        local = 0
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            for values in batch.to_pylist():
                yield Row(index, f"{pathlib.Path(path).name}:{local}", values)
                index += 1
                local += 1


# ---------------------------------------------------------------------------
# Field parsers.

def literal(value: Any, what: str) -> Any:
    """Structured value from a JSON or Python-literal string (or as it is)."""
    if not isinstance(value, (str, bytes)):
        return value
    text = value.decode() if isinstance(value, bytes) else value
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise BadRow(f"{what} is neither JSON nor a Python literal: {e}") from None


def image_bytes(value: Any) -> bytes:
    """The encoded bytes of an HF Image struct, or the raw bytes themselves."""
    data = value.get("bytes") if isinstance(value, Mapping) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadRow("image has no encoded bytes")
    return bytes(data)


def encode_image(data: bytes, resolution: int) -> bytes:
    """Decodes, centre-crops to a square, resizes and re-encodes as JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (resolution, resolution))  # JPEG sources decode at reduced size.
            im = im.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data.
        raise BadRow(f"image does not decode: {type(e).__name__}: {e}") from None
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    im = im.resize((resolution, resolution), Image.BICUBIC, box=box, reducing_gap=3.0)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def image_id_of(row: Row, schema: Schema) -> str:
    """Stable id: an explicit id column, else the image's file stem, else the row index.

    The row-index fallback is the 5-digit position over all shards in file order,
    which is how the published `binary.csv` names Binary images. Nothing is decoded, so
    the builder picks a row's split from its id before any image work:

        split = "validation" if in_validation(image_id_of(row, schema), 10.0) else "train"
    """
    explicit = row.values.get("image_id", row.values.get("id"))
    if explicit not in (None, ""):
        return str(explicit)
    image = row.values.get(schema.image_column)
    file_name = image.get("path") if isinstance(image, Mapping) else None
    stem = pathlib.PurePath(str(file_name or "")).stem
    return stem if stem else f"{row.index:05d}"


def demographics_of(value: Any) -> dict[str, str]:
    value = literal(value, "demographics") if value is not None else {}
    if not isinstance(value, Mapping):
        raise BadRow(f"demographics is {type(value).__name__}, expected a mapping")
    return {k: str(value.get(k) or "") for k in DEMOGRAPHICS}


def rater_dicts(value: Any, what: str) -> dict[str, Mapping[str, Any]]:
    """`{rater: {'Family|Emotion': rating}}` from the published layouts.

    Accepts that mapping itself, a list of one-rater mappings (`label` in the HQ
    parquet), or a flat `{'Family|Emotion': rating}` (one unnamed rater, e.g. a VLM).
    """
    value = literal(value, what)
    if isinstance(value, Mapping):
        if value and all(isinstance(v, Mapping) for v in value.values()):
            return dict(value)
        if all(not isinstance(v, Mapping) for v in value.values()):
            return {"rater-1": value}
    elif isinstance(value, (list, tuple)):
        merged: dict[str, Mapping[str, Any]] = {}
        for item in value:
            if not isinstance(item, Mapping):
                raise BadRow(f"{what}: list item {item!r} is not a mapping")
            for rater, scores in rater_dicts(item, what).items():
                if rater in merged:
                    raise BadRow(f"{what}: rater {rater!r} appears twice")
                merged[rater] = scores
        return merged
    raise BadRow(f"{what}: cannot read ratings from a {type(value).__name__}")


def card_votes(value: Any) -> list[tuple[int, bool]]:
    """Binary votes from `annotations`: a list of {annotator, emotion, value} or
    `{annotator: {emotion: vote}}`."""
    value = literal(value, "annotations")
    items = []
    if isinstance(value, Mapping):
        for annotator, votes in value.items():
            if not isinstance(votes, Mapping):
                raise BadRow(f"annotations: votes of {annotator!r} are not a mapping")
            items += [{"annotator": annotator, "emotion": e, "value": v} for e, v in votes.items()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise BadRow(f"annotations: cannot read votes from a {type(value).__name__}")
    votes, seen = [], set()
    for item in items:
        if not isinstance(item, Mapping) or not {"emotion", "value"} <= set(item):
            raise BadRow(f"annotations: vote {item!r} lacks 'emotion' or 'value'")
        index = taxonomy.emotion_index(item["emotion"])
        key = (item.get("annotator"), index)
        if item.get("annotator") is not None and key in seen:
            raise BadRow(f"annotations: {item['annotator']!r} votes twice on {item['emotion']!r}")
        seen.add(key)
        votes.append((index, labels_lib.parse_vote(item["value"])))
    return votes


# ---------------------------------------------------------------------------
# Rows to examples.

def example(*, image: bytes, image_id: str, prompt: str = "", demographics: Mapping[str, str] | None = None,
            ratings: labels_lib.RatingLabels | None = None,
            binary: labels_lib.BinaryLabels | None = None) -> dict[str, Any]:
    """The builders' feature dict (see `builder.features`)."""
    ratings = ratings or labels_lib.empty_rating_labels()
    binary = binary or labels_lib.empty_binary_labels()
    demographics = demographics or {}
    return {
        "image": image, "image_id": image_id, "prompt": prompt,
        **{k: demographics.get(k, "") for k in DEMOGRAPHICS},
        "ratings": ratings.ratings, "rater_mask": ratings.rater_mask, "raters": list(ratings.raters),
        "soft_label": ratings.soft_label, "soft_label_mask": ratings.soft_label_mask,
        "mean_intensity": ratings.mean_intensity, "extra": ratings.extra, "extra_mask": ratings.extra_mask,
        "binary_votes": binary.votes, "binary_yes": binary.yes, "binary_target": binary.target,
        "binary_present": binary.present, "binary_mask": binary.mask,
    }


def parse_row(kind: Kind, schema: Schema, row: Row, resolution: int,
              votes: labels_lib.BinaryVoteTable | None = None) -> dict[str, Any]:
    """One example from one row; raises `BadRow` (message names the row) if it can't."""
    try:
        return _parse_row(kind, schema, row, resolution, votes)
    except (BadRow, labels_lib.LabelError, taxonomy.UnknownEmotionError) as e:
        raise BadRow(f"row {row.source}: {e}") from None


def _parse_row(kind, schema, row, resolution, votes):
    for column in schema.columns:
        if row.values.get(column) is None:
            raise BadRow(f"missing field {column!r}")
    data = image_bytes(row.values[schema.image_column])
    image_id = image_id_of(row, schema)
    fields: dict[str, Any] = {"image_id": image_id}
    if schema is CARD:
        fields["prompt"] = str(row.values["prompt"])
        fields["demographics"] = demographics_of(row.values["demographics"])
    if kind == "binary":
        if schema is PATH_EMOTION:
            fields["binary"] = votes.labels(image_id) if votes else None
            if fields["binary"] is None:
                raise BadRow(f"image id {image_id!r} has no votes in binary.csv")
        else:
            fields["binary"] = labels_lib.binary_labels(card_votes(row.values["annotations"]))
        if not fields["binary"].mask.any():
            raise BadRow("no expert vote")
    else:
        column = "annotations" if schema is CARD else "label"
        fields["ratings"] = labels_lib.rating_labels(rater_dicts(row.values[column], column), integer=kind == "hq")
    # Decode last: it is the slow part, and a bad label should not cost it.
    return example(image=encode_image(data, resolution), **fields)


def in_validation(image_id: str, percent: float) -> bool:
    """Deterministic held-out membership from the image id (md5, not Python's hash)."""
    digest = int(hashlib.md5(image_id.encode()).hexdigest()[:8], 16)
    return digest % 10000 < percent * 100

