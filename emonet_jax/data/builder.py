"""The TFDS builder shared by `tfds_builders/emonet_face_{hq,binary,big}`.

Each dataset folder only names its kind and Hugging Face repository; the reading, label
parsing, bad-row accounting and record writing live here once. Records are written as
`array_record` so that training reads them through `tfds.data_source` + grain, without
TensorFlow. Images are stored re-encoded at the builder config's resolution: decoding the
1024x1024 PNG originals at every step would starve the accelerator.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import pathlib
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from emonet_jax import labels as labels_lib
from emonet_jax import taxonomy
from emonet_jax.data import sources

RESOLUTIONS = (64, 128, 224, 384, 448)
DEFAULT_MAX_BAD_FRACTION = 0.01
BINARY_CSV_URL = "https://raw.githubusercontent.com/LAION-AI/emonet-face/main/data/binary.csv"
MAX_REPORTED_BAD_ROWS = 50


class TooManyBadRows(RuntimeError):
    pass


class EmptySplit(ValueError):
    """A split would have no rows (too few rows read, or all of them bad or held out)."""


@dataclasses.dataclass
class BadRows:
    """How many rows were skipped, and the messages of the first few in row order."""
    count: int = 0
    first: list[tuple[int, str]] = dataclasses.field(default_factory=list)   # (row index, message)

    def add(self, index: int, message: str) -> None:
        self.count += 1
        if len(self.first) < MAX_REPORTED_BAD_ROWS:
            self.first.append((index, message))

    @classmethod
    def merge(cls, parts) -> "BadRows":
        """The union of disjoint parts: each keeps its first rows, so the union's first are among them."""
        parts = list(parts)
        first = sorted(entry for part in parts for entry in part.first)[:MAX_REPORTED_BAD_ROWS]
        return cls(sum(part.count for part in parts), first)

    def messages(self) -> list[str]:
        return [message for _, message in self.first]


@dataclasses.dataclass
class ResolutionConfig(tfds.core.BuilderConfig):
    resolution: int = 224


def features(resolution: int) -> tfds.features.FeaturesDict:
    E, L, R, X = taxonomy.NUM_EMOTIONS, labels_lib.NUM_LEVELS, labels_lib.MAX_RATERS, taxonomy.NUM_EXTRA_DIMENSIONS
    tensor = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(resolution, resolution, 3), encoding_format="jpeg"),
        "image_id": tfds.features.Text(),
        "prompt": tfds.features.Text(),
        **{k: tfds.features.Text() for k in sources.DEMOGRAPHICS},
        "ratings": tensor(shape=(R, E), dtype=np.int32, doc="0..7 per rater, -1 = not rated"),
        "rater_mask": tensor(shape=(R,), dtype=np.bool_),
        "raters": tfds.features.Sequence(tfds.features.Text(), length=R),
        "soft_label": tensor(shape=(E, L), dtype=np.float32, doc="distribution of intensities"),
        "soft_label_mask": tensor(shape=(E,), dtype=np.bool_),
        "mean_intensity": tensor(shape=(E,), dtype=np.float32),
        "extra": tensor(shape=(X,), dtype=np.float32, doc=", ".join(taxonomy.EXTRA_NAMES)),
        "extra_mask": tensor(shape=(X,), dtype=np.bool_),
        "binary_votes": tensor(shape=(E,), dtype=np.int32),
        "binary_yes": tensor(shape=(E,), dtype=np.int32),
        "binary_target": tensor(shape=(E,), dtype=np.float32, doc="fraction of present votes"),
        "binary_present": tensor(shape=(E,), dtype=np.bool_, doc=labels_lib.PRESENCE_RULE),
        "binary_mask": tensor(shape=(E,), dtype=np.bool_),
    })


class EmoNetFaceBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
    """Base of the three EmoNet-Face builders; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ResolutionConfig(name=str(r), resolution=r, description=f"{r}x{r} JPEG")
                       for r in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = "224"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Optional. Put the dataset's parquet shards (any sub-folder) in the manual dir to build "
        "offline; for emonet_face_binary in the `path`/`emotion` layout, also `binary.csv`. "
        "Without them the shards are fetched from the Hugging Face Hub.")

    HF_REPO: ClassVar[str]
    # Held-out percentage for the 'validation' split, chosen by image id; None: one split.
    VALIDATION_PERCENT: ClassVar[float | None] = None
    SINGLE_SPLIT: ClassVar[str] = "train"

    @property
    @abc.abstractmethod
    def kind(self) -> sources.Kind:
        """'hq', 'binary' or 'big'."""

    def __init__(self, *, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 votes_csv: str | None = None, **kwargs: Any):
        if kwargs.get("file_format") is None:
            kwargs["file_format"] = "array_record"
        super().__init__(**kwargs)
        self._max_bad_fraction = max_bad_fraction
        self._votes_csv = votes_csv
        self._bad_rows: dict[str, BadRows] = {}   # per split pass, merged into the metadata

    def _info(self) -> tfds.core.DatasetInfo:
        info = self.dataset_info_from_configs(
            features=features(self.builder_config.resolution),
            homepage=f"https://huggingface.co/datasets/{self.HF_REPO}",
            metadata=tfds.core.MetadataDict(),
            citation="EmoNet-Face, arXiv:2505.20033 (CC BY 4.0)",
        )
        # These datasets are not in TFDS's GCS bucket, whose lookup (off by default) still makes
        # an empty temporary directory each time a builder of an unprepared dataset is built.
        info.initialize_from_bucket = lambda: None
        return info

    # -- sources --------------------------------------------------------------

    def _manual_files(self, dl_manager) -> list[pathlib.Path]:
        try:
            root = pathlib.Path(dl_manager.manual_dir)
        except AssertionError:  # no manual dir given, or empty
            return []
        return sorted(root.rglob("*.parquet"))

    def _hub_files(self, dl_manager) -> list[pathlib.Path]:
        import huggingface_hub  # only needed for the documented download.
        local = pathlib.Path(dl_manager.download_dir) / self.HF_REPO.replace("/", "__")
        huggingface_hub.snapshot_download(self.HF_REPO, repo_type="dataset",
                                          allow_patterns=["*.parquet", "**/*.parquet"], local_dir=local)
        return sorted(local.rglob("*.parquet"))

    def _binary_votes(self, dl_manager) -> labels_lib.BinaryVoteTable:
        path = self._votes_csv
        if path is None:
            try:
                manual = pathlib.Path(dl_manager.manual_dir) / "binary.csv"
                path = manual if manual.exists() else None
            except AssertionError:
                pass
        if path is None:
            path = dl_manager.download(BINARY_CSV_URL)
        table = labels_lib.read_binary_votes(path)
        for line, reason in table.bad_lines[:MAX_REPORTED_BAD_ROWS]:
            logging.warning("%s line %d skipped: %s", path, line, reason)
        self.info.metadata["votes_csv"] = {"path": str(path), "lines": table.num_lines,
                                           "bad_lines": len(table.bad_lines)}
        self._check_fraction(len(table.bad_lines), table.num_lines, f"{path} lines")
        return table

    def _split_generators(self, dl_manager):
        files = self._manual_files(dl_manager) or self._hub_files(dl_manager)
        if not files:
            raise FileNotFoundError(f"no parquet shard found for {self.HF_REPO}")
        schemas = {f: sources.file_schema(self.kind, f) for f in files}
        schema = schemas[files[0]]
        mixed = [str(f) for f, s in schemas.items() if s != schema]
        if mixed:
            raise sources.SchemaError(f"shards {mixed} are not in the {schema.name!r} layout of {files[0]}")
        votes = self._binary_votes(dl_manager) if schema is sources.PATH_EMOTION else None
        self.info.metadata["schema"] = schema.name
        self._bad_rows = {}
        return {split: self._generate_examples(files, schema, votes, split) for split in self._split_names()}

    # -- examples -------------------------------------------------------------

    def _split_names(self) -> tuple[str, ...]:
        return (self.SINGLE_SPLIT,) if self.VALIDATION_PERCENT is None else ("train", "validation")

    def _split_of(self, image_id: str) -> str:
        if self.VALIDATION_PERCENT is None:
            return self.SINGLE_SPLIT
        return "validation" if sources.in_validation(image_id, self.VALIDATION_PERCENT) else "train"

    def _generate_examples(self, files, schema, votes, split):
        """Examples of one split.

        Every pass reads all rows, but only the rows whose image id falls in `split` are
        parsed: the id needs no decoding, so each image is decoded and encoded once per
        build whatever the number of splits. A bad row is thus seen by one pass only (the
        pass of its id's split; duplicates of an id share it) and counted once.
        """
        resolution = self.builder_config.resolution
        rows_read, elsewhere, bad, ids = 0, 0, BadRows(), set()
        for row in sources.iter_rows(files, schema):
            rows_read += 1
            if self._split_of(sources.image_id_of(row, schema)) != split:
                elsewhere += 1
                continue
            try:
                ex = sources.parse_row(self.kind, schema, row, resolution, votes)
                if ex["image_id"] in ids:
                    raise sources.BadRow(f"row {row.source}: image id {ex['image_id']!r} was already used by an earlier row")
            except sources.BadRow as e:
                bad.add(row.index, str(e))
                logging.warning("%s %s: skipped %s", self.name, split, e)
                continue
            ids.add(ex["image_id"])
            yield ex["image_id"], ex
        logging.info("%s %s: %d rows read, %d of its rows skipped", self.name, split, rows_read, bad.count)
        self._bad_rows[split] = bad
        self._record_bad_rows(rows_read)
        if not ids:  # TFDS would fail later with "No examples were yielded", naming no cause
            raise EmptySplit(f"{self.name}: no row falls in the {split!r} split ({rows_read} rows read, "
                             f"{bad.count} bad, {elsewhere} in other splits); nothing was written")

    def _record_bad_rows(self, rows_read: int) -> None:
        """Bad rows of the passes so far into the metadata; fails above the allowed fraction.

        TFDS runs the passes one after the other, so after the last pass these are every
        split's bad rows; an earlier pass's count is a lower bound, enough to fail early.
        """
        bad = BadRows.merge(self._bad_rows.values())
        self.info.metadata["bad_rows"] = {"count": bad.count, "rows_read": rows_read, "first": bad.messages()}
        self._check_fraction(bad.count, rows_read, "rows")

    def _check_fraction(self, bad: int, total: int, what: str) -> None:
        if total and bad / total > self._max_bad_fraction:
            raise TooManyBadRows(
                f"{self.name}: {bad} of {total} {what} are bad ({bad / total:.2%}), above the "
                f"allowed {self._max_bad_fraction:.2%} (max_bad_fraction); see the warnings above "
                f"for the rows")
