"""The emotion model: a ViT image tower and ordinal heads for the 40 emotions.

Per emotion the head gives 8 logits, one per intensity 0..7, so one distribution serves
every label type in EmoNet-Face:

- the rating distribution of the experts (HQ) or of the VLM (Big) is matched by
  cross-entropy against the whole distribution (soft labels);
- the 0-7 score the agreement metrics use is the expected intensity  sum_k k * p_k;
- presence, what the Binary experts vote on, is P(intensity >= 1) = 1 - p_0. A rater who
  says "present" gives the emotion a non-zero rating, so the two label types constrain the
  same distribution instead of needing a separate presence head.

Optional regression heads predict the 4 extra dimensions (valence, arousal, dominance,
emotional vulnerability), each rescaled to [0, 1] by its published range.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emonet_jax import taxonomy
from emonet_jax.labels import NUM_LEVELS
from emonet_jax.models.vit import ViT

NUM_EMOTIONS = len(taxonomy.EMOTIONS)
EXTRA_LOW = np.array([d.low for d in taxonomy.EXTRA_DIMENSIONS], np.float32)
EXTRA_HIGH = np.array([d.high for d in taxonomy.EXTRA_DIMENSIONS], np.float32)


class EmotionModel(nn.Module):
    """`img` (the name big_vision's two-tower SigLIP gives its image tower) + heads.

    Returns {'logits': [B, 40, 8], 'embedding': [B, D], 'extra': [B, 4] (if extra_head)}.
    Heads start at zero (uniform over intensities) so a pretrained tower is not disturbed
    by random head gradients at the start of fine-tuning.
    """
    img: ViT
    head_hidden: tuple[int, ...] = ()
    head_dropout: float = 0.0
    extra_head: bool = True

    @nn.compact
    def __call__(self, images, *, train: bool = False) -> dict[str, Any]:
        embedding, _ = self.img(images, train=train)
        # pool='none' keeps every token: the heads then read all of them, each at its position.
        x = embedding.reshape(embedding.shape[0], -1).astype(jnp.float32)
        for i, width in enumerate(self.head_hidden):
            x = nn.relu(nn.Dense(width, name=f"head_hidden_{i}")(x))
            x = nn.Dropout(self.head_dropout)(x, deterministic=not train)
        zeros = nn.initializers.zeros
        logits = nn.Dense(NUM_EMOTIONS * NUM_LEVELS, kernel_init=zeros, name="emotion_head")(x)
        out = {"logits": logits.reshape(-1, NUM_EMOTIONS, NUM_LEVELS), "embedding": embedding}
        if self.extra_head:
            out["extra"] = nn.Dense(taxonomy.NUM_EXTRA_DIMENSIONS, kernel_init=zeros, name="extra_head")(x)
        return out


def expected_intensity(logits: jax.Array) -> jax.Array:
    """[..., 8] logits -> the 0-7 score  sum_k k * p_k."""
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * jnp.arange(logits.shape[-1]), axis=-1)


def presence_log_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log P(present), log P(absent)) with present = intensity >= 1, computed stably."""
    total = jax.nn.logsumexp(logits, axis=-1)
    return jax.nn.logsumexp(logits[..., 1:], axis=-1) - total, logits[..., 0] - total


def presence_probability(logits: jax.Array) -> jax.Array:
    return jnp.exp(presence_log_probs(logits)[0])


def extra_to_unit(values: jax.Array) -> jax.Array:
    """Extra dimensions on their published ranges -> [0, 1]."""
    return (values - EXTRA_LOW) / (EXTRA_HIGH - EXTRA_LOW)


def extra_from_unit(values: jax.Array) -> jax.Array:
    return values * (EXTRA_HIGH - EXTRA_LOW) + EXTRA_LOW


def build(config) -> EmotionModel:
    """The model described by `config.model` (see configs/common.py)."""
    m = config.model
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(m.compute_dtype)
    if dtype is None:
        raise ValueError(f"model.compute_dtype must be 'float32' or 'bfloat16', got {m.compute_dtype!r}")
    img = ViT.from_variant(m.variant, pool=m.pool, posemb=m.posemb, dropout=m.dropout, scan=m.scan,
                           remat=m.remat, dtype=dtype, attention=m.attention)
    return EmotionModel(img=img, head_hidden=tuple(m.head_hidden), head_dropout=m.head_dropout,
                        extra_head=m.extra_head)
