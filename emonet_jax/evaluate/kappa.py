"""Quadratic-weighted Cohen's κ between every pair of raters, vectorised.

The paper's readout: a rating r becomes the level `int(r)` (truncation toward zero, so a model's
3.9 counts as 3), clipped to 0..num_levels-1; κ of a rater pair on one emotion uses the images
both rated and the labels 0..num_levels-1, exactly `sklearn.metrics.cohen_kappa_score(a, b,
weights='quadratic', labels=range(num_levels))`.

Why no confusion matrices: with quadratic weights w_ij = (i - j)^2 the two sums κ needs are
moments of the paired levels a, b over the n common images,

    sum_ij w_ij O_ij = sum (a - b)^2                      = Saa + Sbb - 2 Sab
    sum_ij w_ij E_ij = sum_i sum_j (i - j)^2 ra_i rb_j / n = Saa + Sbb - 2 Sa Sb / n

(O the confusion counts, E = outer(row sums, column sums) / n, the normalisation of w cancels),
so κ = 1 - n (Saa + Sbb - 2 Sab) / (n (Saa + Sbb) - 2 Sa Sb). Every sum is a masked product
over the images, [R, N] x [N, R] per emotion. The levels are integers, so
all sums and both products above are integers well below 2^53 and are exact in float64: the
denominator is exactly 0 precisely when scikit-learn's is (both raters gave one and the same
level to every common image), and κ is NaN there, as scikit-learn returns it.
"""

from __future__ import annotations

import numpy as np

NUM_LEVELS = 8  # intensities 0..7


def readout(ratings: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """The paper's readout: truncate toward zero, clip to 0..num_levels-1; NaN stays NaN.

    ±inf is not a rating (NaN is the only "not rated"), so it raises naming its position.
    """
    ratings = np.asarray(ratings, dtype=np.float64)
    bad = np.isinf(ratings)
    if bad.any():
        raise ValueError(f"ratings contain ±inf at index {tuple(int(i) for i in np.argwhere(bad)[0])}; "
                         "use NaN for 'not rated'")
    return np.clip(np.trunc(ratings), 0, num_levels - 1)


def _check_size(num_images: int, num_levels: int) -> None:
    # n (Saa + Sbb) is at most 2 n^2 (L-1)^2; it must stay an exact float64 integer.
    if 2 * num_images ** 2 * (num_levels - 1) ** 2 >= 2 ** 53:
        raise ValueError(f"{num_images} images x {num_levels} levels is too large for exact κ sums")


def kappa_from_sums(n, sa, sb, saa, sbb, sab) -> np.ndarray:
    """κ from the paired moments over the common images (any broadcastable shapes).

    NaN where undefined: no common image, or zero expected disagreement (scikit-learn's nan).
    """
    num = n * (saa + sbb - 2 * sab)
    den = n * (saa + sbb) - 2 * sa * sb
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = 1.0 - num / den
    return np.where((n > 0) & (den > 0), kappa, np.nan)


def _levels_by_emotion(ratings: np.ndarray, num_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(valid, levels) as float [E, R, N]: one small matrix per emotion, levels 0 where missing."""
    ratings = np.asarray(ratings, dtype=np.float64)
    if ratings.ndim != 3:
        raise ValueError(f"ratings must be [raters, images, emotions], got shape {ratings.shape}")
    _check_size(ratings.shape[1], num_levels)
    valid = ~np.isnan(ratings)
    levels = np.where(valid, readout(ratings, num_levels), 0.0)
    return (np.ascontiguousarray(valid.transpose(2, 0, 1), dtype=np.float64),
            np.ascontiguousarray(levels.transpose(2, 0, 1)))


# Sums over images, [E, A, N] x [E, B, N] -> [E, A, B]. einsum's own loop, not BLAS: on a busy
# 2-core machine 40 stacked [22, 2500] @ [2500, 22] BLAS calls spent more time handing work
# between threads (0.06-0.8 s, erratic) than einsum needs in one thread (~0.1 s).
def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ean,ebn->eab", a, b)


def pairwise_quadratic_kappa(ratings: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """ratings [R, N, E] float, NaN = not rated -> κ [R, R, E] for every rater pair and emotion.

    Values are int-truncated toward zero, then clipped to 0..num_levels-1 (the paper's readout).
    κ is the quadratic-weighted Cohen's κ with labels 0..num_levels-1 over the images both raters
    rated, equal to scikit-learn's `cohen_kappa_score`; NaN where there is no common image or
    scikit-learn would give nan. The diagonal is each rater against itself (1, or NaN for a rater
    that gave a single level). Cost: 4 [R, N] x [N, R] products per emotion.
    """
    m, x = _levels_by_emotion(ratings, num_levels)
    n = _dot(m, m)                   # common images
    sa = _dot(x, m)                  # sum of a's levels over the images b rated too
    saa = _dot(x * x, m)
    sab = _dot(x, x)
    sb, sbb = sa.transpose(0, 2, 1), saa.transpose(0, 2, 1)
    return kappa_from_sums(n, sa, sb, saa, sbb, sab).transpose(1, 2, 0)


def cross_quadratic_kappa(a: np.ndarray, b: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """κ [A, B, E] of every rater in a [A, N, E] with every rater in b [B, N, E] (same images).

    `pairwise_quadratic_kappa(r)[i, j] == cross_quadratic_kappa(r[i:i+1], r[j:j+1])[0, 0]`;
    cheaper when only some pairs matter (e.g. models against humans).
    """
    ma, xa = _levels_by_emotion(a, num_levels)
    mb, xb = _levels_by_emotion(b, num_levels)
    k = kappa_from_sums(_dot(ma, mb), _dot(xa, mb), _dot(ma, xb), _dot(xa * xa, mb), _dot(ma, xb * xb),
                        _dot(xa, xb))
    return k.transpose(1, 2, 0)


def annotator_kappas(pairwise: np.ndarray, human: np.ndarray) -> np.ndarray:
    """[R, R, E] pairwise κ, human [R] bool -> [R, E]: each rater's κ per emotion.

    The nan-mean of the rater's κ with every human rater other than itself (a human is compared
    with the other humans, a model with all of them); NaN where no such κ is defined.
    """
    pairwise = np.asarray(pairwise, dtype=np.float64)
    human = np.asarray(human, dtype=bool)
    r = pairwise.shape[0]
    if pairwise.shape[:2] != (r, r) or human.shape != (r,):
        raise ValueError(f"pairwise must be [R, R, E] and human [R]; got {pairwise.shape} and {human.shape}")
    partner = human[None, :] & ~np.eye(r, dtype=bool)           # [R, R]: which κ's count
    use = partner[:, :, None] & ~np.isnan(pairwise)
    total = np.where(use, pairwise, 0.0).sum(axis=1)
    count = use.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def image_moments(levels: np.ndarray, valid: np.ndarray, humans: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-image terms of the κ sums of every rater with every human.

    levels, valid [R, n, E] (levels already read out; ignored where not valid); humans: the row
    indices of the H human raters. Returns (n, sa, sb, saa, sbb, sab), each [n, R, H, E] and zero
    where either rater did not rate the image. Summed over any set of images (repeats count
    again), they are the arguments of `kappa_from_sums` for κ on that set: what subgroup,
    jackknife and bootstrap estimates need without re-reading the ratings.
    """
    m = valid.astype(np.float64).transpose(1, 0, 2)                  # [n, R, E]
    x = np.where(valid, levels, 0.0).transpose(1, 0, 2)
    a_m, a_x = m[:, :, None, :], x[:, :, None, :]                     # the rater: [n, R, 1, E]
    b_m, b_x = m[:, humans][:, None], x[:, humans][:, None]           # the human: [n, 1, H, E]
    return a_m * b_m, a_x * b_m, a_m * b_x, a_x * a_x * b_m, a_m * b_x * b_x, a_x * b_x
