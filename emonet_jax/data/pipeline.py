"""Input pipeline: prepared records -> grain -> global `jax.Array` batches on the mesh.

Reading uses `tfds.data_source` (array_record, random access, no TensorFlow). Every step
below is a pure function of (seed, example index), so a run is reproducible whatever the
number of grain workers, and the iterator state is a single index that the trainer
checkpoints for an exact resume:

  source --[process p keeps rows p, p+P, ...]--> shuffle(seed, per epoch) --> repeat
         --> decode + augment (random resized crop, flip; rng per example) --> batch
         --> [optional worker processes] --> make_array_from_process_local_data

Evaluation visits every row exactly once across processes; the last batch is padded, and
`mask` says which rows are real, so all processes run the same number of batches.
"""

from __future__ import annotations

import dataclasses
import math
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


def open_split(name: str, split: str, data_dir) -> Any:
    """Random-access source over prepared records, e.g. ('emonet_face_hq/224', 'test')."""
    return tfds.data_source(name, split=split, data_dir=str(data_dir))


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (SigLIP's preprocessing)."""
    return image.astype(np.float32) * (2 / 255) - 1


def resize(image: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3], bilinear, from `box` (left, top, right, bottom) or the whole image."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))


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


def process_rows(num_rows: int, process_index: int, process_count: int) -> np.ndarray:
    """Row indices a process trains on: disjoint across processes, together all rows
    except at most `process_count - 1` from the end (so every process has as many)."""
    usable = num_rows - num_rows % process_count
    return np.arange(process_index, usable, process_count)


def train_dataset(source, *, global_batch_size: int, image_size: int, seed: int,
                  augment: Augment = Augment(), process_index: int | None = None,
                  process_count: int | None = None, num_workers: int = 0,
                  threads: int = 8) -> grain.IterDataset:
    """Infinite, shuffled, augmented batches of this process's share of `source`."""
    process_index, process_count = _process(process_index, process_count, global_batch_size)
    rows = process_rows(len(source), process_index, process_count)
    if len(rows) == 0:
        raise ValueError(f"split of {len(source)} rows leaves nothing for process {process_index} of {process_count}")
    ds = grain.MapDataset.range(len(rows)).map(lambda i: source[int(rows[i])])
    ds = ds.shuffle(seed=seed).repeat(None)
    ds = ds.random_map(lambda x, rng: train_transform(x, rng, image_size=image_size, augment=augment), seed=seed)
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    return _finish(ds, num_workers, threads)


def eval_positions(num_rows: int, global_batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Global row positions a process evaluates, batch by batch ([num_batches * local]).

    In global batch b, process p takes positions b*B + p*L ... b*B + (p+1)*L - 1
    (L = B / P). Positions >= num_rows are padding.
    """
    local = global_batch_size // process_count
    num_batches = max(1, math.ceil(num_rows / global_batch_size))
    batch = np.arange(num_batches)[:, None] * global_batch_size
    return (batch + process_index * local + np.arange(local)[None, :]).reshape(-1)


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


def batch_sharding(mesh: jax.sharding.Mesh, batch_axes=("data",)) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))


def batches(dataset: grain.IterDataset, sharding) -> Iterator[dict[str, jax.Array]]:
    for local in dataset:
        yield device_batch(local, sharding)


def mixture_batch_sizes(global_batch_size: int, weights: dict[str, float], process_count: int = 1) -> dict[str, int]:
    """Rows of each source in a global batch: proportional to `weights` (largest remainder),
    each a multiple of `process_count` so every process takes the same share of each source."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    bad = {k: w for k, w in weights.items() if not w > 0}
    if bad or not weights:
        raise ValueError(f"training source weights must be > 0, got {weights}")
    units = global_batch_size // process_count
    total = sum(weights.values())
    exact = {k: units * w / total for k, w in weights.items()}
    sizes = {k: math.floor(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: sizes[k] - exact[k])[:units - sum(sizes.values())]:
        sizes[k] += 1
    empty = [k for k, v in sizes.items() if v == 0]
    if empty:
        raise ValueError(f"a global batch of {global_batch_size} leaves no rows for {empty} at weights {weights}; "
                         "raise the batch size or the weight")
    return {k: v * process_count for k, v in sizes.items()}


class Mixture:
    """Local batches that concatenate one batch of every training source, in a fixed order.

    The state is one grain iterator state per source, so a checkpoint restores the exact
    position of each stream.
    """

    def __init__(self, datasets: dict[str, grain.IterDataset]):
        self._iterators = {name: iter(ds) for name, ds in datasets.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iterators.values()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        return {name: it.get_state() for name, it in self._iterators.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != set(self._iterators):
            raise ValueError(f"iterator state has sources {sorted(state)}, this run trains on {sorted(self._iterators)}")
        for name, it in self._iterators.items():
            it.set_state(state[name])
