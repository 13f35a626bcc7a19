"""The three TFDS builders on tiny synthetic parquet, in every layout, and on bad input."""

import ast
import collections
import csv
import io
import json
import math
import pathlib
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from emonet_jax import labels, taxonomy
from emonet_jax.data import builder, prepare, sources, synthetic

RESOLUTION = 64
IMAGE_SIZE = 64
# Enough rows that the 10% (Binary) and 2% (Big) held-out splits are not empty: with
# md5-by-id membership, ids 00027, 00029, 00035 are Binary validation, 00035 is Big's.
NUM_ROWS = {"hq": 24, "binary": 40, "big": 40}
ROWS_PER_SHARD = 16
KIND_SCHEMAS = [(kind, schema.name) for kind, schemas in sources.SCHEMAS.items() for schema in schemas]


def test_every_layout_is_covered():
    assert sorted(KIND_SCHEMAS) == sorted([("hq", "card"), ("hq", "path_label"), ("binary", "card"),
                                           ("binary", "path_emotion"), ("big", "card"), ("big", "path_label")])


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_back(kind: str, data_dir) -> dict[str, list[dict]]:
    """Every record of every split, through tfds.data_source (no download)."""
    sources_by_split = tfds.data_source(f"{prepare.DATASETS[kind]}/{RESOLUTION}", data_dir=str(data_dir),
                                        download=False)
    return {split: [ds[i] for i in range(len(ds))] for split, ds in sources_by_split.items()}


def visible_splits(kind: str, data_dir) -> dict:
    try:
        return dict(tfds.data_source(f"{prepare.DATASETS[kind]}/{RESOLUTION}", data_dir=str(data_dir),
                                     download=False))
    except tfds.core.registered.DatasetNotFoundError:
        return {}


def dataset_dir(kind: str, data_dir) -> pathlib.Path:
    return pathlib.Path(data_dir) / prepare.DATASETS[kind] / str(RESOLUTION) / "1.0.0"


def metadata(kind: str, data_dir) -> dict:
    return json.loads((dataset_dir(kind, data_dir) / "metadata.json").read_text())


# ---------------------------------------------------------------------------
# Expected labels, recomputed from the raw rows without the builder's parsers.


def raw_rows(raw_dir) -> list[dict]:
    rows = []
    for path in sorted(pathlib.Path(raw_dir).glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def expected_id(schema: str, index: int, row: dict) -> str:
    if schema == "path_emotion":     # no file name: the row number, as binary.csv counts
        return f"{index:05d}"
    image = row["image" if schema == "card" else "path"]
    return pathlib.PurePath(image["path"]).stem


def expected_raters(kind: str, schema: str, row: dict) -> dict[str, dict]:
    if schema == "card":
        value = json.loads(row["annotations"])
        return value if kind == "hq" else {"rater-1": value}
    merged = {}
    for item in ast.literal_eval(row["label"]):
        merged.update(item)
    return merged


def binary_csv_votes(path) -> dict[str, list[tuple[str, bool]]]:
    votes = collections.defaultdict(list)
    with open(path, newline="") as f:
        for line in csv.DictReader(f):
            votes[line["path"]].append((line["emotion"], line["value"] == "True"))
    return votes


def check_ratings(record: dict, per_rater: dict[str, dict], integer: bool):
    names = list(per_rater)
    R = np.full((labels.MAX_RATERS, taxonomy.NUM_EMOTIONS), -1)
    extras = collections.defaultdict(list)
    for r, scores in enumerate(per_rater.values()):
        for key, value in scores.items():
            family, name = key.split("|")
            if family == "Extra Dimensions":
                extras[taxonomy.EXTRA_NAMES.index(name)].append(value)
            else:
                assert value == int(value)
                R[r, taxonomy.NAMES.index(name)] = value
    assert [text(x) for x in record["raters"]] == names + [""] * (labels.MAX_RATERS - len(names))
    np.testing.assert_array_equal(record["rater_mask"], np.arange(labels.MAX_RATERS) < len(names))
    np.testing.assert_array_equal(record["ratings"], R)
    valid = R >= 0
    np.testing.assert_array_equal(record["soft_label_mask"], valid.any(0))
    for e in range(taxonomy.NUM_EMOTIONS):
        given = R[valid[:, e], e]
        if len(given):
            hist = np.bincount(given, minlength=labels.NUM_LEVELS) / len(given)
            np.testing.assert_allclose(record["soft_label"][e], hist, atol=1e-6)
            assert record["mean_intensity"][e] == pytest.approx(given.mean(), abs=1e-6)
        else:
            assert not record["soft_label"][e].any() and record["mean_intensity"][e] == 0
    expected_extra = np.zeros(taxonomy.NUM_EXTRA_DIMENSIONS)
    for d, values in extras.items():
        expected_extra[d] = np.mean(values)
    np.testing.assert_allclose(record["extra"], expected_extra, atol=1e-6)
    np.testing.assert_array_equal(record["extra_mask"], [d in extras for d in range(taxonomy.NUM_EXTRA_DIMENSIONS)])
    # The binary fields of a rated image are empty.
    assert not record["binary_mask"].any() and not record["binary_votes"].any()


def check_binary(record: dict, votes: list[tuple[str, bool]]):
    n = np.zeros(taxonomy.NUM_EMOTIONS, int)
    yes = np.zeros(taxonomy.NUM_EMOTIONS, int)
    for emotion, value in votes:
        e = taxonomy.NAMES.index("Helplessness" if emotion == "Hopelessness" else emotion)
        n[e] += 1
        yes[e] += value
    assert (n > 0).sum() == 2   # the generator judges 2 emotions per image, like the real data
    np.testing.assert_array_equal(record["binary_votes"], n)
    np.testing.assert_array_equal(record["binary_yes"], yes)
    np.testing.assert_array_equal(record["binary_mask"], n > 0)
    np.testing.assert_array_equal(record["binary_present"], 2 * yes > n)
    np.testing.assert_allclose(record["binary_target"], np.where(n > 0, yes / np.maximum(n, 1), 0), atol=1e-6)
    # The rating fields of a Binary image are empty.
    assert not record["rater_mask"].any() and (record["ratings"] == -1).all()
    assert not record["soft_label_mask"].any() and not record["soft_label"].any()


def decoded(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB").resize((RESOLUTION, RESOLUTION)), np.float32)


# ---------------------------------------------------------------------------
# One tiny build per (kind, schema).


@pytest.fixture(scope="module", params=KIND_SCHEMAS, ids=lambda p: f"{p[0]}-{p[1]}")
def built(request, tmp_path_factory):
    kind, schema = request.param
    root = tmp_path_factory.mktemp(f"{kind}-{schema}")
    raw, data_dir = root / "raw", root / "data"
    synthetic.write_split(raw, kind, NUM_ROWS[kind], seed=3, size=IMAGE_SIZE, schema=schema,
                          rows_per_shard=ROWS_PER_SHARD)
    b = prepare.build(kind, data_dir, RESOLUTION, manual_dir=raw)
    return kind, schema, raw, data_dir, b


def test_files_splits_and_partition(built):
    kind, schema, raw, data_dir, b = built
    assert len(list(raw.glob("*.parquet"))) >= 2
    truth_ids = [str(i) for i in np.load(raw / "truth.npz")["image_id"]]
    assert truth_ids == [f"{i:05d}" for i in range(NUM_ROWS[kind])]
    cls = prepare.builder_class(kind)
    expected_splits = {"test"} if kind == "hq" else {"train", "validation"}
    assert set(b.info.splits) == expected_splits
    for split in expected_splits:
        files = sorted(dataset_dir(kind, data_dir).glob(f"{prepare.DATASETS[kind]}-{split}.array_record-*"))
        assert files, f"no array_record shard for {split}"
    records = read_back(kind, data_dir)
    assert set(records) == expected_splits
    ids = {split: [text(r["image_id"]) for r in rs] for split, rs in records.items()}
    for split, split_ids in ids.items():
        assert b.info.splits[split].num_examples == len(split_ids)
        assert len(set(split_ids)) == len(split_ids)
    all_ids = [i for split_ids in ids.values() for i in split_ids]
    assert sorted(all_ids) == truth_ids              # every row, once, in exactly one split
    if kind != "hq":
        percent = cls.VALIDATION_PERCENT
        assert percent == {"binary": 10.0, "big": 2.0}[kind]
        assert not set(ids["train"]) & set(ids["validation"])
        assert sorted(ids["validation"]) == [i for i in truth_ids if sources.in_validation(i, percent)]
        assert ids["validation"], "the tiny validation split should not be empty"


def test_records_match_raw_rows(built):
    kind, schema, raw, data_dir, _ = built
    rows = raw_rows(raw)
    assert len(rows) == NUM_ROWS[kind]
    by_id = {expected_id(schema, i, row): row for i, row in enumerate(rows)}
    images = {i: decoded((row["image"] if schema == "card" else row["path"])["bytes"]) for i, row in by_id.items()}
    csv_votes = binary_csv_votes(raw / "binary.csv") if schema == "path_emotion" else None
    count = 0
    for split, records in read_back(kind, data_dir).items():
        for record in records:
            count += 1
            image_id = text(record["image_id"])
            row = by_id[image_id]
            image = record["image"]
            assert image.shape == (RESOLUTION, RESOLUTION, 3) and image.dtype == np.uint8
            # The stored JPEG is this row's image, not a neighbour's.
            own = np.abs(image - images[image_id]).mean()
            others = min(np.abs(image - im).mean() for i, im in images.items() if i != image_id)
            assert own < 6.0 and own < others / 4, (image_id, own, others)
            if schema == "card":
                assert text(record["prompt"]) == row["prompt"]
                for k in sources.DEMOGRAPHICS:
                    assert text(record[k]) == row["demographics"][k]
            else:
                assert text(record["prompt"]) == "" and text(record["gender"]) == ""
            if kind == "binary":
                if schema == "card":
                    votes = [(v["emotion"], v["value"]) for v in json.loads(row["annotations"])]
                else:
                    votes = csv_votes[image_id]
                    # The path layout's `emotion` column is the prompted emotion: one of the judged two.
                    assert record["binary_mask"][row["emotion"]]
                check_binary(record, votes)
            else:
                per_rater = expected_raters(kind, schema, row)
                assert len(per_rater) == (4 if kind == "hq" else 1)
                check_ratings(record, per_rater, integer=kind == "hq")
    assert count == NUM_ROWS[kind]


def test_metadata(built):
    kind, schema, raw, data_dir, b = built
    meta = metadata(kind, data_dir)
    assert meta["schema"] == schema
    splits = {"test"} if kind == "hq" else {"train", "validation"}
    assert meta["bad_rows"] == {"count": 0, "first": [],
                                "rows_read": sum(b.info.splits[split].num_examples for split in splits)}
    if schema == "path_emotion":
        with open(raw / "binary.csv") as f:
            lines = sum(1 for _ in f) - 1
        assert meta["votes_csv"] == {"path": str(raw / "binary.csv"), "lines": lines, "bad_lines": 0}
    else:
        assert "votes_csv" not in meta
    assert prepare.describe(b)["bad_rows"] == 0


def test_building_twice_is_a_no_op(built, monkeypatch):
    kind, schema, raw, data_dir, b = built
    before = {p: p.stat().st_mtime_ns for p in pathlib.Path(data_dir).rglob("*")}

    def no_reading(*args, **kwargs):
        raise AssertionError("a prepared dataset must not be read again")

    monkeypatch.setattr(sources, "iter_rows", no_reading)
    monkeypatch.setattr(builder.EmoNetFaceBuilder, "_hub_files", no_reading)
    again = prepare.build(kind, data_dir, RESOLUTION, manual_dir=raw)
    after = {p: p.stat().st_mtime_ns for p in pathlib.Path(data_dir).rglob("*")}
    assert after == before
    assert {s: i.num_examples for s, i in again.info.splits.items()} == \
        {s: i.num_examples for s, i in b.info.splits.items()}
    assert again.info.metadata["schema"] == schema


# ---------------------------------------------------------------------------
# Bad rows.

BAD_KEY = "Positive High-Energy Emotions|Schadenfreude"


@pytest.fixture(scope="module")
def bad_hq(tmp_path_factory):
    """HQ `path`/`label` shards: 6 good rows, then 6 good rows interleaved with 6 bad ones."""
    root = tmp_path_factory.mktemp("bad-hq")
    template = root / "template"
    synthetic.write_split(template, "hq", 12, seed=5, size=IMAGE_SIZE, schema="path_label", rows_per_shard=100)
    good = raw_rows(template)
    first = ast.literal_eval(good[0]["label"])

    def relabel(change):
        label = [{rater: dict(scores) for rater, scores in item.items()} for item in first]
        change(next(iter(label[1].values())))
        return label

    def image(name, data=None):
        return {"bytes": data if data is not None else good[0]["path"]["bytes"], "path": name}

    bad = [
        {"path": image("bad-image.png", b"\x89PNG\r\n\x1a\n but not really"), "label": good[0]["label"]},
        {"path": image("bad-rating.png"), "label": repr(relabel(lambda s: s.update({taxonomy.key_of(3): 8})))},
        {"path": image("nan-rating.png"),
         "label": json.dumps(relabel(lambda s: s.update({taxonomy.key_of(4): math.nan})))},
        {"path": image("bad-key.png"), "label": repr(relabel(lambda s: s.update({BAD_KEY: 2})))},
        {"path": image("no-label.png"), "label": None},
        {"path": None, "label": good[0]["label"]},
    ]
    assert "NaN" in bad[2]["label"]
    second = [good[6], bad[0], good[7], bad[1], bad[2], good[8], bad[3], bad[4], good[9], good[10], bad[5], good[11]]
    manual = root / "manual"
    manual.mkdir()
    for name, rows in (("hq-00000.parquet", good[:6]), ("hq-00001.parquet", second)):
        table = pa.table({"path": pa.array([r["path"] for r in rows], synthetic.IMAGE_TYPE),
                          "label": pa.array([r["label"] for r in rows], pa.string())})
        pq.write_table(table, manual / name)
    return manual, good


# (local row in hq-00001.parquet, what the message must say)
EXPECTED_BAD = [(1, "does not decode"), (3, "outside 0..7"), (4, "not a finite number"), (6, "Schadenfreude"),
                (7, "missing field 'label'"), (10, "missing field 'path'")]


def test_bad_rows_are_counted_and_skipped(bad_hq, tmp_path):
    manual, good = bad_hq
    b = prepare.build("hq", tmp_path, RESOLUTION, manual_dir=manual, max_bad_fraction=0.5)
    entry = metadata("hq", tmp_path)["bad_rows"]
    assert entry["count"] == len(EXPECTED_BAD) == 6
    assert entry["rows_read"] == 18
    assert len(entry["first"]) == 6
    for message, (row, reason) in zip(entry["first"], EXPECTED_BAD):
        assert message.startswith(f"row hq-00001.parquet:{row}: "), message
        assert reason in message, message
    records = read_back("hq", tmp_path)["test"]
    ids = sorted(text(r["image_id"]) for r in records)
    assert ids == [f"{i:05d}" for i in range(12)]
    assert b.info.splits["test"].num_examples == 12
    by_id = {expected_id("path_label", 0, row): row for row in good}
    for record in records:
        check_ratings(record, expected_raters("hq", "path_label", by_id[text(record["image_id"])]), integer=True)


def test_too_many_bad_rows_leave_nothing_behind(bad_hq, tmp_path):
    manual, _ = bad_hq
    with pytest.raises(builder.TooManyBadRows) as info:
        prepare.build("hq", tmp_path, RESOLUTION, manual_dir=manual, max_bad_fraction=0.2)
    assert "6 of 18" in str(info.value)
    assert not dataset_dir("hq", tmp_path).exists()
    leftovers = [p for p in tmp_path.rglob("*") if "incomplete" in p.name or p.suffix == ".tmp"]
    assert leftovers == []
    assert not list(tmp_path.rglob("*.array_record*"))
    assert visible_splits("hq", tmp_path) == {}
    assert not prepare.builder_class("hq")(config=str(RESOLUTION), data_dir=str(tmp_path)).is_prepared()
    # The failed attempt does not block a later build.
    prepare.build("hq", tmp_path, RESOLUTION, manual_dir=manual, max_bad_fraction=0.5)
    assert len(read_back("hq", tmp_path)["test"]) == 12


def test_binary_image_without_votes_is_a_bad_row(tmp_path):
    manual, votes_dir = tmp_path / "manual", tmp_path / "votes"
    synthetic.write_split(manual, "binary", NUM_ROWS["binary"], seed=3, size=IMAGE_SIZE, schema="path_emotion",
                          rows_per_shard=ROWS_PER_SHARD)
    # binary.csv comes through the votes_csv kwarg, without 00005's votes; none in the manual dir.
    votes_dir.mkdir()
    lines = (manual / "binary.csv").read_text().splitlines(keepends=True)
    (manual / "binary.csv").unlink()
    kept = [line for line in lines if not line.startswith("00005,")]
    assert len(kept) < len(lines)
    votes_csv = votes_dir / "binary.csv"
    votes_csv.write_text("".join(kept))
    assert not sources.in_validation("00005", 10.0)
    b = prepare.build("binary", tmp_path / "data", RESOLUTION, manual_dir=manual, votes_csv=str(votes_csv),
                      max_bad_fraction=0.05)
    meta = metadata("binary", tmp_path / "data")
    assert meta["votes_csv"] == {"path": str(votes_csv), "lines": len(kept) - 1, "bad_lines": 0}
    entry = meta["bad_rows"]
    assert entry["count"] == 1 and entry["rows_read"] == NUM_ROWS["binary"]
    (message,) = entry["first"]
    assert message.startswith("row binary-00000.parquet:5: ") and "'00005'" in message, message
    assert "no votes in binary.csv" in message
    records = read_back("binary", tmp_path / "data")
    ids = sorted(text(r["image_id"]) for rs in records.values() for r in rs)
    assert ids == [f"{i:05d}" for i in range(NUM_ROWS["binary"]) if i != 5]
    assert sum(s.num_examples for s in b.info.splits.values()) == NUM_ROWS["binary"] - 1
    assert len(records["validation"]) == 3


# ---------------------------------------------------------------------------
# Schema detection.


def test_unknown_columns_raise_schema_error(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"img": pa.array([b"x"]), "labels": pa.array(["{}"]), "note": pa.array(["n"])}), path)
    with pytest.raises(sources.SchemaError) as info:
        sources.file_schema("hq", path)
    message = str(info.value)
    assert str(path) in message
    assert "['img', 'labels', 'note']" in message
    assert "['image', 'prompt', 'demographics', 'annotations']" in message and "['path', 'label']" in message
    with pytest.raises(sources.SchemaError, match=r"\['path', 'emotion'\]"):
        sources.file_schema("binary", path)
    # Through the builder too, before anything is written.
    with pytest.raises(sources.SchemaError, match="'img'"):
        prepare.build("hq", tmp_path / "data", RESOLUTION, manual_dir=tmp_path)
    assert visible_splits("hq", tmp_path / "data") == {}


@pytest.mark.parametrize("kind, columns, expected", [
    ("hq", ["image", "prompt", "demographics", "annotations", "extra"], "card"),
    ("hq", ["label", "path"], "path_label"),
    ("big", ["path", "label", "image_id"], "path_label"),
    ("binary", ["path", "emotion"], "path_emotion"),
    ("binary", ["image", "prompt", "demographics", "annotations"], "card"),
])
def test_detect_schema(kind, columns, expected):
    assert sources.detect_schema(kind, columns).name == expected


def test_detect_schema_rejects_other_kinds_layout():
    with pytest.raises(sources.SchemaError, match="binary"):
        sources.detect_schema("binary", ["path", "label"])
    with pytest.raises(sources.SchemaError, match="hq"):
        sources.detect_schema("hq", ["path", "emotion"])


def test_mixed_layouts_raise_schema_error(tmp_path):
    synthetic.write_split(tmp_path / "a", "hq", 2, seed=0, size=IMAGE_SIZE, schema="card")
    synthetic.write_split(tmp_path / "b", "hq", 2, seed=0, size=IMAGE_SIZE, schema="path_label")
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(tmp_path / "a" / "hq-00000.parquet", manual / "hq-00000.parquet")
    shutil.copy(tmp_path / "b" / "hq-00000.parquet", manual / "hq-00001.parquet")
    with pytest.raises(sources.SchemaError, match="hq-00001.parquet") as info:
        prepare.build("hq", tmp_path / "data", RESOLUTION, manual_dir=manual)
    assert "'card'" in str(info.value)


def test_duplicate_image_id_and_empty_annotations_are_bad_rows(tmp_path):
    template = tmp_path / "template"
    synthetic.write_split(template, "hq", 5, seed=7, size=IMAGE_SIZE, schema="path_label", rows_per_shard=100)
    good = raw_rows(template)
    duplicate = {"path": good[1]["path"], "label": good[2]["label"]}     # same file name as row 1
    empty = {"path": {"bytes": good[0]["path"]["bytes"], "path": "empty.png"}, "label": repr([{"expert-1": {}}])}
    rows = good + [duplicate, empty]
    manual = tmp_path / "manual"
    manual.mkdir()
    pq.write_table(pa.table({"path": pa.array([r["path"] for r in rows], synthetic.IMAGE_TYPE),
                             "label": pa.array([r["label"] for r in rows], pa.string())}), manual / "hq-00000.parquet")
    prepare.build("hq", tmp_path / "data", RESOLUTION, manual_dir=manual, max_bad_fraction=0.5)
    entry = metadata("hq", tmp_path / "data")["bad_rows"]
    assert entry["count"] == 2 and entry["rows_read"] == 7
    assert "hq-00000.parquet:5" in entry["first"][0] and "already used" in entry["first"][0]
    assert "hq-00000.parquet:6" in entry["first"][1] and "rated no emotion" in entry["first"][1]
    records = read_back("hq", tmp_path / "data")["test"]
    assert sorted(text(r["image_id"]) for r in records) == [f"{i:05d}" for i in range(5)]
    # The first row with the id keeps it: its labels are row 1's, not the duplicate's.
    by_id = {text(r["image_id"]): r for r in records}
    check_ratings(by_id["00001"], expected_raters("hq", "path_label", good[1]), integer=True)


# ---------------------------------------------------------------------------
# Two-split builds: each image is encoded once, each bad row counted once.


def corrupt_images(raw_dir, rows: set[int], image_column: str):
    """Rewrites the shards with garbage image bytes (file names kept) at the global `rows`."""
    index = 0
    for path in sorted(pathlib.Path(raw_dir).glob("*.parquet")):
        table = pq.read_table(path)
        values = table.to_pylist()
        for value in values:
            if index in rows:
                value[image_column] = {**value[image_column], "bytes": b"\x89PNG\r\n\x1a\n but not really"}
            index += 1
        pq.write_table(pa.Table.from_pylist(values, schema=table.schema), path)


def test_two_split_build_encodes_each_image_once(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    synthetic.write_split(raw, "binary", NUM_ROWS["binary"], seed=3, size=IMAGE_SIZE, schema="card",
                          rows_per_shard=ROWS_PER_SHARD)
    # Bad images in both splits; the validation one (27) lies between the train ones in row order.
    bad_rows = {5: "train", 27: "validation", 30: "train"}
    assert {r: "validation" if sources.in_validation(f"{r:05d}", 10.0) else "train" for r in bad_rows} == bad_rows
    corrupt_images(raw, set(bad_rows), "image")
    encoded = collections.Counter()
    encode_image = sources.encode_image

    def counting_encode(data, resolution):
        encoded[data] += 1
        return encode_image(data, resolution)

    monkeypatch.setattr(sources, "encode_image", counting_encode)
    b = prepare.build("binary", tmp_path / "data", RESOLUTION, manual_dir=raw, max_bad_fraction=0.1)
    # Every row's image went through the encoder once (the corrupt ones too: that is how they fail).
    assert sum(encoded.values()) == NUM_ROWS["binary"]
    assert max(encoded.values()) == len(bad_rows)           # the three identical garbage payloads
    assert sorted(encoded.values())[:-1] == [1] * (len(encoded) - 1)
    entry = metadata("binary", tmp_path / "data")["bad_rows"]
    assert entry["count"] == len(bad_rows) and entry["rows_read"] == NUM_ROWS["binary"]
    # In row order, whichever split pass met them.
    assert len(entry["first"]) == len(bad_rows)
    for message, row in zip(entry["first"], sorted(bad_rows)):
        shard, local = divmod(row, ROWS_PER_SHARD)
        assert message.startswith(f"row binary-{shard:05d}.parquet:{local}: ") and "does not decode" in message
    records = read_back("binary", tmp_path / "data")
    ids = {split: sorted(text(r["image_id"]) for r in rs) for split, rs in records.items()}
    expected = [f"{i:05d}" for i in range(NUM_ROWS["binary"]) if i not in bad_rows]
    assert ids["validation"] == [i for i in expected if sources.in_validation(i, 10.0)] == ["00029", "00035"]
    assert ids["train"] == [i for i in expected if not sources.in_validation(i, 10.0)]
    assert {s: i.num_examples for s, i in b.info.splits.items()} == {s: len(v) for s, v in ids.items()}


def test_too_many_bad_rows_over_both_splits(tmp_path):
    """Neither split alone is over the allowed fraction; both together are."""
    raw = tmp_path / "raw"
    synthetic.write_split(raw, "binary", NUM_ROWS["binary"], seed=3, size=IMAGE_SIZE, schema="card",
                          rows_per_shard=ROWS_PER_SHARD)
    corrupt_images(raw, {5, 27}, "image")
    with pytest.raises(builder.TooManyBadRows, match="2 of 40 rows"):
        prepare.build("binary", tmp_path / "data", RESOLUTION, manual_dir=raw, max_bad_fraction=0.04)
    assert visible_splits("binary", tmp_path / "data") == {}


def test_builders_leave_no_temporary_directories(tmp_path, monkeypatch):
    # TFDS's GCS lookup for an unprepared dataset used to leave an empty mkdtemp dir each time.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for kind in ("hq", "binary", "big"):
        b = prepare.builder_class(kind)(data_dir=str(tmp_path / "data"), config=str(RESOLUTION))
        assert not b.is_prepared()
    assert list(scratch.iterdir()) == []
