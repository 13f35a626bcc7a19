"""Losses for the label types of EmoNet-Face, all on the ordinal head (models/emonet.py).

Each loss returns (sum, count) over the valid (image, emotion) pairs of a batch instead of
a mean, so that a batch split into micro-batches (gradient accumulation) or mixed from
several sources is normalised once, by the counts of the whole batch: the accumulated
gradient is then exactly the full-batch gradient.

Label masks route each image to its losses: Big and HQ images carry a rating distribution
(`soft_label_mask`), Binary images carry expert votes on about 2 emotions (`binary_mask`);
the other fields of a record are zero with a false mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from emonet_jax.models import emonet


def soft_label_ce(logits, soft_label, mask, smoothing: float = 0.0):
    """Cross-entropy of the 8-level distribution against the raters' distribution.

    logits, soft_label [B, 40, 8]; mask [B, 40]. `smoothing` mixes the target with uniform.
    """
    levels = logits.shape[-1]
    target = soft_label * (1 - smoothing) + smoothing / levels
    per_pair = -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    mask = mask.astype(per_pair.dtype)
    return jnp.sum(per_pair * mask), jnp.sum(mask)


def presence_bce(logits, target, mask, smoothing: float = 0.0):
    """Binary cross-entropy of P(intensity >= 1) against the experts' votes.

    target [B, 40] in [0, 1]: the hard majority, or the fraction of "present" votes (soft).
    """
    target = target * (1 - smoothing) + smoothing / 2
    log_present, log_absent = emonet.presence_log_probs(logits)
    per_pair = -(target * log_present + (1 - target) * log_absent)
    mask = mask.astype(per_pair.dtype)
    return jnp.sum(per_pair * mask), jnp.sum(mask)


def extra_mse(prediction, extra, mask):
    """Squared error of the extra dimensions, each rescaled to [0, 1]."""
    per_pair = jnp.square(prediction - emonet.extra_to_unit(extra))
    mask = mask.astype(per_pair.dtype)
    return jnp.sum(per_pair * mask), jnp.sum(mask)


def binary_target(batch, soft: bool):
    """Majority vote (0/1), or the share of "present" votes when `soft`."""
    if soft:
        return batch["binary_yes"] / jnp.maximum(batch["binary_votes"], 1)
    return batch["binary_present"].astype(jnp.float32)


def loss_terms(outputs: dict[str, Any], batch: dict[str, Any], config) -> dict[str, tuple]:
    """{name: (sum, count)} for every loss with a non-zero weight in `config` (config.loss)."""
    terms = {}
    if config.soft_label_weight:
        terms["soft_label"] = soft_label_ce(outputs["logits"], batch["soft_label"], batch["soft_label_mask"],
                                            config.label_smoothing)
    if config.binary_weight:
        target = binary_target(batch, config.binary_soft_targets)
        terms["binary"] = presence_bce(outputs["logits"], target, batch["binary_mask"], config.label_smoothing)
    if config.extra_weight and "extra" in outputs:
        terms["extra"] = extra_mse(outputs["extra"], batch["extra"], batch["extra_mask"])
    return terms


# The mask that says which (image, emotion) pairs each term covers.
MASKS = {"soft_label": "soft_label_mask", "binary": "binary_mask", "extra": "extra_mask"}


def counts(batch: dict[str, Any], terms) -> dict[str, jax.Array]:
    """Valid pairs per term in `batch` (for normalising sums taken over micro-batches)."""
    return {k: jnp.sum(batch[MASKS[k]].astype(jnp.float32)) for k in terms}


def weights(config) -> dict[str, float]:
    return {"soft_label": config.soft_label_weight, "binary": config.binary_weight, "extra": config.extra_weight}


def combine(sums: dict[str, jax.Array], counts: dict[str, jax.Array], config) -> jax.Array:
    """sum over terms of weight * sum / count (a term with no valid pair in the batch adds 0)."""
    w = weights(config)
    return sum(w[k] * sums[k] / jnp.maximum(counts[k], 1) for k in sums)
