"""Losses against hand computations, masks and normalisation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emonet_jax import losses
from emonet_jax.models import emonet


def rand(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


def test_soft_label_ce_matches_a_hand_computation_and_ignores_masked_pairs():
    logits = rand((2, 40, 8))
    soft = jax.nn.softmax(rand((2, 40, 8), 1))
    mask = np.zeros((2, 40), bool)
    mask[0, 3] = mask[1, 7] = True
    total, count = losses.soft_label_ce(logits, soft, mask)
    logp = np.asarray(jax.nn.log_softmax(logits))
    expected = -(np.sum(soft[0, 3] * logp[0, 3]) + np.sum(soft[1, 7] * logp[1, 7]))
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert count == 2
    # Garbage in masked pairs changes nothing.
    noisy = logits.at[0, 0].set(1e4)
    np.testing.assert_allclose(losses.soft_label_ce(noisy, soft, mask)[0], total, rtol=1e-6)


def test_soft_label_ce_is_smallest_at_the_target_distribution():
    target = jnp.asarray([[[0.1, 0.2, 0.4, 0.3, 0, 0, 0, 0]]])
    mask = jnp.ones((1, 1), bool)
    at_target = losses.soft_label_ce(jnp.log(target + 1e-9), target, mask)[0]
    elsewhere = losses.soft_label_ce(jnp.zeros((1, 1, 8)), target, mask)[0]
    assert at_target < elsewhere


def test_label_smoothing_mixes_in_the_uniform_distribution():
    logits, soft, mask = rand((1, 40, 8)), jax.nn.one_hot(jnp.full((1, 40), 2), 8), jnp.ones((1, 40), bool)
    smoothed = losses.soft_label_ce(logits, soft, mask, smoothing=0.2)[0]
    manual = losses.soft_label_ce(logits, soft * 0.8 + 0.2 / 8, mask)[0]
    np.testing.assert_allclose(smoothed, manual, rtol=1e-6)


def test_presence_bce_uses_one_minus_p0():
    logits = rand((3, 40, 8))
    target = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 40)))
    mask = jnp.ones((3, 40), bool)
    total, count = losses.presence_bce(logits, target, mask)
    p = 1 - np.asarray(jax.nn.softmax(logits))[..., 0]
    expected = -np.sum(target * np.log(p) + (1 - target) * np.log(1 - p))
    np.testing.assert_allclose(total, expected, rtol=1e-5)
    assert count == 120


def test_binary_target_soft_and_hard():
    batch = {"binary_yes": jnp.asarray([[2, 1, 0]]), "binary_votes": jnp.asarray([[3, 2, 0]]),
             "binary_present": jnp.asarray([[True, False, False]])}
    np.testing.assert_allclose(losses.binary_target(batch, soft=True), [[2 / 3, 0.5, 0]])
    np.testing.assert_allclose(losses.binary_target(batch, soft=False), [[1, 0, 0]])


def test_extra_mse_on_the_unit_scale():
    pred = jnp.zeros((1, 4))
    extra = jnp.asarray([[3.0, 7.0, -3.0, 0.0]])  # the top of valence/arousal, bottom of dominance
    total, count = losses.extra_mse(pred, extra, jnp.asarray([[True, True, True, False]]))
    np.testing.assert_allclose(total, 1 + 1 + 0, atol=1e-6)
    assert count == 3
    np.testing.assert_allclose(emonet.extra_from_unit(emonet.extra_to_unit(extra)), extra, atol=1e-6)


def test_combine_normalises_each_term_by_its_own_count():
    cfg = ml_collections.ConfigDict({"soft_label_weight": 1.0, "binary_weight": 2.0, "extra_weight": 0.5})
    sums = {"soft_label": jnp.asarray(6.0), "binary": jnp.asarray(3.0), "extra": jnp.asarray(0.0)}
    counts = {"soft_label": jnp.asarray(3.0), "binary": jnp.asarray(1.0), "extra": jnp.asarray(0.0)}
    np.testing.assert_allclose(losses.combine(sums, counts, cfg), 6 / 3 + 2 * 3)  # no extra labels: adds nothing
