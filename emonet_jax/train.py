"""The trainer: one function, `train_and_evaluate(config, workdir)`, in commented stages.

  1. mesh        devices -> Mesh(data, fsdp)
  2. input       one grain pipeline per training source, mixed per batch by weight
  3. state       init (or another run's params), shard by rules, optimizer
  4. restore     latest checkpoint of this workdir: state + data-iterator position
  5. update step jit, sharded in/out, state donated; non-finite steps are not applied
  6. loop        metrics, checkpoints, periodic HQ evaluation, SIGTERM -> save and exit

The state is a plain dict {step, params, opt_state, first_bad_step}. Everything random is
a function of (seed, step) or (seed, example index), so a run restored from a checkpoint
takes exactly the steps an uninterrupted run takes.

Several processes (`jax.distributed`, see main.py) run this same function: the mesh spans
every process's devices, each process loads its rows of the same global batches, all of
them save the orbax checkpoints together, and only process 0 writes metrics and tables.
"""

from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from clu import periodic_actions
from jax.experimental import multihost_utils

from emonet_jax import checkpoint, losses, optim, sharding, tree, writers
from emonet_jax.data import pipeline
from emonet_jax.evaluate import model_eval
from emonet_jax.models import emonet, pretrained


class NonFiniteLoss(RuntimeError):
    """The loss or gradients stopped being finite; the message names the first bad step."""


@dataclasses.dataclass
class Trainer:
    """What the loop needs, built once from the config (stages 1-3)."""
    config: Any
    mesh: jax.sharding.Mesh
    model: emonet.EmotionModel
    tx: optax.GradientTransformation
    lr: optax.Schedule
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding


# --- 1. mesh --------------------------------------------------------------------------------

def make_mesh(config, devices=None) -> jax.sharding.Mesh:
    return sharding.make_mesh(config.mesh, devices)


# --- 2. input -------------------------------------------------------------------------------

def train_input(config, data_dir, process_index=None, process_count=None) -> pipeline.Mixture:
    """Every global batch takes rows from each (dataset, split, weight) source by weight.

    The global batches are the same for any number of processes; this process loads only its
    rows of each (`pipeline.mixture`).
    """
    weights = {f"{name}:{split}": weight for name, split, weight in config.data.train}
    sizes = pipeline.mixture_batch_sizes(config.batch_size, weights)
    augment = pipeline.Augment(scale=tuple(config.input.crop_scale), flip=config.input.flip)
    streams = {}
    for i, key in enumerate(sizes):
        name, split = key.split(":", 1)  # a split may be a slice, "train[:10%]"
        source = pipeline.open_split(f"{name}/{config.data.resolution}", split, data_dir,
                                     in_memory=config.input.in_memory)
        # Distinct seeds per source: two sources of equal size must not shuffle alike.
        streams[key] = pipeline.train_stream(source, image_size=config.input.image_size,
                                             seed=config.seed + 1000 * i, augment=augment)
    dataset = pipeline.mixture(streams, sizes, process_index=process_index, process_count=process_count,
                               num_workers=config.input.num_workers, threads=config.input.threads)
    return pipeline.Mixture(dataset, sizes)


# --- 3. state -------------------------------------------------------------------------------

def init_params(model, config) -> Any:
    image = jnp.zeros((1, config.input.image_size, config.input.image_size, 3), jnp.float32)
    return model.init(jax.random.key(config.seed), image)["params"]


def build(config, mesh) -> Trainer:
    check_config(config, mesh)
    model = emonet.build(config)
    abstract_params = jax.eval_shape(lambda: init_params(model, config))
    depth = model.img.depth
    tx, lr = optim.make(config.optimizer, abstract_params, config.total_steps, depth)
    param_shardings = sharding.param_shardings(abstract_params, mesh, config.sharding_rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    state_shardings = {
        "step": sharding.replicated(mesh),
        "first_bad_step": sharding.replicated(mesh),
        "params": param_shardings,
        "opt_state": opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh),
    }
    return Trainer(config, mesh, model, tx, lr, state_shardings, sharding.batch_sharding(mesh))


def opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh):
    """Optimizer moments are laid out like their parameters; counters are replicated.

    optax states hold copies of the parameter tree (mu, nu); a leaf whose path ends with a
    parameter's path and has its shape takes that parameter's sharding.
    """
    by_path = {p: (np.shape(x), s) for (p, x), s in zip(tree.flatten(abstract_params).items(),
                                                         tree.flatten(param_shardings).values())}

    def shard(path: str, leaf):
        for param_path, (shape, s) in by_path.items():
            if path.endswith("/" + param_path) and tuple(leaf.shape) == tuple(shape):
                return s
        return sharding.replicated(mesh)

    return tree.map_with_path(shard, abstract_opt)


def initial_state(trainer: Trainer) -> dict[str, Any]:
    config = trainer.config

    def init():
        params = init_params(trainer.model, config)
        return {"step": jnp.zeros((), jnp.int32), "first_bad_step": jnp.full((), -1, jnp.int32),
                "params": params, "opt_state": trainer.tx.init(params)}

    state = jax.jit(init, out_shardings=trainer.state_shardings)()
    if config.init_from and config.model.pretrained:
        raise ValueError("set one of init_from (another run) and model.pretrained (a SigLIP tower), not both")
    if config.init_from or config.model.pretrained:
        # Every process gets the whole tree (parameters may live on other processes' devices).
        fresh = multihost_utils.process_allgather(state["params"], tiled=True)
    if config.init_from:
        params, loaded = checkpoint.load_params(config.init_from, fresh, tuple(config.init_skip))
    elif config.model.pretrained:
        params, loaded = pretrained.init_tower(fresh, config.model.pretrained)
    else:
        return state
    logging.info("initialised %d parameters from %s", len(loaded), config.init_from or config.model.pretrained)
    params = jax.device_put(params, trainer.state_shardings["params"])
    state["params"] = params
    state["opt_state"] = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings["opt_state"])(params)
    return state


def abstract_state(trainer: Trainer, state) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                        trainer.state_shardings)


# --- 5. update step -------------------------------------------------------------------------

def make_train_step(trainer: Trainer):
    """(state, batch) -> (state, metrics). Gradient accumulation splits the batch into
    `grad_accum_steps` micro-batches whose loss sums are normalised by the whole batch's
    label counts, so the update equals the one-shot update up to float rounding."""
    config, model, tx = trainer.config, trainer.model, trainer.tx
    terms = [k for k, w in losses.weights(config.loss).items() if w and (k != "extra" or config.model.extra_head)]
    accum = config.grad_accum_steps

    def micro_loss(params, micro, counts, rng):
        params = optim.stop_frozen_gradients(config.optimizer, params)
        outputs = model.apply({"params": params}, micro["image"], train=True, rngs={"dropout": rng})
        sums = {k: s for k, (s, _) in losses.loss_terms(outputs, micro, config.loss).items()}
        return losses.combine(sums, counts, config.loss), sums

    def gradients(params, batch, rng):
        counts = losses.counts(batch, terms)
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum == 1:
            (loss, sums), grads = grad_fn(params, batch, counts, rng)
            return loss, sums, grads, counts

        def split(x):  # [B, ...] -> [accum, B/accum, ...]; row r goes to micro-batch r % accum
            x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        def body(carry, xs):
            micro, i = xs
            micro = jax.lax.with_sharding_constraint(micro, trainer.batch_sharding)
            (loss, sums), grads = grad_fn(params, micro, counts, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

        zeros = (jnp.zeros(()), {k: jnp.zeros(()) for k in terms}, jax.tree.map(jnp.zeros_like, params))
        micro_batches = jax.tree.map(split, batch)
        (loss, sums, grads), _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
        return loss, sums, grads, counts

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(config.seed), state["step"])
        loss, sums, grads, counts = gradients(state["params"], batch, rng)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params, global_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state
        # A non-finite step is not applied: the state stays the last good one, and the host
        # stops the run at its next check, naming the step recorded here. A cond rather than a
        # select between old and new state: the select kept the old state alive beside the new
        # one, which cost a copy of every parameter and moment each step.
        params, opt_state = jax.lax.cond(finite, update, lambda *state: state, state["params"], state["opt_state"])
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "first_bad_step": jnp.where((state["first_bad_step"] < 0) & ~finite, state["step"],
                                        state["first_bad_step"]),
        }
        metrics = {"loss": clu_metrics.Average(total=loss, count=jnp.ones((), jnp.int32)),
                   "grad_norm": clu_metrics.Average(total=grad_norm, count=jnp.ones((), jnp.int32)),
                   **{f"{k}_loss": clu_metrics.Average(total=sums[k], count=counts[k]) for k in terms}}
        return new_state, metrics

    replicated = sharding.replicated(trainer.mesh)
    return jax.jit(step, in_shardings=(trainer.state_shardings, trainer.batch_sharding),
                   out_shardings=(trainer.state_shardings, replicated), donate_argnums=(0,))


# --- 6. loop --------------------------------------------------------------------------------

class _Preemption:
    """SIGTERM -> `reached(step)` turns True between steps (the step in flight completes).

    One process: our SIGTERM handler sets a flag. Several processes: a notice reaches one
    host, but all must stop at the same step to save together; JAX's preemption sync manager
    (started by `jax.distributed.initialize`, it catches SIGTERM itself, so no Python handler
    is installed then) agrees on that step, and `reached` is True there on every process.
    Several processes without `jax.distributed` (nothing to agree through): SIGTERM kills,
    and the run resumes from its last periodic checkpoint.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._single = jax.process_count() == 1
        self._synced = not self._single and jax.distributed.is_initialized()

    def __enter__(self):
        if self._single and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        elif not self._synced:
            logging.warning("%d processes without jax.distributed: SIGTERM stops without a final checkpoint "
                            "(run main.py with --distributed=yes)", jax.process_count())
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after this step and exiting")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._synced and multihost_utils.reached_preemption_sync_point(step):
            logging.warning("preemption notice: every process saves a checkpoint at step %d and exits", step)
            self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_finite(state, step: int) -> None:
    bad = int(jax.device_get(state["first_bad_step"]))
    if bad >= 0:
        raise NonFiniteLoss(f"loss or gradients became NaN/inf at step {bad + 1} (the update of step {bad + 1} "
                            f"was not applied; checked at step {step}); the last checkpoint was left as it was")


def log_train(writer, step: int, accumulated: dict, lr: float) -> None:
    # A loss term with no labelled pair since the last log (count 0) is left out, not logged as NaN.
    scalars = {f"train/{k}": float(v.compute()) for k, v in jax.device_get(accumulated).items() if v.count > 0}
    scalars["lr"] = lr
    writer.write_scalars(step, scalars)
    writer.flush()


def merge(accumulated: dict | None, metrics: dict) -> dict:
    if accumulated is None:
        return metrics
    return {k: accumulated[k].merge(v) for k, v in metrics.items()}


def train_and_evaluate(config, workdir, data_dir) -> dict[str, Any]:
    """Trains to config.total_steps (resuming from WORKDIR/checkpoints) and evaluates on HQ.

    Returns {'step', 'preempted', 'eval'} for callers and tests.
    """
    workdir = pathlib.Path(workdir)
    is_writer = jax.process_index() == 0
    # 1. mesh, 3. state (built before the input so config errors surface before data loads)
    mesh = make_mesh(config)
    trainer = build(config, mesh)
    pipeline.check_process_rows(trainer.batch_sharding, config.batch_size)
    # 2. input
    train_iter = train_input(config, data_dir)
    evaluator = model_eval.HQEvaluator(config, data_dir, trainer)
    # 4. restore
    ckpt = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    state = initial_state(trainer)
    restored = ckpt.restore_latest(abstract_state(trainer, state))  # skips unreadable steps, says which
    if restored is not None:
        latest, state, data_state = restored
        train_iter.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory, latest)
    step = int(jax.device_get(state["step"]))
    if is_writer:  # rows logged after that step go (also those of a run killed before its first checkpoint)
        writers.drop_after(workdir / "metrics.jsonl", step)
        checkpoint.record_config(workdir, config)  # a changed config is said, and the old one kept
    writer = writers.create(workdir, is_writer)
    if step == 0 and is_writer:
        writer.write_hparams({"num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))})
    # 5. update step
    train_step = make_train_step(trainer)
    report = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
    accumulated, preempted, result = None, False, {}

    def save(step, force=False):
        check_finite(state, step)  # never write a checkpoint of a broken run
        ckpt.save(step, state, train_iter.get_state(), force=force)

    with _Preemption() as preemption:
        while step < config.total_steps:
            # 6. loop
            batch = pipeline.device_batch(next(train_iter), trainer.batch_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            accumulated = merge(accumulated, metrics)
            report(step)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                check_finite(state, step)
                log_train(writer, step, accumulated, float(trainer.lr(step - 1)))
                accumulated = None
            if step % config.checkpoint_every_steps == 0 or step == config.total_steps:
                save(step)
            if preemption.reached(step):
                save(step, force=True)
                preempted = True
                break
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
                evaluator.run(state["params"], step, writer, workdir if is_writer else None)
    if not preempted:
        if ckpt.latest_step() != step:
            save(step, force=True)
        result = evaluator.run(state["params"], step, writer, workdir if is_writer else None)
    ckpt.close()
    writer.close()
    return {"step": step, "preempted": preempted, "eval": result, "state": state}


def check_config(config, mesh) -> None:
    """Fails before anything is compiled or loaded, naming the key at fault."""
    devices = mesh.devices.size
    if config.batch_size % devices:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {devices} devices of the mesh")
    if config.grad_accum_steps < 1 or config.batch_size % (config.grad_accum_steps * devices):
        raise ValueError(f"batch_size {config.batch_size} must split into grad_accum_steps="
                         f"{config.grad_accum_steps} micro-batches divisible by {devices} devices")
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps"):
        if config[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {config[key]}")
    if not any(losses.weights(config.loss).values()):
        raise ValueError("every loss weight in config.loss is 0")
    sharding.check_rules(config.sharding_rules)

