"""The optimizer: AdamW with warmup + cosine, clipping, freezing and layer-wise LR decay.

Everything is keyed on parameter paths ('img/Transformer/encoderblock_3/...'):
- `freeze`: regexes of parameters that never change (e.g. everything under `img/` for a
  linear probe); they get no optimizer state and are left out of the clipping norm.
- `layer_decay` d < 1 scales the learning rate of encoder block i by d^(depth - i), of the
  patch/position embedding by d^(depth + 1), and leaves the heads at 1 (fine-tuning a
  pretrained tower gently while the new heads learn fast).
- weight decay applies to matrices and embeddings, not to biases or LayerNorm scales.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emonet_jax import tree
from emonet_jax.models import vit


def schedule(config, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine to `lr * min_lr_ratio` at `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.min_lr_ratio)


def layer_factor(path: str, shape: tuple[int, ...], depth: int, decay: float):
    """The LR multiplier of one parameter (an array for scanned blocks: one per layer)."""
    index = vit.block_index(path, depth) if path.startswith("img/") else depth
    if index is None:  # scanned: leading axis = layer
        per_layer = decay ** (depth - np.arange(depth, dtype=np.float32))
        return per_layer.reshape((depth,) + (1,) * (len(shape) - 1))
    return np.float32(decay ** (depth - index))


class _Empty(NamedTuple):
    pass


def scale_by_layer(depth: int, decay: float) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params
        scaled = tree.map_with_path(lambda p, u: u * layer_factor(p, u.shape, depth, decay).astype(u.dtype),
                                    updates)
        return scaled, state
    return optax.GradientTransformation(lambda params: _Empty(), update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """`optax.clip_by_global_norm` (same state, same values up to the last bit of the rescaled
    ones) written as one multiply by min(1, max_norm / norm). Optax's `select(norm < max_norm,
    g, g / norm * max_norm)` made XLA:CPU write the clipped gradients out before AdamW read them:
    clipping + AdamW of ViT-B/16's parameters took 180-200 ms against 95 ms this way (2 Zen 4
    cores, BENCHMARKS.md "Train step on Zen 4").

    The caller that has already computed the norm passes it as `tx.update(..., global_norm=n)`
    (train's step does, outside the `cond` that applies the update, where XLA cannot reuse it:
    otherwise every step reads all gradients once more). It must be the norm of the updates
    this transformation sees; the step's norm over all gradients is, since frozen parameters'
    gradients are exact zeros (`stop_frozen_gradients`)."""
    def update(updates, state, params=None, global_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if global_norm is None else global_norm
        scale = jnp.minimum(1.0, max_norm / norm)      # an infinite norm gives 0; NaN stays NaN
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state
    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def frozen(config, params: Any) -> Any:
    """A tree like `params`: True where a parameter matches `config.freeze`."""
    patterns = tree.compile_patterns(config.freeze, "optimizer.freeze")
    return tree.map_with_path(lambda p, _: tree.matches_any(p, patterns), params)


def stop_frozen_gradients(config, params: Any) -> Any:
    """`params` with the frozen ones behind stop_gradient: their gradients are exact zeros, so
    XLA drops the backward pass through a frozen tower instead of computing and discarding it."""
    return jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, params, frozen(config, params))


def make(config, params: Any, total_steps: int, depth: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) for `params` from config.optimizer."""
    if config.name != "adamw":
        raise ValueError(f"optimizer.name must be 'adamw', got {config.name!r}")
    lr = schedule(config, total_steps)
    labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen(config, params))
    if all(label == "frozen" for label in tree.flatten(labels).values()):
        raise ValueError(f"optimizer.freeze {tuple(config.freeze)} freezes every parameter")
    decay_mask = tree.map_with_path(lambda _, x: jnp.ndim(x) > 1, params)
    steps = [clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    steps.append(optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask))
    if config.layer_decay != 1.0:
        steps.append(scale_by_layer(depth, config.layer_decay))
    tx = optax.multi_transform({"trained": optax.chain(*steps), "frozen": optax.set_to_zero()}, labels)
    return tx, lr

