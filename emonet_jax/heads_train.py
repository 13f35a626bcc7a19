"""Trains EmpathicInsight-Face's 40 heads on cached embeddings: pre-train on Big, fine-tune on
Binary, evaluate on HQ, export.

    python -m emonet_jax.heads_train --config=configs/empathic_insight.py:small --workdir=workdirs/ei_small
    python -m emonet_jax.heads_train --config=configs/empathic_insight.py:small:demo --workdir=workdirs/ei_demo
    # Re-export a finished run (by default into WORKDIR/export):
    python -m emonet_jax.heads_train --config=... --workdir=DIR --export_only [--config.export_dir=OUT]

The inputs are embedding caches (`emonet_jax/embed.py`): one per split, read with
`embed.load_cache`. With `embed.backbone` set the trainer first makes any cache that is
missing or unfinished from the prepared records (`embed.embed_split`, which skips the shards
already written); otherwise the caches must exist (`python -m emonet_jax.embed --split=...`).
Splits are named `dataset:split` and read at `data.resolution` (the prepared records'
resolution); a split's cache is `stage.cache` if given, else
`data.cache_dir/<dataset>_<resolution>_<split>` (default cache_dir: RECORDS/embeddings).
Every cache of a run must come from the same backbone weights, resolution and compute dtype.

Stages, in this order (a stage with `epochs = 0` is skipped):

  1. pretrain   Big: regress the VLM's mean intensity (`mean_intensity`, 0-7, fractional) where
                `soft_label_mask` says the emotion was rated. Squared error: the heads' output
                IS the 0-7 score, and the mean of the VLM's ratings is what its distribution
                says about that score.
  2. finetune   Binary: the experts' present/absent votes (`binary_target` = share of "present"
                votes, where `binary_mask`). Loss (`target='presence'`):
                    (1 - s) * relu(score)^2 + s * relu(1 - score)^2
                "present" means a non-zero intensity, i.e. a score of at least 1; "absent" a
                score of at most 0. A vote says nothing about HOW intense a present emotion is,
                so scores above 1 (and below 0) are left where pre-training put them, and the
                0-7 scale learned on Big survives fine-tuning. For a split vote the minimum
                is at score = s. (Regressing on 7 x share would call every present emotion a
                7; a BCE on a sigmoid of the score would push scores towards +-infinity and
                lose the scale the agreement metrics read.)
  3. evaluate   after each stage: the heads' scores on the HQ cache become one annotator
                beside the experts (`evaluate/model_eval.evaluate_scores`, the ViT trainer's
                protocol and files: WORKDIR/eval/hq_agreement.{json,md}, hq_predictions.npz
                with `intensity` = raw score and `mean_subtracted`, hq_model.csv). The
                experts' names come from the HQ records the cache was made from.
  4. export     WORKDIR/export/{heads.safetensors, card.json} (`models/heads.export`);
                the subtracted means are the per-head means of the raw scores over HQ.

One jitted step updates all 40 heads (state donated); its products take `model.compute_dtype`
operands (bfloat16 by default, float32 accumulation: `models/mixed_precision.py`) while
parameters, optimizer and embeddings stay float32, and evaluation (HQ, validation, the
export's means) runs float32 products, as `predict` does from the export. Each head's loss is
the mean over its labelled (image, emotion) pairs in the batch and the heads' losses are
summed, so every head gets exactly the gradient it would get trained alone; a pair without a
label contributes nothing (a head with no label in a batch gets a zero gradient). AdamW per
stage, warmup + cosine (`optim.schedule`); weight decay on kernels only. No global-norm
clipping: one norm over 40 heads would couple their updates. The data sit on the device and each step gathers
its rows there. Every random draw is a function of (seed, stage, epoch) or (seed, step), so a
run is deterministic, and re-running the command on the same workdir resumes from the last
finished epoch (WORKDIR/checkpoints, orbax) with the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from clu import metrics as clu_metrics
from ml_collections import config_flags

from emonet_jax import checkpoint, embed, host_memory, inference, optim, taxonomy, train, tree, writers
from emonet_jax.data import pipeline, prepare
from emonet_jax.evaluate import model_eval
from emonet_jax.models import heads

STAGES = ("pretrain", "finetune")
# target kind -> (label field, mask field) of the cache
TARGETS = {"intensity": ("mean_intensity", "soft_label_mask"), "presence": ("binary_target", "binary_mask")}
# meta.json keys every cache of one run must share (the same embedding function)
SAME_EMBEDDING = ("backbone_fingerprint", "backbone_config", "image_size", "dim", "dtype")


class HeadsDataError(ValueError):
    """A cache that cannot be trained on as it is; the message names the cache and the row."""


# --- caches -------------------------------------------------------------------------------

def records_dir(config) -> pathlib.Path:
    """The TFDS data dir of the records (generated and prepared first for synthetic data)."""
    data_dir = pathlib.Path(config.data.data_dir).expanduser()
    if not config.data.synthetic:
        return data_dir
    spec = prepare.SyntheticSpec(num_hq=config.data.num_hq, num_binary=config.data.num_binary,
                                 num_big=config.data.num_big, seed=config.data.synthetic_seed)
    return pathlib.Path(prepare.prepare_synthetic(data_dir, config.data.resolution, spec)["data_dir"])


def full_split(config, split: str) -> str:
    """'emonet_face_big:train' -> 'emonet_face_big/<data.resolution>:train' (embed's split name)."""
    dataset, sep, name = split.partition(":")
    if not sep or not dataset or not name or "/" in dataset:
        raise ValueError(f"split {split!r}: expected DATASET:SPLIT, e.g. emonet_face_big:train")
    return f"{dataset}/{config.data.resolution}:{name}"


def cache_path(config, split: str, explicit: str, records: pathlib.Path) -> pathlib.Path:
    """`explicit`, else data.cache_dir (default: RECORDS/embeddings) / 'dataset_resolution_split'."""
    if explicit:
        return pathlib.Path(explicit).expanduser()
    root = pathlib.Path(config.data.cache_dir).expanduser() if config.data.cache_dir else records / "embeddings"
    name, split_name = embed.parse_split(full_split(config, split))
    return root / f"{name.replace('/', '_')}_{split_name}"


class Caches:
    """The run's caches by split: made on first load when `embed.backbone` is set, then read.

    Every cache it opens must hold the same embedding function (SAME_EMBEDDING keys)."""

    def __init__(self, config, records: pathlib.Path):
        self.config, self.records = config, records
        self._embedder = None
        self._loaded: dict[pathlib.Path, dict[str, np.ndarray]] = {}
        self._metas: dict[pathlib.Path, dict[str, Any]] = {}

    def meta(self, split: str, explicit: str = "") -> dict[str, Any]:
        """meta.json of a split's cache (made first when embed.backbone is set)."""
        path = cache_path(self.config, split, explicit, self.records)
        if path not in self._metas:
            meta = embed.cache_meta(path)
            for other_path, other in self._metas.items():
                differ = [k for k in SAME_EMBEDDING if meta.get(k) != other.get(k)]
                if differ:
                    raise HeadsDataError(
                        f"{path} and {other_path} hold different embeddings ({', '.join(differ)} differ: "
                        f"{meta.get('backbone')} vs {other.get('backbone')}); the heads must train and be "
                        "evaluated on one embedding function")
            self._metas[path] = meta
        return self._metas[path]

    def load(self, split: str, explicit: str = "") -> tuple[pathlib.Path, dict[str, np.ndarray], dict[str, Any]]:
        """(path, arrays, meta) of a split's cache, making it first when embed.backbone is set."""
        path = cache_path(self.config, split, explicit, self.records)
        if path not in self._loaded:
            self._make(split, path)
            meta = self.meta(split, explicit)
            self._loaded[path] = embed.load_cache(path)
            if meta["split"] != full_split(self.config, split):
                raise HeadsDataError(f"{path} holds embeddings of {meta['split']}, not {full_split(self.config, split)}")
        return path, self._loaded[path], self._metas[path]

    def _make(self, split: str, path: pathlib.Path) -> None:
        cfg = self.config.embed
        if not cfg.backbone:
            return  # load_cache names a missing or unfinished cache and the command that makes it
        if self._embedder is None:
            self._embedder = embed.Embedder(cfg.backbone, cfg.batch_size, image_size=cfg.image_size or None,
                                            dtype=cfg.dtype)
        # Resumable: shards already written are checked and skipped.
        embed.embed_split(self._embedder, full_split(self.config, split), self.records, path,
                          shard_size=cfg.shard_size, threads=cfg.threads)


def embeddings(cache: dict[str, np.ndarray], where: pathlib.Path) -> np.ndarray:
    """The cache's embeddings [N, D] float32; a non-finite one fails naming its row and image."""
    x = np.asarray(cache["embeddings"], np.float32)
    bad_rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad_rows):
        raise HeadsDataError(f"{where}: non-finite embedding in {len(bad_rows)} rows, first row {bad_rows[0]} "
                             f"(image {cache['image_id'][bad_rows[0]]!r})")
    return x


def stage_arrays(cache: dict[str, np.ndarray], target: str, where: pathlib.Path) -> dict[str, np.ndarray]:
    """{'x' [N, D], 'target' [N, 40], 'mask' [N, 40] float32} of a cache for a target kind.

    A non-finite embedding, or a non-finite label where the mask says labelled, fails naming
    the cache, the row and the emotion; unlabelled pairs get target 0 (they weigh nothing)."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}: expected one of {sorted(TARGETS)}")
    label_key, mask_key = TARGETS[target]
    missing = [k for k in ("embeddings", "image_id", label_key, mask_key) if k not in cache]
    if missing:
        raise HeadsDataError(f"{where}: the cache has no {missing} (target {target!r} needs {label_key} and "
                             f"{mask_key}; is it a cache of the right dataset?)")
    x = embeddings(cache, where)
    labels, mask = np.asarray(cache[label_key], np.float32), np.asarray(cache[mask_key]).astype(bool)
    n = len(x)
    if labels.shape != (n, taxonomy.NUM_EMOTIONS) or mask.shape != labels.shape:
        raise HeadsDataError(f"{where}: {label_key} {labels.shape} / {mask_key} {mask.shape}, expected "
                             f"({n}, {taxonomy.NUM_EMOTIONS})")
    bad = np.argwhere(mask & ~np.isfinite(labels))
    if len(bad):
        row, e = bad[0]
        raise HeadsDataError(f"{where}: {len(bad)} labelled pairs with a non-finite {label_key}, first row {row} "
                             f"(image {cache['image_id'][row]!r}), emotion {taxonomy.NAMES[e]}")
    return {"x": x, "target": np.where(mask, labels, 0).astype(np.float32), "mask": mask.astype(np.float32)}


# --- losses and the update step --------------------------------------------------------------

def pair_losses(scores: jax.Array, targets: jax.Array, target: str) -> jax.Array:
    """[B, 40] loss of every (image, emotion) pair (see the module docstring)."""
    if target == "intensity":
        return jnp.square(scores - targets)
    if target == "presence":
        return (1 - targets) * jnp.square(jax.nn.relu(scores)) + targets * jnp.square(jax.nn.relu(1 - scores))
    raise ValueError(f"target {target!r}: expected one of {sorted(TARGETS)}")


def heads_loss(scores, targets, mask, target: str) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(sum over heads of each head's mean loss over its labelled pairs, (loss sum, pair count)).

    An unlabelled pair (mask 0) adds nothing to the loss or the gradients, whatever its label holds."""
    labelled = mask > 0
    losses = jnp.where(labelled, pair_losses(scores, jnp.where(labelled, targets, 0), target), 0)
    per_head = losses.sum(0) / jnp.maximum(mask.sum(0), 1)
    return per_head.sum(), (losses.sum(), mask.sum())


def make_optimizer(stage, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + cosine; weight decay on kernels (biases are [40, out], not decayed)."""
    lr = optim.schedule(stage, total_steps)
    decay = lambda params: tree.map_with_path(lambda p, _: p.endswith("kernel"), params)  # noqa: E731
    return optax.adamw(lr, b1=stage.b1, b2=stage.b2, weight_decay=stage.weight_decay, mask=decay), lr


def make_train_step(model: heads.Heads, tx: optax.GradientTransformation, target: str, seed: int):
    """jit((state, data, rows, valid) -> (state, metrics)), state donated.

    `data` (`device_data`) stays on the device; `rows` [B] int32 picks the batch and `valid`
    [B] is 0 for the padding that fills the last batch of an epoch."""

    def loss_fn(params, x, targets, mask, rng):
        scores = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return heads_loss(scores, targets, mask, target)

    def step(state, data, rows, valid):
        x, targets = data["x"][rows], data["target"][rows]
        mask = data["mask"][rows] * valid[:, None]
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        (_, (loss_sum, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], x, targets, mask, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        # The first step with a non-finite loss is recorded and the host stops the run at its
        # next check, before any checkpoint (parameters are checked too before each one).
        # Selecting between old and new state on device as the ViT trainer does, or taking the
        # gradients' norm, would double the time of this small, memory-bound step.
        bad = ~jnp.isfinite(loss_sum)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state,
                     "first_bad_step": jnp.where((state["first_bad_step"] < 0) & bad, state["step"],
                                                 state["first_bad_step"])}
        return new_state, {"loss": clu_metrics.Average(total=loss_sum, count=count)}

    return jax.jit(step, donate_argnums=(0,))


def device_data(arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """A stage's {'x', 'target', 'mask'} on the device, where each step gathers its rows."""
    return jax.device_put({k: arrays[k] for k in ("x", "target", "mask")})


def check_finite(state, step: int, params: bool = False) -> None:
    """Raises train.NonFiniteLoss naming the first step whose loss was not finite (or, with
    `params`, if a parameter is not finite)."""
    bad = int(jax.device_get(state["first_bad_step"]))
    if bad >= 0:
        raise train.NonFiniteLoss(f"the loss became NaN/inf at step {bad + 1} (checked at step {step}); "
                                  "no checkpoint was written after it, the latest one is from before")
    if params and not bool(jnp.isfinite(optax.tree.norm(state["params"]))):
        raise train.NonFiniteLoss(f"parameters became NaN/inf by step {step}; no checkpoint was written after "
                                  "it, the latest one is from before")


def epoch_batches(num_rows: int, batch_size: int, seed: int, stage_index: int, epoch: int):
    """[(rows int32 [B], valid float32 [B])] covering a seeded permutation of every row once;
    the last batch is padded (valid 0), so one compiled shape serves the whole run."""
    order = np.random.default_rng([seed, stage_index, epoch]).permutation(num_rows)
    batches = []
    for start in range(0, num_rows, batch_size):
        chunk = order[start:start + batch_size]
        rows = np.zeros(batch_size, np.int32)
        rows[:len(chunk)] = chunk
        valid = np.zeros(batch_size, np.float32)
        valid[:len(chunk)] = 1
        batches.append((rows, valid))
    return batches


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return -(-num_rows // batch_size)


def new_state(model: heads.Heads, tx, dim: int, seed: int) -> dict[str, Any]:
    params = model.init(jax.random.key(seed), jnp.zeros((1, dim), jnp.float32))["params"]
    return {"step": jnp.zeros((), jnp.int32), "first_bad_step": jnp.full((), -1, jnp.int32),
            "params": params, "opt_state": tx.init(params)}


def val_loss(model: heads.Heads, params, data: dict[str, np.ndarray], target: str, batch_size: int) -> float:
    """Mean loss over the labelled pairs of a validation cache (eval mode)."""
    scores = heads.apply_in_batches(model, params, data["x"], batch_size)
    losses = np.asarray(pair_losses(jnp.asarray(scores), jnp.asarray(data["target"]), target)) * data["mask"]
    return float(losses.sum() / max(data["mask"].sum(), 1))


# --- the run ----------------------------------------------------------------------------------

def build_model(config) -> heads.Heads:
    m = config.model
    return heads.build(m.variant, m.hidden, m.dropout, m.input_norm, m.compute_dtype)


@dataclasses.dataclass
class Stage:
    name: str
    index: int
    config: Any
    cache: pathlib.Path
    data: dict[str, np.ndarray]
    val: dict[str, np.ndarray] | None

    @property
    def total_steps(self) -> int:
        return self.config.epochs * steps_per_epoch(len(self.data["x"]), self.config.batch_size)


def load_stages(config, caches: Caches) -> list[Stage]:
    stages = []
    for index, name in enumerate(STAGES):
        cfg = config[name]
        if cfg.epochs <= 0:
            continue
        path, cache, _ = caches.load(cfg.split, cfg.cache)
        data = stage_arrays(cache, cfg.target, path)
        val = None
        if cfg.val_split:
            val_path, val_cache, _ = caches.load(cfg.val_split, cfg.val_cache)
            val = stage_arrays(val_cache, cfg.target, val_path)
        stages.append(Stage(name, index, cfg, path, data, val))
        logging.info("%s: %d rows of %s (%s), %d labelled pairs", name, len(data["x"]), cfg.split, path,
                     int(data["mask"].sum()))
    if not stages:
        raise ValueError("every stage has epochs = 0: nothing to train")
    return stages


def hq_experts(hq_meta: dict[str, Any], cache: dict[str, np.ndarray], data_dir: str, where: pathlib.Path):
    """The experts' (ids, names, ratings) of the HQ records the cache was made from, in cache order."""
    name, split = embed.parse_split(hq_meta["split"])
    records = pathlib.Path(data_dir).expanduser() if data_dir else pathlib.Path(hq_meta["data_dir"])
    ids, names, table = model_eval.read_expert_ratings(pipeline.open_split(name, split, records))
    rows = np.asarray(cache["row"])
    if len(rows) != len(ids) or not np.array_equal(np.asarray(ids)[rows], cache["image_id"]):
        raise HeadsDataError(f"{where}: its rows and image ids are not those of {hq_meta['split']} in {records} "
                             f"({len(rows)} cached rows, {len(ids)} records); re-make the cache from these records")
    return [ids[r] for r in rows], names, table[:, rows]


class HQEval:
    """The HQ cache's embeddings and the experts' ratings; `run(params)` scores and writes."""

    def __init__(self, config, caches: Caches):
        self.config = config
        path, cache, meta = caches.load(config.eval.split, config.eval.cache)
        self.x = embeddings(cache, path)
        self.experts = hq_experts(meta, cache, config.eval.data_dir, path)

    def run(self, model, params, step: int, writer, workdir: pathlib.Path) -> dict[str, Any]:
        raw = heads.apply_in_batches(model, params, self.x, self.config.eval.batch_size)
        means = raw.mean(axis=0)
        scores = {"intensity": raw, "mean_subtracted": raw - means}
        return model_eval.evaluate_scores(self.experts, scores, step, writer, workdir)


def train_and_evaluate(config, workdir) -> dict[str, Any]:
    """Runs the stages (resuming from WORKDIR/checkpoints), evaluates on HQ, exports.

    Returns {'step', 'eval': {stage: summary}, 'export': dir, 'params'}."""
    if not config.eval.split:
        raise ValueError("eval.split is empty: the export subtracts the heads' mean scores over HQ, so the run "
                         "needs the HQ cache (eval.split = 'emonet_face_hq:test')")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(config)
    records = records_dir(config)
    caches = Caches(config, records)
    stages = load_stages(config, caches)
    evaluator = HQEval(config, caches)
    dim = stages[0].data["x"].shape[1]
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    ckpt = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    tx0, _ = make_optimizer(stages[0].config, stages[0].total_steps)
    state = jax.jit(lambda: new_state(model, tx0, dim, config.seed))()
    resume = None
    latest = ckpt.latest_step()
    if latest is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state, resume = ckpt.restore(latest, abstract)
        writers.drop_after(workdir / "metrics.jsonl", latest)
        logging.info("resuming from step %d (%s)", latest, resume)
    writer = writers.create(workdir, True)
    summaries = {}
    names = [s.name for s in stages]
    if resume is not None and resume["stage"] not in names:
        raise ValueError(f"{ckpt.directory}: the latest checkpoint is from stage {resume['stage']!r}, which this "
                         f"config does not train ({names}); use another workdir")
    for stage in stages:
        if resume is not None and names.index(stage.name) < names.index(resume["stage"]):
            continue
        start_epoch = 0
        if resume is not None and resume["stage"] == stage.name:
            check_resumable(resume, stage, config, ckpt.directory)
            start_epoch = resume["epochs_done"]
        state = run_stage(model, stage, state, start_epoch, config, ckpt, writer)
        step = int(state["step"])
        if stage.val is not None:
            writer.write_scalars(step, {f"val/{stage.name}_loss": val_loss(
                model, state["params"], stage.val, stage.config.target, config.eval.batch_size)})
        summaries[stage.name] = evaluator.run(model, state["params"], step, writer, workdir)["summary"]
        logging.info("HQ after %s: %s", stage.name, summaries[stage.name])
    ckpt.close()
    writer.close()
    params = jax.device_get(state["params"])
    out = export_run(config, workdir, params, caches, pathlib.Path(config.export_dir or workdir / "export"))
    return {"step": int(state["step"]), "eval": summaries, "export": str(out), "params": params}


def progress(stage: Stage, epochs_done: int, config) -> dict[str, Any]:
    """What a checkpoint records of the run's position (and what must not change to resume it)."""
    return {"stage": stage.name, "epochs_done": epochs_done, "steps": stage.total_steps,
            "batch_size": stage.config.batch_size, "seed": config.seed}


def check_resumable(saved: dict[str, Any], stage: Stage, config, where) -> None:
    now = progress(stage, saved["epochs_done"], config)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, config {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if differ:
        raise ValueError(f"{where}: cannot resume stage {stage.name!r} with a different schedule or data "
                         f"({'; '.join(differ)}); use another workdir")


def run_stage(model, stage: Stage, state, start_epoch: int, config, ckpt, writer):
    cfg = stage.config
    tx, lr = make_optimizer(cfg, stage.total_steps)
    if start_epoch == 0:  # a stage starts with fresh optimizer moments and schedule
        state = {**state, "opt_state": jax.jit(tx.init)(state["params"])}
    train_step = make_train_step(model, tx, cfg.target, config.seed)
    data = device_data(stage.data)
    stage_start = int(state["step"]) - start_epoch * steps_per_epoch(len(stage.data["x"]), cfg.batch_size)
    accumulated, start = None, time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        for rows, valid in epoch_batches(len(stage.data["x"]), cfg.batch_size, config.seed, stage.index, epoch):
            state, metrics = train_step(state, data, rows, valid)
            accumulated = train.merge(accumulated, metrics)
            step = int(state["step"])
            if step % config.log_every_steps == 0:
                check_finite(state, step)
                train.log_train(writer, step, accumulated, float(lr(step - stage_start - 1)))
                accumulated = None
        step = int(state["step"])
        check_finite(state, step, params=True)  # never checkpoint a broken run
        ckpt.save(step, state, progress(stage, epoch + 1, config), force=True)
    if accumulated is not None:
        train.log_train(writer, int(state["step"]), accumulated, float(lr(int(state["step"]) - stage_start - 1)))
    logging.info("%s: %d epochs to step %d in %.1f s", stage.name, cfg.epochs, int(state["step"]),
                 time.perf_counter() - start)
    return state


# --- export -------------------------------------------------------------------------------------

def export_run(config, workdir: pathlib.Path, params, caches: Caches, out_dir: pathlib.Path) -> pathlib.Path:
    """Writes the heads and their card; the means are the run's HQ means (inference.reference_means)."""
    trained_on = [config[name] for name in STAGES if config[name].epochs > 0]
    meta = caches.meta(trained_on[-1].split, trained_on[-1].cache)
    try:
        means, source = inference.reference_means(workdir)
    except FileNotFoundError:
        raise ValueError(f"no HQ predictions under {workdir}/eval: the subtracted means are the mean scores over "
                         "HQ, so run with eval.split set (the HQ cache) before exporting") from None
    card = heads.make_card(
        variant=config.model.variant, hidden=config.model.hidden or heads.VARIANTS[config.model.variant],
        dim=meta["dim"], dropout=config.model.dropout, input_norm=config.model.input_norm, cache_meta=meta,
        means=means, means_source=source,
        training={s: {"split": config[s].split, "epochs": config[s].epochs, "target": config[s].target}
                  for s in STAGES if config[s].epochs > 0} | {"seed": config.seed,
                                                                "compute_dtype": config.model.compute_dtype})
    return heads.export(out_dir, params, card)


def export_only(config, workdir) -> pathlib.Path:
    """Re-exports a run's latest checkpoint (the caches' meta.json files must be readable)."""
    workdir = pathlib.Path(workdir)
    model = build_model(config)
    caches = Caches(config, records_dir(config))
    last = [config[name] for name in STAGES if config[name].epochs > 0][-1]
    dim = caches.meta(last.split, last.cache)["dim"]
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, dim))))["params"]
    params, _ = checkpoint.load_params(workdir, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target))
    return export_run(config, workdir, params, caches, pathlib.Path(config.export_dir or workdir / "export"))


# --- command line -------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when this module is the program: `emonet_jax.main` defines `--config` and
    `--workdir` too, and absl refuses a flag defined twice in one process (e.g. a test session)."""
    config_flags.DEFINE_config_file("config", None, "configs/empathic_insight.py:small[:demo] or :large[:demo]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, metrics, HQ evaluation and the export go here.")
    flags.DEFINE_bool("export_only", False, "Only export WORKDIR's latest checkpoint (needs WORKDIR/eval).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    host_memory.apply_flag()    # before JAX starts its threads
    if FLAGS.export_only:
        print(f"exported {export_only(FLAGS.config, FLAGS.workdir)}")
        return
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(json.dumps({"step": result["step"], "eval": result["eval"], "export": result["export"]}, indent=2))
    print(f"HQ agreement table: {pathlib.Path(FLAGS.workdir) / 'eval' / 'hq_agreement.md'}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
