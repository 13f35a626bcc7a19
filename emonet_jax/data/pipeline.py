"""Input pipeline: prepared records -> grain -> global `jax.Array` batches on the mesh.

Reading uses `tfds.data_source` (array_record, random access, no TensorFlow). Every step
below is a pure function of (seed, position), so a run is reproducible whatever the number
of grain workers or processes, and the iterator state is a single index that the trainer
checkpoints for an exact resume:

  source --> shuffle(seed, per epoch) --> repeat --> decode + augment (rng per position)
         = one endless stream per source, the same on every process (`train_stream`)
  global batch b = stream_0[b*n_0 : (b+1)*n_0] ++ stream_1[b*n_1 : ...] ++ ...  (`mixture`)
         --> process p loads only its rows p*L ... (p+1)*L - 1 (L = B / P)
         --> [optional worker processes] --> make_array_from_process_local_data

So the global batches do not depend on the number of processes: P processes train on the
very batches one process would, each reading 1/P of every batch.

Evaluation visits every row exactly once across processes; the last batch is padded, and
`mask` says which rows are real, so all processes run the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

# Fields that become arrays on the device; strings (ids, prompts, demographics) stay on host.
LABEL_FIELDS = (
    "ratings", "rater_mask", "soft_label", "soft_label_mask", "mean_intensity", "extra", "extra_mask",
    "binary_votes", "binary_yes", "binary_target", "binary_present", "binary_mask")
HOST_FIELDS = ("image_id", "raters")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random resized crop (Inception-style) and horizontal flip."""
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


def open_split(name: str, split: str, data_dir, in_memory: bool = False) -> Any:
    """Random-access source over prepared records, e.g. ('emonet_face_hq/224', 'test').

    Fails at once, naming what is wrong, if the records are not prepared under `data_dir`, the
    split (or slice, 'train[:10%]') has no rows, or one of its shard files is missing (array_record
    opens shards at their first read, which would fail deep inside the input pipeline).
    `in_memory`: decode every row once and hold it in host memory (`DecodedInMemory`).
    """
    records = pathlib.Path(data_dir).expanduser() / name
    if not records.is_dir():
        raise FileNotFoundError(f"no prepared records of {name} in {data_dir} (no folder {records}); "
                                "prepare them with python -m emonet_jax.data.prepare")
    info = tfds.builder(name, data_dir=str(data_dir)).info.splits[split]
    if info.num_examples == 0:
        raise ValueError(f"split {split!r} of {name} in {data_dir} has no rows")
    missing = [fi.filename for fi in info.file_instructions if not os.path.exists(fi.filename)]
    if missing:
        raise FileNotFoundError(f"split {split!r} of {name} in {data_dir}: shard files missing: {missing}; "
                                f"delete {records} and prepare it again")
    source = tfds.data_source(name, split=split, data_dir=str(data_dir))
    return DecodedInMemory(source, f"{name} {split}") if in_memory else source


def _nbytes(row: Mapping[str, Any]) -> int:
    return sum(np.asarray(v).nbytes for v in row.values())  # bytes -> a |S array of len(v) bytes


def _frozen(row: dict[str, Any]) -> dict[str, Any]:
    for value in row.values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)
    return row


class DecodedInMemory:
    """A source's rows decoded once and kept in host memory.

    TFDS decodes a record (protobuf parse, then the JPEG) in about 2 ms of one core at every
    read; a training run reads each row once per epoch, so a small split read for many epochs
    (the demo's few thousand 64 px faces) spends most of its input time decoding the same rows
    again. Decoding costs len(source) reads up front; the memory is about len(source) times a
    decoded row (a 224 px row ~150 KB: Big's 203k rows would need ~30 GB), so a split whose
    estimate exceeds `max_bytes` (default half the machine's memory) is an error, not a swap storm.
    """

    def __init__(self, source, name: str, max_bytes: int | None = None):
        if max_bytes is None:
            max_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        first = source[0]
        estimate = _nbytes(first) * len(source)
        if estimate > max_bytes:
            raise ValueError(f"{name}: {len(source)} decoded rows would take about {estimate / 2**20:,.1f} MiB of "
                             f"host memory, over the {max_bytes / 2**20:,.1f} MiB allowed; read it from the records "
                             "(config input.in_memory=False)")
        # Read-only, so a transform that wrote into its input would fail instead of changing the row.
        self._rows = [_frozen(first)] + [_frozen(source[i]) for i in range(1, len(source))]
        self.name = name

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int):
        return self._rows[index]

    def __repr__(self) -> str:
        return f"DecodedInMemory({self.name}, {len(self)} rows)"


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (SigLIP's preprocessing)."""
    return image.astype(np.float32) * (2 / 255) - 1


# PIL's filters by name; their codes are what Hugging Face preprocessor configs call `resample`.
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
            "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resize(image: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None,
           resample: str = "bilinear") -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] with PIL's `resample` filter, from `box` (left, top,
    right, bottom) or the whole image."""
    return np.asarray(Image.fromarray(image).resize((size, size), RESAMPLE[resample], box=box))


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, augment: Augment):
    """(left, top, right, bottom) covering `scale` of the area with aspect in `ratio`."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*augment.scale)
        aspect = math.exp(rng.uniform(math.log(augment.ratio[0]), math.log(augment.ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            return int(left), int(top), int(left + w), int(top + h)
    return 0, 0, width, height


def central_crop_box(height: int, width: int, fraction: float):
    h, w = round(height * fraction), round(width * fraction)
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _select(example: Mapping[str, Any], image: np.ndarray) -> dict[str, np.ndarray]:
    out = {"image": to_unit_range(image)}
    out.update({k: np.asarray(example[k]) for k in LABEL_FIELDS})
    # Text features come back as bytes; ids are more useful as str on the host.
    out["image_id"] = np.asarray(as_text(example["image_id"]), dtype=object)
    out["raters"] = np.asarray([as_text(r) for r in example["raters"]], dtype=object)
    return out


def as_text(value) -> str:
    """A TFDS Text feature (bytes from data_source) as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def augment_image(image: np.ndarray, rng: np.random.Generator, image_size: int, augment: Augment) -> np.ndarray:
    """Random resized crop to image_size, then a random flip (uint8 in, uint8 out)."""
    box = random_resized_crop_box(image.shape[0], image.shape[1], rng, augment)
    image = resize(image, image_size, box)
    if augment.flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return image


def train_transform(example, rng: np.random.Generator, *, image_size: int, augment: Augment):
    return _select(example, augment_image(example["image"], rng, image_size, augment))


def eval_transform(example, *, image_size: int, crop: float):
    image = example["image"]
    image = resize(image, image_size, central_crop_box(image.shape[0], image.shape[1], crop))
    return _select(example, image)


def _finish(ds: grain.MapDataset, num_workers: int, threads: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if num_workers > 0:
        # grain's workers read absl flags; outside an absl app (tests, notebooks) they are
        # unparsed, which would crash the workers. Defaults are what we want there.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def _process(index: int | None, count: int | None, global_batch_size: int) -> tuple[int, int]:
    """This process's (index, count), defaulting to JAX's, checked against the batch size."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if global_batch_size % count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {count} processes")
    return index, count


def global_row(local_index, global_batch_size: int, process_index: int, process_count: int):
    """Where a process's `local_index`-th row sits in the global sequence of rows.

    Global batch b holds rows b*B ... b*B + B - 1 and process p holds its rows
    p*L ... (p+1)*L - 1 (L = B / P), the rows its devices get from `device_batch`.
    Works on ints and integer arrays.
    """
    local = global_batch_size // process_count
    batch, offset = divmod(local_index, local)
    return batch * global_batch_size + process_index * local + offset


def train_stream(source, *, image_size: int, seed: int, augment: Augment = Augment()) -> grain.MapDataset:
    """Endless shuffled (per epoch) and augmented examples of `source`, the same on every process.

    Element g is row `perm_{g // n}[g % n]` cropped with an rng of (seed, g): random access,
    so each process computes only the elements it trains on.
    """
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    return ds.random_map(lambda x, rng: train_transform(x, rng, image_size=image_size, augment=augment), seed=seed)


def mixture(streams: Mapping[str, grain.MapDataset], sizes: Mapping[str, int], *,
            process_index: int | None = None, process_count: int | None = None, num_workers: int = 0,
            threads: int = 8) -> grain.IterDataset:
    """This process's local batches of global batches mixing `sizes[name]` rows of each stream.

    Global batch b concatenates stream[b*n : (b+1)*n] of every stream in order (n = its size);
    process p loads only the rows `global_row` gives it. E.g. sizes {big: 24, binary: 8} and
    2 processes: process 0 loads big rows 0-15 of each batch, process 1 big 16-23 + binary 0-7.
    """
    global_batch_size = sum(sizes.values())
    process_index, process_count = _process(process_index, process_count, global_batch_size)
    names = list(sizes)
    starts = np.cumsum([0] + [sizes[name] for name in names])[:-1]  # each stream's first row in a batch

    def element(i: int):
        batch, row = divmod(global_row(i, global_batch_size, process_index, process_count), global_batch_size)
        k = int(np.searchsorted(starts, row, side="right")) - 1
        return streams[names[k]][batch * sizes[names[k]] + row - int(starts[k])]

    ds = grain.MapDataset.range(sys.maxsize).map(element)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    return _finish(ds, num_workers, threads)


def train_dataset(source, *, global_batch_size: int, image_size: int, seed: int,
                  augment: Augment = Augment(), process_index: int | None = None,
                  process_count: int | None = None, num_workers: int = 0,
                  threads: int = 8) -> grain.IterDataset:
    """Endless, shuffled, augmented local batches of one source (`mixture` of one stream)."""
    stream = train_stream(source, image_size=image_size, seed=seed, augment=augment)
    return mixture({"train": stream}, {"train": global_batch_size}, process_index=process_index,
                   process_count=process_count, num_workers=num_workers, threads=threads)


def eval_positions(num_rows: int, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Global row positions a process evaluates, batch by batch ([num_batches * local]).

    In global batch b, process p takes positions b*B + p*L ... b*B + (p+1)*L - 1
    (L = B / P). Positions >= num_rows are padding.
    """
    num_batches = max(1, math.ceil(num_rows / global_batch_size))
    local = np.arange(num_batches * (global_batch_size // process_count))
    return global_row(local, global_batch_size, process_index, process_count)


def eval_dataset(source, *, global_batch_size: int, image_size: int, crop: float = 0.875,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int = 0, threads: int = 8) -> grain.IterDataset:
    """One pass over `source` in padded batches with a boolean `mask`."""
    process_index, process_count = _process(process_index, process_count, global_batch_size)
    n = len(source)
    positions = eval_positions(n, global_batch_size, process_index, process_count)

    def load(i):
        position = int(positions[i])
        out = eval_transform(source[min(position, n - 1)], image_size=image_size, crop=crop)
        out["mask"] = np.asarray(position < n)
        return out

    ds = grain.MapDataset.range(len(positions)).map(load)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=False)
    return _finish(ds, num_workers, threads)


def device_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded along the batch; host fields are dropped."""
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local.items() if k not in HOST_FIELDS}


def check_process_rows(sharding: jax.sharding.Sharding, global_batch_size: int) -> None:
    """Fails unless `sharding` puts rows p*L ... (p+1)*L - 1 of a global batch on this process's
    devices, the rows the pipelines load here (`global_row`). True of meshes laid over
    `jax.devices()` in order, which lists each process's devices together."""
    index, count = _process(None, None, global_batch_size)
    local = global_batch_size // count
    rows = sorted({sl[0].indices(global_batch_size)[:2]
                   for sl in sharding.addressable_devices_indices_map((global_batch_size,)).values()})
    held = set().union(*(range(start, stop) for start, stop in rows))
    if held != set(range(index * local, (index + 1) * local)):
        raise ValueError(f"the batch sharding puts rows {rows} of a global batch of {global_batch_size} on process "
                         f"{index} of {count}, which loads rows {index * local}-{(index + 1) * local - 1}; build "
                         "the mesh over jax.devices() in their order")


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes=("data",)) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))


def batches(dataset: grain.IterDataset, sharding) -> Iterator[dict[str, jax.Array]]:
    for local in dataset:
        yield device_batch(local, sharding)


def mixture_batch_sizes(global_batch_size: int, weights: dict[str, float]) -> dict[str, int]:
    """Rows of each source in a global batch: proportional to `weights` (largest remainder).
    Independent of the number of processes (`mixture` lets a process's rows span sources)."""
    bad = {k: w for k, w in weights.items() if not w > 0}
    if bad or not weights:
        raise ValueError(f"training source weights must be > 0, got {weights}")
    total = sum(weights.values())
    exact = {k: global_batch_size * w / total for k, w in weights.items()}
    sizes = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: sizes[k] - exact[k])[:global_batch_size - sum(sizes.values())]:
        sizes[k] += 1
    empty = [k for k, v in sizes.items() if v == 0]
    if empty:
        raise ValueError(f"a global batch of {global_batch_size} leaves no rows for {empty} at weights {weights}; "
                         "raise the batch size or the weight")
    return sizes


class Mixture:
    """The trainer's input: local batches of `mixture`, with a checkpointable state that names
    the sources, so a run cannot resume onto a different mixture.

    The state is {'sources': [...], 'iterator': grain state (the next batch index)}; a state
    saved with one iterator per source (before the sources shared one) is read too.
    """

    def __init__(self, dataset: grain.IterDataset, sources):
        self.sources = list(sources)
        self._iterator = iter(dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"sources": self.sources, "iterator": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if "iterator" not in state:  # one {'next_index': b} per source, every source at batch b
            indices = {s.get("next_index") if isinstance(s, dict) else None for s in state.values()}
            if len(indices) != 1 or None in indices:
                raise ValueError(f"cannot read the data-iterator state {state}")
            state = {"sources": list(state), "iterator": {"next_index": indices.pop()}}
        if sorted(state["sources"]) != sorted(self.sources):
            raise ValueError(f"iterator state has sources {sorted(state['sources'])}, "
                             f"this run trains on {sorted(self.sources)}")
        self._iterator.set_state(state["iterator"])
