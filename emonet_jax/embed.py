"""Pooled SigLIP / SigLIP2 image embeddings of a folder of images or of a prepared TFDS split.

EmpathicInsight-Face trains its 40 small heads on frozen SigLIP2 So400m pooled embeddings;
this module computes them once, so the heads train on a cache instead of the images.

    # A folder (recursive) -> one .npz: paths [N] (relative to DIR), embeddings [N, D] float32,
    # skipped [M] (files that are not readable images)
    python -m emonet_jax.embed --backbone=siglip2-so400m-patch16-384 --images=DIR --out=emb.npz
    # A split -> a sharded, resumable cache that the head trainer reads with load_cache(DIR)
    python -m emonet_jax.embed --backbone=PATH --split=emonet_face_binary/224:train \\
        --data_dir=~/tensorflow_datasets --out=CACHE_DIR [--shard_size=4096]

    embedder = Embedder("siglip2.npz", batch_size=64)   # or a pretrained.Tower
    vectors = embedder.embed(uint8_images)                # [N, H, W, 3] -> [N, D] float32
    cache = load_cache(CACHE_DIR)                         # {'embeddings', 'row', 'image_id', labels...}

`--backbone` is anything `models.pretrained.load` reads (a big_vision .npz, a Hugging Face
folder or .safetensors file). Preprocessing is SigLIP's: the whole image (no crop), RGB,
resized to the checkpoint's resolution (`pipeline.resize`), values in [-1, 1]
(`pipeline.to_unit_range`). The resize filter is the one a Hugging Face folder's
`preprocessor_config.json` names (`resample`; SigLIP's say bicubic, some SigLIP2 ones
bilinear), applied with PIL as `transformers`' (slow) SiglipImageProcessor applies it;
bilinear (big_vision's) without such a file or key; `--resample` overrides it. The resolution is the Hugging Face config's `image_size` when it
fits the position grid (So400m/14 at 384 px: a 27x27 grid that a VALID patch conv reads from
384 px images), else grid x patch; `--image_size` overrides it (and resizes the position
embedding).

The batch is split over all devices along a `data` axis (parameters replicated) with one
compiled shape: the last batch is padded. One process only (it writes the files itself).

Cache layout (`CACHE_DIR`), the contract with the head trainer:

    meta.json   {"format": 1, "backbone": path, "backbone_config": ViT kwargs,
                 "backbone_fingerprint": sha256 of the parameters, "image_size": int, "dim": D,
                 "dtype": compute dtype, "split": "name/res:split", "data_dir": str,
                 "num_rows": N, "shard_size": S, "num_shards": K, "fields": [label fields]}
    shard-00000-of-0000K.npz   embeddings [n, D] float32, row [n] int64 (row in the split),
                 image_id [n] unicode, and every numeric feature of the records (the label
                 fields: soft_label [n, 40, 8], ratings, binary_target, ..., see meta "fields")

Every file is written to a temporary name and renamed, so an interrupted run leaves whole
shards only. Re-running the same command skips the shards already written (each is checked:
its rows, and the image ids of its first and last row against the split); a cache made with
other weights, resolution, compute dtype, split, row count or shard size is refused rather
than mixed (the backbone's path may differ: its parameters' fingerprint decides).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pathlib
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from emonet_jax import host_memory, inference, sharding, tree
from emonet_jax.data import pipeline
from emonet_jax.models import pretrained

FORMAT = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# meta.json keys that must agree before a cache is extended ('backbone' and 'data_dir' are
# where things were, which may move; the fingerprint says whether the weights are the same).
MATCHING_KEYS = ("format", "backbone_config", "backbone_fingerprint", "image_size", "resample", "dim", "dtype",
                 "split", "num_rows", "shard_size", "num_shards", "fields")
DEFAULT_RESAMPLE = "bilinear"  # big_vision's; also what caches written before `resample` was recorded used
# A preprocessor_config.json's `resample` code (PIL's numbering) -> pipeline.RESAMPLE name.
HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
ROW_KEYS = ("embeddings", "row", "image_id")


class EmbedError(ValueError):
    """Bad input or a cache that cannot be used; the message names the file."""


# --- the embedder -------------------------------------------------------------------------------

class Embedder:
    """A SigLIP image tower as a jitted, batch-sharded function from uint8 images to embeddings.

        embedder = Embedder("tests/fixtures/siglip_tiny/vision", batch_size=64)
        embedder.embed(images)            # uint8 [N, H, W, 3] -> float32 [N, embedder.dim]

    `backbone` is a `pretrained.Tower` or a path for `pretrained.load`. The batch size is
    rounded up to a multiple of the device count; every call runs the same compiled shape.
    """

    def __init__(self, backbone: pretrained.Tower | str | os.PathLike, batch_size: int = 64, *,
                 image_size: int | None = None, dtype: str = "float32", resample: str | None = None,
                 devices: Sequence[jax.Device] | None = None):
        if dtype not in DTYPES:
            raise EmbedError(f"dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        if batch_size < 1:
            raise EmbedError(f"batch size must be positive, got {batch_size}")
        if isinstance(backbone, pretrained.Tower):
            self.tower = backbone
        else:
            self.tower = pretrained.load(backbone, image_size=image_size)
        if self.tower.config["pool"] == "none":
            raise EmbedError(f"{self.tower.path}: the tower has no pooling (pool='none'), so no embedding")
        self.image_size = image_size or checkpoint_resolution(self.tower)
        patch = self.tower.config["patch_size"]
        if (self.image_size // patch,) * 2 != tuple(s // patch for s in self.tower.image_size):
            raise EmbedError(f"{self.tower.path}: image_size {self.image_size} does not fit the tower's "
                             f"{self.tower.image_size} px position grid; load it with "
                             f"pretrained.load(path, image_size={self.image_size})")
        if resample is not None and resample not in pipeline.RESAMPLE:
            raise EmbedError(f"resample {resample!r}: expected one of {sorted(pipeline.RESAMPLE)}")
        self.resample = resample or checkpoint_resample(self.tower)
        self.dtype = dtype
        self.dim = int(self.tower.config["width"])
        devices = list(jax.devices() if devices is None else devices)
        if jax.process_count() > 1:
            raise EmbedError("embed runs in a single process (it writes the output files itself); "
                             f"this job has {jax.process_count()} processes")
        mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)), devices)
        self.batch_size = math.ceil(batch_size / len(devices)) * len(devices)
        self._batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self._params = jax.device_put(self.tower.params, replicated)
        module = self.tower.module(dtype=DTYPES[dtype])

        def pooled(params, images):
            embeddings, _ = module.apply({"params": params}, pipeline.to_unit_range(images))
            return embeddings.astype(jnp.float32)

        self._apply = jax.jit(pooled, in_shardings=(replicated, self._batch_sharding),
                              out_shardings=self._batch_sharding)

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = params_fingerprint(self.tower.params)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What decides the embeddings: the cache's backbone keys."""
        return {"backbone": str(pathlib.Path(self.tower.path).resolve()), "backbone_config": self.tower.config,
                "backbone_fingerprint": self.fingerprint, "image_size": self.image_size,
                "resample": self.resample, "dim": self.dim, "dtype": self.dtype}

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, dim]; images not at `image_size` are resized first."""
        chunks = ((images[i:i + self.batch_size], None) for i in range(0, len(images), self.batch_size))
        out = [e for e, _ in self.embed_stream(chunks)]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_stream(self, batches: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        """(images, payload) of at most `batch_size` rows -> (embeddings, payload), in order.

        Batch k+1 is dispatched before batch k is read back, so the device never waits for
        the host copy.
        """
        pending = None
        for images, payload in batches:
            launched = (self._launch(images), len(images), payload)
            if pending is not None:
                yield self._collect(*pending)
            pending = launched
        if pending is not None:
            yield self._collect(*pending)

    def _launch(self, images: np.ndarray) -> jax.Array | None:
        images = self._check(images)
        if len(images) == 0:
            return None
        padded = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8)
        padded[:len(images)] = images
        return self._apply(self._params, jax.device_put(padded, self._batch_sharding))

    def _collect(self, result: jax.Array | None, n: int, payload: Any) -> tuple[np.ndarray, Any]:
        if result is None:
            return np.zeros((0, self.dim), np.float32), payload
        return np.asarray(result)[:n], payload

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise EmbedError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) > self.batch_size:
            raise EmbedError(f"a batch of {len(images)} images is larger than the batch size {self.batch_size}")
        if images.shape[1:3] != (self.image_size, self.image_size):
            images = np.stack([self.resize(im) for im in images])
        return images

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> [image_size, image_size, 3], the checkpoint's preprocessing."""
        return pipeline.resize(image, self.image_size, resample=self.resample)


def checkpoint_resolution(tower: pretrained.Tower) -> int:
    """The pixels a checkpoint is fed: its Hugging Face config's `image_size` when that fits the
    position grid (a 384 px So400m/14 covers 378 px with its 27x27 grid; the VALID patch conv
    drops the rest), else grid x patch (big_vision .npz files do not record it)."""
    height, width = tower.image_size
    if height != width:
        raise EmbedError(f"{tower.path}: the tower covers {height}x{width} px; embed takes square images")
    if tower.source == "huggingface":
        config = json.loads((pretrained.huggingface_folder(tower.path) / "config.json").read_text())
        size = (config.get("vision_config") or config).get("image_size")
        if size and int(size) // tower.config["patch_size"] * tower.config["patch_size"] == height:
            return int(size)
    return height


def checkpoint_resample(tower: pretrained.Tower) -> str:
    """The resize filter of a Hugging Face folder's preprocessor_config.json, else bilinear.

    The rest of that file must describe SigLIP's [-1, 1] input (mean 0.5, std 0.5, x / 255), the
    one thing `to_unit_range` computes; another normalisation is an error naming the file.
    """
    if tower.source != "huggingface":
        return DEFAULT_RESAMPLE
    path = pretrained.huggingface_folder(tower.path) / "preprocessor_config.json"
    if not path.exists():
        return DEFAULT_RESAMPLE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmbedError(f"{path}: not JSON ({e})") from e
    for key, want in (("image_mean", [0.5] * 3), ("image_std", [0.5] * 3), ("rescale_factor", 1 / 255)):
        if key in config and not np.allclose(config[key], want, rtol=1e-6):
            raise EmbedError(f"{path}: {key} {config[key]} is not SigLIP's {want}; embed feeds the tower "
                             "x / 127.5 - 1")
    if "resample" not in config:
        return DEFAULT_RESAMPLE
    if config["resample"] not in HF_RESAMPLE:
        raise EmbedError(f"{path}: resample {config['resample']!r} is not one of PIL's filters {HF_RESAMPLE}")
    return HF_RESAMPLE[config["resample"]]


def params_fingerprint(params: Any) -> str:
    """sha256 of every parameter's name, dtype, shape and bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    for path, leaf in sorted(tree.flatten(params).items()):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{path}:{leaf.dtype}:{leaf.shape};".encode())
        digest.update(leaf.data)
    return "sha256:" + digest.hexdigest()[:16]


def batch_loader(num_items: int, batch_size: int, load: Callable[[np.ndarray], Any], threads: int):
    """load(indices) of consecutive batches of range(num_items), in order, `threads` at a time
    (what `embed` and `predict` read images with)."""
    ds = grain.MapDataset.range(num_items).batch(batch_size).map(load)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))


def progress_bar(total: int, initial: int = 0, desc: str = "embed"):
    """The images/s bar on stderr that `embed` and `predict` show; `initial` counts work resumed."""
    return tqdm(total=total, initial=initial, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)


# --- files, written atomically ------------------------------------------------------------------

@contextlib.contextmanager
def _atomic(path: pathlib.Path):
    """Yields a file open for writing at a temporary name; renamed to `path` when the block
    ends without error, removed otherwise."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    with _atomic(path) as f:
        np.savez(f, **arrays)


def _save_json(path: pathlib.Path, value: Any) -> None:
    with _atomic(path) as f:
        f.write((json.dumps(value, indent=1) + "\n").encode())


# --- a folder of images -------------------------------------------------------------------------

def list_files(root) -> list[pathlib.Path]:
    """Every regular file under `root`, sorted by relative path (each is tried as an image)."""
    root = pathlib.Path(root)
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def embed_folder(embedder: Embedder, images_dir, out, *, threads: int = 8) -> dict[str, Any]:
    """Embeds every readable image under `images_dir` into the .npz `out`; returns a summary.

    A file that is not a readable image is skipped, named on stderr and in the `skipped`
    array; the others go on.
    """
    root, out = pathlib.Path(images_dir).expanduser(), pathlib.Path(out).expanduser()
    if not root.is_dir():
        raise EmbedError(f"--images {root}: not a folder")
    files = list_files(root)
    if not files:
        raise EmbedError(f"--images {root}: no file found")

    def read(indices):
        images, kept, errors = inference.read_images([files[i] for i in indices], embedder.image_size, embedder.resample)
        return images, (indices[kept], sorted(set(indices) - set(indices[kept])), errors)

    paths, embeddings, skipped = [], [], []
    with progress_bar(len(files)) as bar:
        for vectors, (kept, missed, errors) in embedder.embed_stream(
                batch_loader(len(files), embedder.batch_size, read, threads)):
            for line in errors:
                tqdm.write(f"skipped {line}", file=sys.stderr)
            paths += [files[i].relative_to(root).as_posix() for i in kept]
            skipped += [files[i].relative_to(root).as_posix() for i in missed]
            embeddings.append(vectors)
            bar.update(len(kept) + len(missed))
    if not paths:
        raise EmbedError(f"--images {root}: none of the {len(files)} files is a readable image")
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(out, {"paths": np.asarray(paths, dtype=str), "embeddings": np.concatenate(embeddings),
                    "skipped": np.asarray(skipped, dtype=str), "backbone": np.asarray(embedder.describe()["backbone"]),
                    "image_size": np.asarray(embedder.image_size), "resample": np.asarray(embedder.resample)})
    return {"out": str(out), "embedded": len(paths), "skipped": skipped}


# --- a TFDS split into a sharded cache ----------------------------------------------------------

def parse_split(spec: str) -> tuple[str, str]:
    """'emonet_face_binary/224:train' -> ('emonet_face_binary/224', 'train')."""
    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split:
        raise EmbedError(f"--split {spec!r}: expected NAME/RESOLUTION:SPLIT, e.g. emonet_face_binary/224:train")
    return name, split


def label_fields(source) -> list[str]:
    """The records' numeric features (labels and masks): every feature but images and text."""
    features = source.dataset_info.features
    return sorted(k for k, f in features.items()
                  if not isinstance(f, tfds.features.Image) and isinstance(f, tfds.features.Tensor)
                  and np.dtype(f.np_dtype).kind in "biuf")


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.npz"


def shard_rows(meta: dict[str, Any], index: int) -> range:
    start = index * meta["shard_size"]
    return range(start, min(start + meta["shard_size"], meta["num_rows"]))


def cache_meta(cache_dir) -> dict[str, Any]:
    """The cache's meta.json."""
    path = pathlib.Path(cache_dir).expanduser() / "meta.json"
    if not path.is_file():
        raise EmbedError(f"{path} not found: is {cache_dir} an embedding cache (python -m emonet_jax.embed --split)?")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmbedError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise EmbedError(f"{path}: cache format {meta.get('format')!r}, this code reads format {FORMAT}")
    return meta


def load_cache(cache_dir) -> dict[str, np.ndarray]:
    """Every shard of a finished cache, concatenated in row order: {'embeddings' [N, D],
    'row' [N], 'image_id' [N], <each label field>}. Fails naming every missing shard, or the
    first corrupt one."""
    cache_dir = pathlib.Path(cache_dir).expanduser()
    meta = cache_meta(cache_dir)
    names = [shard_name(i, meta["num_shards"]) for i in range(meta["num_shards"])]
    missing = [n for n in names if not (cache_dir / n).is_file()]
    if missing:
        raise EmbedError(f"{cache_dir}: incomplete cache, {len(missing)} of {len(names)} shards missing: "
                         f"{', '.join(missing)}; re-run the embed command for {meta['split']} to finish it")
    keys = (*ROW_KEYS, *meta["fields"])
    parts = [_read_shard(cache_dir / n, meta, i, keys) for i, n in enumerate(names)]
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _read_shard(path: pathlib.Path, meta: dict[str, Any], index: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
    rows = shard_rows(meta, index)
    try:
        with np.load(path, allow_pickle=False) as npz:
            absent = [k for k in keys if k not in npz.files]
            if absent:
                raise EmbedError(f"no {', '.join(absent)}")
            data = {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EmbedError(f"{path}: corrupt shard ({e}); delete it and re-run the embed command for "
                         f"{meta['split']} to rewrite it") from None
    if not np.array_equal(data["row"], np.arange(rows.start, rows.stop)) or \
            data["embeddings"].shape != (len(rows), meta["dim"]):
        raise EmbedError(f"{path}: holds rows {_describe_rows(data['row'])} and embeddings "
                         f"{data['embeddings'].shape}, expected rows {rows.start}..{rows.stop - 1} and "
                         f"({len(rows)}, {meta['dim']})")
    return data


def _describe_rows(rows: np.ndarray) -> str:
    return f"{rows[0]}..{rows[-1]} ({len(rows)})" if len(rows) else "none"


def embed_split(embedder: Embedder, split: str, data_dir, cache_dir, *, shard_size: int = 4096,
                threads: int = 8) -> dict[str, Any]:
    """Embeds the rows of a prepared split ('name/res:split') into `cache_dir`, shard by shard,
    skipping shards a previous run finished. Returns the meta plus which shards were written."""
    name, split_name = parse_split(split)
    if shard_size < 1:
        raise EmbedError(f"--shard_size must be positive, got {shard_size}")
    data_dir = pathlib.Path(data_dir).expanduser()
    source = pipeline.open_split(name, split_name, data_dir)
    if len(source) == 0:
        raise EmbedError(f"{split} in {data_dir} has no rows")
    meta = {"format": FORMAT, **embedder.describe(), "split": split, "data_dir": str(data_dir.resolve()),
            "num_rows": len(source), "shard_size": shard_size,
            "num_shards": math.ceil(len(source) / shard_size), "fields": label_fields(source)}
    cache_dir = pathlib.Path(cache_dir).expanduser()
    _start_or_match(cache_dir, meta)
    todo = [i for i in range(meta["num_shards"]) if not _finished(cache_dir, meta, i, source)]
    done_rows = meta["num_rows"] - sum(len(shard_rows(meta, i)) for i in todo)
    with progress_bar(meta["num_rows"], done_rows, desc=f"embed {split}") as bar:
        for i in todo:
            arrays = _embed_rows(embedder, source, meta, i, bar, threads)
            _save_npz(cache_dir / shard_name(i, meta["num_shards"]), arrays)
    return {**meta, "shards_written": todo}


def _start_or_match(cache_dir: pathlib.Path, meta: dict[str, Any]) -> None:
    """Writes meta.json into a new cache, or checks that an existing one is the same job."""
    if not (cache_dir / "meta.json").exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_json(cache_dir / "meta.json", meta)
        return
    old = {"resample": DEFAULT_RESAMPLE, **cache_meta(cache_dir)}  # older caches did not record it
    differ = [k for k in MATCHING_KEYS if old.get(k) != meta[k]]
    if differ:
        lines = "\n".join(f"  {k}: cache {old.get(k)!r}, this run {meta[k]!r}" for k in differ)
        raise EmbedError(f"{cache_dir} holds embeddings of another job (backbone {old.get('backbone')}, split "
                         f"{old.get('split')}); refusing to mix them. Differences:\n{lines}\n"
                         "Use another --out, or delete that folder to start over.")


def _finished(cache_dir: pathlib.Path, meta: dict[str, Any], index: int, source) -> bool:
    """Whether shard `index` is already written (a shard that cannot be read is written again;
    one whose image ids are not the split's is refused)."""
    path = cache_dir / shard_name(index, meta["num_shards"])
    if not path.exists():
        return False
    try:
        data = _read_shard(path, meta, index, (*ROW_KEYS, *meta["fields"]))
    except EmbedError as e:
        tqdm.write(f"rewriting {path.name}: {e}", file=sys.stderr)
        return False
    rows = shard_rows(meta, index)
    for position, row in ((0, rows.start), (-1, rows.stop - 1)):
        expected = pipeline.as_text(source[row]["image_id"])
        if data["image_id"][position] != expected:
            raise EmbedError(f"{path}: row {row} is image {data['image_id'][position]!r}, but {meta['split']} in "
                             f"{meta['data_dir']} has {expected!r} there; the cache was made from other records. "
                             "Use another --out, or delete that folder to start over.")
    return True


def _embed_rows(embedder: Embedder, source, meta: dict[str, Any], index: int, bar, threads: int) -> dict:
    """One shard's arrays: embeddings, row, image_id and the label fields of its rows."""
    rows = shard_rows(meta, index)

    def read(positions):
        records = [source[rows.start + int(p)] for p in positions]
        images = np.stack([embedder.resize(r["image"]) for r in records])
        labels = {k: np.stack([np.asarray(r[k]) for r in records]) for k in meta["fields"]}
        labels["image_id"] = np.asarray([pipeline.as_text(r["image_id"]) for r in records], dtype=str)
        labels["row"] = rows.start + np.asarray(positions, np.int64)
        return images, labels

    parts = []
    for vectors, labels in embedder.embed_stream(batch_loader(len(rows), embedder.batch_size, read, threads)):
        parts.append({"embeddings": vectors, **labels})
        bar.update(len(vectors))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# --- command line -------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emonet_jax.embed",
        description="Pooled SigLIP / SigLIP2 embeddings of a folder of images (one .npz) or of a prepared "
                    "TFDS split (a sharded, resumable cache).")
    p.add_argument("--backbone", required=True, help="big_vision .npz, or Hugging Face folder / .safetensors")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images, walked recursively")
    source.add_argument("--split", help="prepared split NAME/RESOLUTION:SPLIT, e.g. emonet_face_binary/224:train")
    p.add_argument("--out", required=True, help="with --images: the .npz to write; with --split: the cache folder")
    p.add_argument("--data_dir", help="with --split: the TFDS data dir holding the prepared records")
    p.add_argument("--shard_size", type=int, default=4096, help="with --split: rows per cache shard")
    p.add_argument("--batch", type=int, default=64,
                   help="images per step (rounded up to a multiple of the device count)")
    p.add_argument("--image_size", type=int, default=None,
                   help="resize images to this (default: the checkpoint's resolution)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype of the tower")
    p.add_argument("--resample", default=None, choices=sorted(pipeline.RESAMPLE),
                   help="resize filter (default: the Hugging Face preprocessor_config.json's, else bilinear)")
    p.add_argument("--threads", type=int, default=8, help="threads reading and resizing images")
    host_memory.add_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.split is not None and args.data_dir is None:
        parser.error("--split needs --data_dir")
    host_memory.apply(args.reuse_freed_memory)   # before the tower's first step
    try:
        embedder = Embedder(args.backbone, args.batch, image_size=args.image_size, dtype=args.dtype,
                            resample=args.resample)
        print(f"{args.backbone}: {embedder.dim}-d embeddings of {embedder.image_size} px images "
              f"({embedder.resample} resize), "
              f"{embedder.batch_size} per step on {len(jax.devices())} {jax.devices()[0].platform} device(s)",
              file=sys.stderr)
        if args.images is not None:
            summary = embed_folder(embedder, args.images, args.out, threads=args.threads)
            print(f"wrote {summary['out']}: {summary['embedded']} images embedded, "
                  f"{len(summary['skipped'])} skipped")
        else:
            meta = embed_split(embedder, args.split, args.data_dir, args.out, shard_size=args.shard_size,
                               threads=args.threads)
            print(f"wrote {args.out}: {meta['num_rows']} rows of {meta['split']} in {meta['num_shards']} shards "
                  f"({len(meta['shards_written'])} written now, the others were already there)")
    except (EmbedError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
