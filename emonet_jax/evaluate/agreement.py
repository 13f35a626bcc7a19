"""EmoNet-Face HQ agreement: how well each annotator, expert or model, agrees with the experts.

    python -m emonet_jax.evaluate.agreement --ratings=hq.csv --out=DIR [--extra=preds.csv ...]

Protocol (the paper's analysis, `statistics/analysis-hq.ipynb` of LAION-AI/emonet-face):

* Readout: a rating r counts as the level int(r), truncated toward zero (a model's 3.9 is 3),
  clipped to 0..7. NaN (a missing key in the input) is "not rated", never 0.
* κ: per emotion and rater pair, quadratic-weighted Cohen's κ with labels 0..7 over the images
  both rated (`kappa.pairwise_quadratic_kappa`, equal to scikit-learn's `cohen_kappa_score`).
  A rater's κ on an emotion is the mean of its κ's with the human raters (with the *other*
  humans, for a human); its mean / std (ddof 1) / median run over the 40 emotions where κ is
  defined (`n_emotions` says how many).
* Spearman ρ (non-humans): per emotion, the rater's raw ratings (not truncated; ρ only sees
  their order) against the per-image median of the humans who rated that image, over images
  that have both; the 40 ρ's are averaged.
* Krippendorff's α (interval) per emotion over the human raters, missing = missing, on the raw
  ratings; its 95% CI from 1,000 bootstrap resamples of the images (percentile; one resample
  of the images serves all 40 emotions), seed 42.
* Could this rater be an annotator? Its values: every defined κ of the rater with a human
  (other than itself) on an emotion, [humans x emotions] flattened -- the values, not their
  per-emotion means, so both sides are single-pair κ's. Against: every defined κ of an
  unordered pair of two *different* humans on an emotion (C(H, 2) x 40 values), leaving out
  pairs that involve the rater itself when it is human. Two-sided Mann-Whitney U (scipy's
  defaults), "yes" iff p > 0.05 (null when a side has < 2 values); mean difference (rater
  minus human-human) with a 95% percentile CI from 1,000 bootstrap resamples of both sides,
  a fresh `np.random.default_rng(seed=42)` per rater. This is what the authors' notebook does.
* Groups, by name (first match wins; `GROUPS`): humans (the `human` flag), our models
  (`*Empathic Insight*`, and every `--extra` annotator), multi-shot VLMs (`*MS`), zero-shot
  VLMs (`*ZS`), proprietary (`*Hume Face*`), random (`*Random Baseline*`), else "Other". A
  group's values are its members' per-emotion κ's; every pair of groups gets the two-sided
  Mann-Whitney p, the mean difference and its bootstrap CI (fresh seed-42 generator per pair).

Beyond the paper (extra keys; they never replace a protocol number):

* `calibrated_*` (non-humans): before κ, each emotion's scores are mapped by quantile onto the
  pooled marginal of the experts' levels for that emotion (mid-rank quantile q = (rank - 1/2)/n,
  level = the smallest k with P(expert level <= k) >= q). This asks whether a model ranks images
  like the experts once its scale is right; it uses the experts' marginals of the same images
  (8 numbers per emotion, no pairing), so it is an in-sample readout.
* `demographics` (given per-image attributes): per attribute value with >= 20 images, every
  rater's mean κ on those images; its delete-one-image jackknife bias-corrected value with a 95%
  CI (±1.96 jackknife SE); `flagged` when the bias-corrected mean κ on all images lies outside
  that CI. (Uncorrected, κ on a few hundred images is biased low: see `_demographics`.)

Differences from the notebook, all deliberate: a missing emotion key is missing (the notebook
reads it as 0); ratings outside 0..7 are clipped (scikit-learn's `labels=` would silently drop
the pair); a κ on a single common image is kept when defined (the notebook skips pairs with
< 2 common images; on the published data every pair of raters shares hundreds of images);
could-be-annotator with p undefined is null (the notebook says "no"); α keeps human raters
with a single rating of an emotion (the notebook drops them; Krippendorff's α does not); the
0-1 rescale matches names by fnmatch pattern (the notebook: the substring 'Hume Face*');
bootstrap draws are vectorised, so CIs differ from the notebook's in Monte Carlo noise only.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import fnmatch
import io
import itertools
import json
import math
import mmap
import pathlib
import sys
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from emonet_jax import taxonomy
from emonet_jax.evaluate import kappa as kappa_lib

E = taxonomy.NUM_EMOTIONS
NAMES = taxonomy.NAMES
NUM_LEVELS = kappa_lib.NUM_LEVELS
MAX_RATING = NUM_LEVELS - 1
SEED = 42
BOOTSTRAP = 1000
P_THRESHOLD = 0.05           # could-be-annotator: "yes" iff p > P_THRESHOLD
MIN_GROUP_IMAGES = 20        # demographics: smaller attribute values are skipped (and listed)
# Annotators published on a 0-1 scale, multiplied by 7 on reading (fnmatch patterns, whole name).
UNIT_INTERVAL_PATTERNS = ("Hume Face*",)
HUMANS = "Human Annotators"
OURS = "Our Models"
OTHER = "Other"
# (group, fnmatch patterns); humans go by their flag, the first matching pattern decides the rest.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (OURS, ("*Empathic Insight*",)),
    ("VLMs with Multi-Shot Prompt", ("*MS",)),
    ("VLMs with Zero-Shot Prompt", ("*ZS",)),
    ("Proprietary Models", ("*Hume Face*",)),
    ("Random Baseline", ("*Random Baseline*",)),
)
PROTOCOL = {
    "readout": "level = int(rating) truncated toward zero, clipped to 0..7; NaN = not rated",
    "kappa": "quadratic-weighted Cohen's kappa, labels 0..7, images both rated; a rater's kappa per "
             "emotion = mean over the (other) human raters; mean/std(ddof=1)/median over emotions",
    "spearman": "raw ratings vs per-image median human rating, per emotion, averaged over emotions",
    "krippendorff_alpha": "interval, human raters, raw ratings; 95% CI: image bootstrap",
    "could_be_annotator": "two-sided Mann-Whitney U of the rater's (human, emotion) kappas vs the "
                          "kappas of unordered pairs of other humans per emotion; yes iff p > 0.05",
    "bootstrap": BOOTSTRAP,
}


class AgreementInputError(ValueError):
    """Bad input to the agreement evaluation; the message names the file, line and key."""


# ---------------------------------------------------------------------------
# Statistics (numpy only: scipy.stats alone takes seconds to import; tests check each against
# scipy / krippendorff).

def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their mean rank; NaN is not ranked (NaN)."""
    a = np.asarray(values, dtype=np.float64)
    flat = a.reshape(-1, a.shape[-1])
    k, n = flat.shape
    if flat.size == 0:
        return a.copy()
    order = np.argsort(flat, axis=1)          # NaN sorts last; ties need no stable order: they share a rank
    ordered = np.take_along_axis(flat, order, axis=1)
    starts = np.ones((k, n), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]       # a new tie group (rows start one)
    group = np.cumsum(starts.ravel()) - 1
    position = np.tile(np.arange(1, n + 1, dtype=np.float64), k)
    mean_position = np.bincount(group, weights=position) / np.bincount(group)
    ranks = np.empty_like(flat)
    np.put_along_axis(ranks, order, mean_position[group].reshape(k, n), axis=1)
    ranks[np.isnan(flat)] = np.nan
    return ranks.reshape(a.shape)


def nan_median(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """`np.nanmedian` along `axis`: NaN where all values are NaN.

    Here because np.nanmedian of a few values per image goes through numpy.ma: 4x slower on the
    published size (np.percentile imports numpy.ma all the same).
    """
    ordered = np.sort(values, axis=axis)                     # NaN sorts last
    n = (~np.isnan(ordered)).sum(axis=axis, keepdims=True)
    low = np.take_along_axis(ordered, np.maximum(n - 1, 0) // 2, axis=axis)
    high = np.take_along_axis(ordered, n // 2, axis=axis)
    return np.squeeze(np.where(n > 0, (low + high) / 2, np.nan), axis=axis)


def spearman(a: np.ndarray, b: np.ndarray, a_ranks: np.ndarray | None = None) -> np.ndarray:
    """Spearman ρ of a and b along the last axis, over the positions where both are finite.

    Equals `scipy.stats.spearmanr` on those pairs; NaN with fewer than 2 pairs or a constant side.
    `a_ranks` (optional): `average_ranks(a)`, used where b is finite wherever a is not NaN.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    b_ok = np.isfinite(b)
    both = np.isfinite(a) & b_ok
    n = both.sum(axis=-1, keepdims=True)
    centre = (n + 1) / 2.0                                   # the mean of ranks 1..n, exactly
    if a_ranks is None or not np.array_equal(both, ~np.isnan(a)):
        a_ranks = average_ranks(np.where(both, a, np.nan))
    da = np.where(both, a_ranks - centre, 0.0)
    if np.array_equal(np.broadcast_to(b_ok, both.shape), both):
        rb = average_ranks(np.where(b_ok, b, np.nan))        # a broadcast b: rank it once
    else:
        rb = average_ranks(np.where(both, b, np.nan))
    db = np.where(both, rb - centre, 0.0)
    cov, va, vb = (da * db).sum(-1), (da * da).sum(-1), (db * db).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.clip(cov / np.sqrt(va * vb), -1.0, 1.0)
    return np.where((n[..., 0] >= 2) & (va > 0) & (vb > 0), rho, np.nan)


def _mwu_exact_sf(u: int, n1: int, n2: int) -> float:
    """P(U >= u) without ties: U's counts are the coefficients of the Gaussian binomial
    [n1+n2 choose m]_q = prod_{i<=m} (1 - q^(n+i)) / (1 - q^i), built in exact integers."""
    m, n = sorted((n1, n2))
    top = m * n
    counts = [1] + [0] * top
    for i in range(1, m + 1):
        for k in range(top, n + i - 1, -1):                  # times (1 - q^(n+i))
            counts[k] -= counts[k - n - i]
        for k in range(i, top + 1):                          # divided by (1 - q^i)
            counts[k] += counts[k - i]
    return sum(counts[max(u, 0):]) / math.comb(m + n, m)


def mann_whitney_u(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test, as `scipy.stats.mannwhitneyu(x, y)` with its defaults.

    Exact p when a sample has <= 8 values and nothing is tied, else the normal approximation
    with tie and continuity corrections. Returns (U of x, p). Callers drop NaN first.
    """
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    n1, n2 = x.size, y.size
    both = np.concatenate([x, y])
    u1 = float(average_ranks(both)[:n1].sum() - n1 * (n1 + 1) / 2)
    u = max(u1, n1 * n2 - u1)
    ties = np.unique(both, return_counts=True)[1].astype(np.float64)
    if (n1 <= 8 or n2 <= 8) and (ties == 1).all():
        p = 2.0 * _mwu_exact_sf(int(round(u)), n1, n2)
    else:
        n = n1 + n2
        s = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - (ties ** 3 - ties).sum() / (n * (n - 1))))
        p = 1.0 if s == 0 else math.erfc((u - n1 * n2 / 2.0 - 0.5) / s / math.sqrt(2.0))
    return u1, min(max(p, 0.0), 1.0)


def bootstrap_mean_difference(x: np.ndarray, y: np.ndarray, rng: np.random.Generator | int,
                              resamples: int = BOOTSTRAP, cache: dict | None = None) -> list[float]:
    """95% percentile CI of mean(x) - mean(y), resampling x and y independently.

    `rng` may be a seed (a fresh generator). With a seed, `cache` keeps the resample indices
    (and y's resampled means) across calls: the same seed and sizes draw the same indices, and
    every model of hq.csv is compared with the same human-human values.
    """
    key = (rng, x.size, y.size, resamples) if cache is not None and isinstance(rng, int) else None
    if key is None or key not in cache:
        gen = np.random.default_rng(rng) if isinstance(rng, int) else rng
        draws = (gen.integers(0, x.size, size=(resamples, x.size)), gen.integers(0, y.size, size=(resamples, y.size)))
        if key is not None:
            cache[key] = draws
    ix, iy = cache[key] if key is not None else draws
    y_key = None if key is None else (key, y.tobytes())
    if y_key is not None and y_key in cache:
        y_means = cache[y_key]
    else:
        y_means = y[iy].mean(axis=1)
        if y_key is not None:
            cache[y_key] = y_means
    diffs = x[ix].mean(axis=1) - y_means
    return [float(v) for v in np.percentile(diffs, [2.5, 97.5])]


def _alpha_unit_stats(values: np.ndarray) -> np.ndarray:
    """Per-unit sums for interval α: values [raters, units, ...] -> [units, ..., 4].

    (m, Σv, Σv², Σ_{i≠j}(v_i - v_j)² / (2 (m - 1))) over a unit's m values, zero for units with
    fewer than 2 values (not pairable, as Krippendorff's coincidence matrix leaves them out).
    """
    valid = ~np.isnan(values)
    v = np.where(valid, values, 0.0)
    m = valid.sum(axis=0).astype(np.float64)
    s1, s2 = v.sum(axis=0), (v * v).sum(axis=0)
    pairable = m >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        within = (m * s2 - s1 * s1) / (m - 1)
    stats = np.stack([m, s1, s2, within], axis=-1)
    return np.where(pairable[..., None], stats, 0.0)


def _alpha_from_sums(sums: np.ndarray) -> np.ndarray:
    """α = 1 - (n - 1) Σ_u within_u / (n Σv² - (Σv)²), from summed unit stats [..., 4].

    That is 1 - D_o / D_e with the coincidence matrix of pairable values and δ² = (c - k)².
    NaN with < 2 pairable values or no spread at all (D_e = 0).
    """
    n, s1, s2, within = np.moveaxis(sums, -1, 0)
    spread = n * s2 - s1 * s1
    ok = (n >= 2) & (spread > 1e-12 * np.maximum(n * s2, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, 1.0 - (n - 1) * within / spread, np.nan)


def krippendorff_alpha(values: np.ndarray) -> np.ndarray:
    """Interval Krippendorff's α of values [raters, units, ...] (NaN = missing) -> [...].

    Equals `krippendorff.alpha(values[..., j], level_of_measurement='interval')` per trailing index.
    """
    return _alpha_from_sums(_alpha_unit_stats(np.asarray(values, np.float64)).sum(axis=0))


def krippendorff_alpha_ci(values: np.ndarray, rng: np.random.Generator,
                          resamples: int = BOOTSTRAP) -> np.ndarray:
    """95% percentile CIs [..., 2] of α over bootstrap resamples of the units (one resample of
    the units serves every trailing index); NaN where fewer than half the resamples define α."""
    stats = _alpha_unit_stats(np.asarray(values, np.float64))        # [U, ..., 4]
    units = stats.shape[0]
    draws = rng.integers(0, units, size=(resamples, units))
    flat = (draws + units * np.arange(resamples)[:, None]).ravel()
    counts = np.bincount(flat, minlength=resamples * units).reshape(resamples, units)
    sums = np.tensordot(counts.astype(np.float64), stats, axes=(1, 0))  # [B, ..., 4]
    alphas = _alpha_from_sums(sums)
    enough = np.isfinite(alphas).sum(axis=0) >= resamples / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)              # all-NaN slices
        ci = np.nanpercentile(alphas, [2.5, 97.5], axis=0)
    return np.where(enough[None], ci, np.nan).transpose(*range(1, ci.ndim), 0)


def calibrate(scores: np.ndarray, expert_levels: np.ndarray, num_levels: int = NUM_LEVELS,
              ranks: np.ndarray | None = None) -> np.ndarray:
    """Quantile-maps scores [M, N, E] onto the experts' pooled level marginals per emotion.

    expert_levels [H, N, E]: the experts' read-out levels (NaN = not rated). A score of mid-rank
    quantile q = (rank - 1/2) / n among the rater's n scores of that emotion becomes the smallest
    level k with P(expert level <= k) >= q. NaN stays NaN; an emotion no expert rated gives NaN.
    `ranks` (optional): `average_ranks` of scores.transpose(0, 2, 1), if already known.
    """
    counts = np.stack([(expert_levels == k).sum(axis=(0, 1)) for k in range(num_levels)], axis=-1)
    total = counts.sum(axis=-1, keepdims=True)                       # [E, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        cdf = np.cumsum(counts, axis=-1) / total                      # [E, L]
    if ranks is None:
        ranks = average_ranks(np.asarray(scores, np.float64).transpose(0, 2, 1))   # [M, E, N]
    n = (~np.isnan(ranks)).sum(axis=-1, keepdims=True)
    q = (ranks - 0.5) / np.maximum(n, 1)
    level = (q[..., None] > cdf[None, :, None, :]).sum(axis=-1).astype(np.float64)
    level = np.minimum(level, num_levels - 1)
    level[np.isnan(q) | (total[None, :, :] == 0)] = np.nan
    return level.transpose(0, 2, 1)


# ---------------------------------------------------------------------------
# The evaluation.

def _nan(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def json_ready(obj):
    """Plain Python containers and numbers; NaN / inf -> None (valid JSON with allow_nan=False)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _nan(obj)
    return obj


def _summary(per_emotion: np.ndarray, prefix: str = "") -> dict:
    """mean / std (ddof 1) / median over the emotions where κ is defined, plus the 40 values."""
    defined = per_emotion[~np.isnan(per_emotion)]
    out = {
        f"{prefix}mean_kappa": float(defined.mean()) if defined.size else None,
        f"{prefix}std_kappa": float(defined.std(ddof=1)) if defined.size > 1 else None,
        f"{prefix}median_kappa": float(nan_median(defined)) if defined.size else None,
        f"{prefix}n_emotions": int(defined.size),
        f"{prefix}per_emotion_kappa": {name: _nan(v) for name, v in zip(NAMES, per_emotion)},
    }
    return out


def group_of(name: str, human: bool, groups=GROUPS) -> str:
    if human:
        return HUMANS
    for group, patterns in groups:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return group
    return OTHER


def _check_inputs(ratings: np.ndarray, names: Sequence[str], human: np.ndarray) -> None:
    if ratings.ndim != 3 or ratings.shape[2] != E:
        raise ValueError(f"ratings must be [annotators, images, {E}], got shape {ratings.shape}")
    if len(names) != ratings.shape[0] or human.shape != (ratings.shape[0],):
        raise ValueError(f"{ratings.shape[0]} rows of ratings but {len(names)} names and {human.size} human flags")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        raise ValueError(f"annotator names must be unique; repeated: {dupes}")
    if not human.any():
        raise ValueError("no human annotator: every κ is measured against the human raters")


def hq_agreement(ratings: np.ndarray, names: Sequence[str], human: Sequence[bool], *, full: bool = True,
                 seed: int = SEED, groups=GROUPS, demographics: Mapping[str, Sequence] | None = None,
                 bootstrap: int = BOOTSTRAP, min_group_images: int = MIN_GROUP_IMAGES) -> dict:
    """ratings [R, N, 40] (NaN = missing), rows = annotators -> the agreement.json dict.

    `full=False` computes only the κ part ("annotators" with mean/std/median/per-emotion κ), fast
    enough for a trainer's periodic evaluation. The result is JSON-ready: plain Python types,
    NaN as None. `groups` and `demographics` ({attribute: one value per image, None = unknown})
    only matter with full=True.
    """
    return _evaluate(ratings, names, human, full=full, seed=seed, groups=groups, demographics=demographics,
                     bootstrap=bootstrap, min_group_images=min_group_images)


def _evaluate(ratings, names, human, *, full, seed, groups, demographics, bootstrap, min_group_images,
              on_figure_data=None) -> dict:
    """`hq_agreement`; with full=True, `on_figure_data(partial result)` is called as soon as what
    the figures show is known (κ's, the pairwise matrix, α), so that the CLI can draw them while
    the rest computes."""
    ratings = np.asarray(ratings, dtype=np.float64)
    names = [str(n) for n in names]
    human = np.asarray(human, dtype=bool)
    _check_inputs(ratings, names, human)
    pairwise = kappa_lib.pairwise_quadratic_kappa(ratings)
    per_emotion = kappa_lib.annotator_kappas(pairwise, human)
    rated = ~np.isnan(ratings)
    annotators = {}
    for i, name in enumerate(names):
        annotators[name] = {"human": bool(human[i]), "n_images": int(rated[i].any(axis=1).sum()),
                            **_summary(per_emotion[i])}
    result = {"protocol": PROTOCOL, "emotions": list(NAMES), "num_images": ratings.shape[1],
              "annotators": annotators}
    if not full:
        return json_ready(result)
    result["protocol"] = {**PROTOCOL, "bootstrap": bootstrap, "seed": seed}
    result["pairwise_mean_kappa"] = _pairwise_matrix(pairwise, names, human)
    with_humans = np.flatnonzero(rated[human].any(axis=(0, 2)))       # images some human rated
    alpha_values = ratings[human][:, with_humans]
    alpha = krippendorff_alpha(alpha_values)
    alpha_ci = krippendorff_alpha_ci(alpha_values, np.random.default_rng(seed), bootstrap)
    result["krippendorff_alpha"] = {n: _nan(a) for n, a in zip(NAMES, alpha)}
    result["krippendorff_alpha_ci95"] = {n: [_nan(lo), _nan(hi)] for n, (lo, hi) in zip(NAMES, alpha_ci)}
    defined = alpha[~np.isnan(alpha)]
    result["krippendorff_alpha_mean"] = float(defined.mean()) if defined.size else None
    if on_figure_data is not None:
        on_figure_data(json_ready(result))

    machines = np.flatnonzero(~human)
    machine_ranks = average_ranks(ratings[machines].transpose(0, 2, 1))   # [M, E, N]: ρ and calibration
    for i in range(len(names)):
        annotators[names[i]]["group"] = group_of(names[i], human[i], groups)
    for i, rho in zip(machines, _spearman_vs_median(ratings, human, machine_ranks)):
        defined = rho[~np.isnan(rho)]
        annotators[names[i]]["spearman_vs_median"] = float(defined.mean()) if defined.size else None
        annotators[names[i]]["per_emotion_spearman"] = {n: _nan(v) for n, v in zip(NAMES, rho)}
    for i, values in zip(machines, _calibrated_kappas(ratings, human, machine_ranks)):
        annotators[names[i]].update(_summary(values, prefix="calibrated_"))

    result["could_be_annotator"] = _could_be_annotator(pairwise, names, human, seed, bootstrap)
    result["groups"] = _group_comparisons(per_emotion, names, human, groups, seed, bootstrap)
    if demographics:
        result["demographics"] = _demographics(ratings, names, human, demographics, min_group_images)
    return json_ready(result)


def _spearman_vs_median(ratings: np.ndarray, human: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """[non-humans, E]: ρ of each non-human with the per-image median human rating.
    ranks: `average_ranks` of the non-humans' ratings [M, E, N]."""
    median = nan_median(ratings[human], axis=0)                     # [N, E]
    return spearman(ratings[~human].transpose(0, 2, 1), median.T[None], ranks)


def _calibrated_kappas(ratings: np.ndarray, human: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """[non-humans, E]: κ with the humans after quantile-mapping the non-humans' scores."""
    experts = ratings[human]
    mapped = calibrate(ratings[~human], kappa_lib.readout(experts), ranks=ranks)
    k = kappa_lib.cross_quadratic_kappa(mapped, experts)               # [M, H, E]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)              # no defined κ with any human
        return np.nanmean(k, axis=1)


def _could_be_annotator(pairwise: np.ndarray, names: list[str], human: np.ndarray, seed: int,
                        bootstrap: int) -> dict:
    humans = np.flatnonzero(human)
    upper = np.triu(np.ones((len(names),) * 2, dtype=bool), k=1)      # unordered pairs
    out, cache = {}, {}
    for r, name in enumerate(names):
        others = humans[humans != r]
        mine = pairwise[r, others].ravel()
        mine = mine[~np.isnan(mine)]
        pair = upper[np.ix_(others, others)]
        theirs = pairwise[np.ix_(others, others)][pair].ravel()
        theirs = theirs[~np.isnan(theirs)]
        entry = {"p_value": None, "verdict": None, "mean_diff": None, "ci95": [None, None],
                 "u_statistic": None, "n_rater_kappas": int(mine.size), "n_human_kappas": int(theirs.size)}
        if mine.size >= 2 and theirs.size >= 2:
            u, p = mann_whitney_u(mine, theirs)
            entry.update(p_value=p, verdict="yes" if p > P_THRESHOLD else "no", u_statistic=u,
                         mean_diff=float(mine.mean() - theirs.mean()),
                         ci95=bootstrap_mean_difference(mine, theirs, seed, bootstrap, cache))
        out[name] = entry
    return out


def _group_comparisons(per_emotion: np.ndarray, names: list[str], human: np.ndarray, groups, seed: int,
                       bootstrap: int) -> dict:
    member_of = [group_of(n, h, groups) for n, h in zip(names, human)]
    order = [g for g in dict.fromkeys([HUMANS] + [g for g, _ in groups] + [OTHER]) if g in member_of]
    values, members, summary = {}, {}, {}
    for g in order:
        rows = [i for i, m in enumerate(member_of) if m == g]
        members[g] = [names[i] for i in rows]
        v = per_emotion[rows].ravel()
        values[g] = v[~np.isnan(v)]
        summary[g] = {"n_values": int(values[g].size),
                      "mean": float(values[g].mean()) if values[g].size else None,
                      "median": float(nan_median(values[g])) if values[g].size else None,
                      "std": float(values[g].std(ddof=1)) if values[g].size > 1 else None}
    comparisons = []
    for i, g1 in enumerate(order):
        for g2 in order[i + 1:]:
            a, b = values[g1], values[g2]
            if a.size < 2 or b.size < 2:
                continue
            u, p = mann_whitney_u(a, b)
            comparisons.append({"group1": g1, "group2": g2, "mean_diff": float(a.mean() - b.mean()),
                                "ci95": bootstrap_mean_difference(a, b, np.random.default_rng(seed), bootstrap),
                                "p_value": p, "u_statistic": u})
    return {"members": members, "summary": summary, "comparisons": comparisons,
            "values": "each member's per-emotion kappas (vs humans), pooled"}


def _pairwise_matrix(pairwise: np.ndarray, names: list[str], human: np.ndarray) -> dict:
    """Mean κ over emotions for every pair, humans first, each block sorted by name."""
    order = sorted(np.flatnonzero(human), key=lambda i: names[i]) + \
        sorted(np.flatnonzero(~human), key=lambda i: names[i])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)              # pairs with no defined κ
        mean = np.nanmean(pairwise, axis=2)
    return {"annotators": [names[i] for i in order], "matrix": mean[np.ix_(order, order)]}


# ---------------------------------------------------------------------------
# Demographic breakdown.

def _mean_kappa_from_sums(sums, self_pair: np.ndarray) -> np.ndarray:
    """sums: 6 arrays [..., R, H, E] -> each rater's mean κ over emotions [..., R] (as `_summary`)."""
    k = kappa_lib.kappa_from_sums(*sums)
    k = np.where(self_pair[:, :, None], np.nan, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)              # undefined κ's
        return np.nanmean(np.nanmean(k, axis=-2), axis=-1)


def _moment_sums(levels, valid, humans, images, chunk: int = 64) -> list[np.ndarray]:
    """The 6 κ sums [R, H, E] over `images`, accumulated a chunk of images at a time
    (all per-image terms at once would be [images, R, H, E] x 6: ~850 MB at published size)."""
    totals = None
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        sums = [m.sum(axis=0) for m in kappa_lib.image_moments(levels[:, part], valid[:, part], humans)]
        totals = sums if totals is None else [t + s for t, s in zip(totals, sums)]
    return totals


@dataclasses.dataclass
class _Jackknife:
    theta: np.ndarray            # [R] mean κ on the images
    corrected: np.ndarray        # [R] bias-corrected: n θ - (n - 1) mean(θ_-i)
    se: np.ndarray               # [R] delete-one-image jackknife standard error


def _jackknife_mean_kappa(levels, valid, humans, self_pair, images, chunk: int = 64) -> _Jackknife:
    """Each rater's mean κ on `images`, jackknifed over the images (κ's of leave-one-out sums)."""
    totals = _moment_sums(levels, valid, humans, images, chunk)
    theta = _mean_kappa_from_sums(totals, self_pair)
    leave_one_out = []
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk]
        moments = kappa_lib.image_moments(levels[:, part], valid[:, part], humans)
        leave_one_out.append(_mean_kappa_from_sums([t[None] - m for t, m in zip(totals, moments)], self_pair))
    loo = np.concatenate(leave_one_out)                                  # [n, R]
    n = loo.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(loo, axis=0)
        se = np.sqrt((n - 1) / n * np.nansum((loo - mean) ** 2, axis=0))
    return _Jackknife(theta, n * theta - (n - 1) * mean, se)


def _demographics(ratings, names, human, demographics, min_images) -> dict:
    """κ per attribute value. Why bias-corrected: κ is a ratio whose denominator (the expected
    disagreement) is noisy on few images, so κ on a subset is biased low, by ~0.02 on 400 of the
    synthetic images; uncorrected, a third of the raters looked worse on each ethnicity of a
    synthetic set where demographics change nothing. The jackknife removes that O(1/n) bias."""
    valid = ~np.isnan(ratings)
    levels = np.where(valid, kappa_lib.readout(ratings), 0.0)
    humans = np.flatnonzero(human)
    self_pair = np.arange(len(names))[:, None] == humans[None, :]      # [R, H]
    overall = _jackknife_mean_kappa(levels, valid, humans, self_pair, np.arange(ratings.shape[1])).corrected
    out = {"method": "per attribute value: mean kappa on its images, and its delete-one-image jackknife "
                     "bias-corrected value with a 95% CI (±1.96 jackknife SE); flagged iff the bias-corrected "
                     "mean kappa on all images lies outside that CI; gap = corrected value - that on all images",
           "min_images": min_images, "attributes": {}}
    for attribute, per_image in demographics.items():
        per_image = list(per_image)
        if len(per_image) != ratings.shape[1]:
            raise ValueError(f"demographics[{attribute!r}] has {len(per_image)} values for {ratings.shape[1]} images")
        by_value: dict[str, list[int]] = {}
        for i, v in enumerate(per_image):
            if v is not None and str(v).strip():
                by_value.setdefault(str(v).strip(), []).append(i)
        section = {"values": {}, "skipped": {}, "unknown_images": len(per_image) - sum(map(len, by_value.values()))}
        for value in sorted(by_value):
            images = np.array(by_value[value])
            if images.size < min_images:
                section["skipped"][value] = int(images.size)
                continue
            jk = _jackknife_mean_kappa(levels, valid, humans, self_pair, images)
            raters = {}
            for r, name in enumerate(names):
                lo, hi = jk.corrected[r] - 1.96 * jk.se[r], jk.corrected[r] + 1.96 * jk.se[r]
                raters[name] = {"mean_kappa": _nan(jk.theta[r]), "mean_kappa_bias_corrected": _nan(jk.corrected[r]),
                                "ci95": [_nan(lo), _nan(hi)], "gap_vs_all": _nan(jk.corrected[r] - overall[r]),
                                "flagged": bool(np.isfinite(lo) and not lo <= overall[r] <= hi)}
            section["values"][value] = {"n_images": int(images.size), "annotators": raters}
        out["attributes"][attribute] = section
    return out


# ---------------------------------------------------------------------------
# Tables and figures (from the result dict alone).

def _fmt(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _rows_by_mean(result: dict) -> list[tuple[str, dict]]:
    items = list(result["annotators"].items())
    return sorted(items, key=lambda kv: (kv[1]["mean_kappa"] is None, -(kv[1]["mean_kappa"] or 0.0)))


def _table_cells(result: dict) -> tuple[list[str], list[list[str]]]:
    full = "could_be_annotator" in result
    header = ["Annotator", "Human", "Mean κ ± std", "Median κ"]
    if full:
        header += ["Spearman ρ", "Could be annotator (p)", "Calibrated mean κ"]
    rows = []
    for name, a in _rows_by_mean(result):
        std = "" if a["std_kappa"] is None else f" ± {a['std_kappa']:.3f}"
        row = [name, "yes" if a["human"] else "no", _fmt(a["mean_kappa"]) + std, _fmt(a["median_kappa"])]
        if full:
            c = result["could_be_annotator"].get(name, {})
            verdict = "—" if c.get("verdict") is None else f"{c['verdict']} ({c['p_value']:.3g})"
            row += [_fmt(a.get("spearman_vs_median")), verdict, _fmt(a.get("calibrated_mean_kappa"))]
        rows.append(row)
    return header, rows


def markdown_table(result: dict) -> str:
    """The paper's agreement table: one row per annotator, sorted by mean κ (highest first)."""
    header, rows = _table_cells(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] * len(header)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(ch, ch) for ch in text)


def latex_table(result: dict) -> str:
    header, rows = _table_cells(result)
    header = [h.replace("κ", r"$\kappa$").replace("ρ", r"$\rho$").replace("±", r"$\pm$") for h in header]
    body = [" & ".join(_latex_escape(c).replace("±", r"$\pm$").replace("—", "--") for c in row) + r" \\"
            for row in rows]
    spec = "l" + "c" + "r" * (len(header) - 2)
    return "\n".join([r"\begin{tabular}{" + spec + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def report_markdown(result: dict) -> str:
    """agreement.md: the main table, groups, α and the demographic flags."""
    parts = [f"# HQ agreement\n\n{result['num_images']} images, {len(result['annotators'])} annotators. "
             "κ: quadratic-weighted Cohen's κ on int-truncated ratings 0..7, vs the human raters.\n",
             markdown_table(result)]
    if "groups" in result:
        parts.append("\n## Groups (per-emotion κ's of the members, pooled)\n\n"
                     "| Group | n | mean | median | members |\n"
                     "| --- | --- | --- | --- | --- |\n" + "".join(
                         f"| {g} | {s['n_values']} | {_fmt(s['mean'])} | {_fmt(s['median'])} | "
                         f"{', '.join(result['groups']['members'][g])} |\n"
                         for g, s in result["groups"]["summary"].items()))
    if "krippendorff_alpha" in result:
        parts.append(f"\nKrippendorff's α (interval, humans), mean over emotions: "
                     f"{_fmt(result['krippendorff_alpha_mean'])}\n")
    if "demographics" in result:
        flags = [f"- {attr}={value}: {name} mean κ {_fmt(a['mean_kappa'])}, bias-corrected "
                 f"{_fmt(a['mean_kappa_bias_corrected'])} (95% CI {_fmt(a['ci95'][0])}..{_fmt(a['ci95'][1])}), "
                 f"gap vs all images {a['gap_vs_all']:+.3f}\n"
                 for attr, section in result["demographics"]["attributes"].items()
                 for value, v in section["values"].items() for name, a in v["annotators"].items() if a["flagged"]]
        parts.append("\n## Demographic gaps beyond the CI\n\n" + ("".join(flags) or "none\n"))
    return "".join(parts)


def per_emotion_rows(result: dict) -> tuple[list[str], list[list]]:
    """One row per emotion: α with its CI, then each annotator's κ (and ρ, calibrated κ)."""
    ann = result["annotators"]
    header = ["emotion", "family"]
    columns = []
    if "krippendorff_alpha" in result:
        header += ["krippendorff_alpha", "alpha_ci95_low", "alpha_ci95_high"]
    for key, label in (("per_emotion_kappa", "kappa"), ("per_emotion_spearman", "spearman"),
                       ("calibrated_per_emotion_kappa", "calibrated_kappa")):
        for name, a in ann.items():
            if key in a:
                header.append(f"{label}:{name}")
                columns.append(a[key])
    rows = []
    for e, emotion in enumerate(NAMES):
        row = [emotion, taxonomy.EMOTIONS[e].family]
        if "krippendorff_alpha" in result:
            row += [result["krippendorff_alpha"][emotion], *result["krippendorff_alpha_ci95"][emotion]]
        rows.append(row + [c[emotion] for c in columns])
    return header, rows


def _save(fig, path: pathlib.Path, margins: tuple[float, float, float, float]) -> pathlib.Path:
    """Fixed margins in inches (left, bottom, right, top): tight_layout would draw every text twice."""
    w, h = fig.get_size_inches()
    left, bottom, right, top = margins
    fig.subplots_adjust(left=left / w, bottom=bottom / h, right=1 - right / w, top=1 - top / h)
    fig.savefig(path, dpi=120, pil_kwargs={"compress_level": 1})   # zlib level 1: 3x faster, ~1.5x bigger
    return path


def _cell_labels(fig, ax, matrix: np.ndarray) -> None:
    """Each finite cell's value (2 decimals, 5 pt, white) at its centre. One collection of
    glyph outlines instead of r^2 Text artists: half the heatmap's drawing time at r = 22."""
    from matplotlib.collections import PathCollection
    from matplotlib.font_manager import FontProperties
    from matplotlib.path import Path
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    font, shapes, paths = FontProperties(size=5), {}, []
    cells = list(zip(*np.nonzero(np.isfinite(matrix))))
    for i, j in cells:
        label = f"{matrix[i, j]:.2f}"
        if label not in shapes:                        # centred on (0, 0), in points
            path = TextPath((0, 0), label, prop=font)
            # The outline's points (Bezier control points too) bound it: get_extents' exact curve
            # bounds cost a third of the figure, for a shift far below a pixel.
            points = path.vertices[path.codes != Path.CLOSEPOLY]
            centre = (points.min(axis=0) + points.max(axis=0)) / 2
            shapes[label] = path.transformed(Affine2D().translate(*-centre))
        paths.append(shapes[label])
    labels = PathCollection(paths, offsets=[(j, i) for i, j in cells], offset_transform=ax.transData,
                            facecolors="w", edgecolors="none")
    labels.set_transform(Affine2D().scale(fig.dpi / 72))     # points -> pixels
    ax.add_collection(labels, autolim=False)


def _category_labels(ax, axis: str, labels: Sequence[str], **text) -> None:
    """Labels at 0, 1, ... along `axis` ('x': below the axes, 'y': left of them), with tick marks,
    as one line of markers and plain Text artists: matplotlib's own ticks (two lines and two texts
    each, copied property by property) were a third of the time of each figure."""
    from matplotlib.lines import TICKDOWN, TICKLEFT
    from matplotlib.transforms import offset_copy

    at, zero = np.arange(len(labels)), np.zeros(len(labels))
    if axis == "x":
        ax.set_xticks([])
        xy, place, mark = (at, zero), ax.get_xaxis_transform(), TICKDOWN
        text = {"va": "top", "ha": "center", **text}
    else:
        ax.set_yticks([])
        xy, place, mark = (zero, at), ax.get_yaxis_transform(), TICKLEFT
        text = {"va": "center", "ha": "right", **text}
    ax.plot(*xy, linestyle="none", marker=mark, ms=3.5, mew=0.8, color="k", transform=place, clip_on=False)
    # 7 points out: the 3.5-point mark and matplotlib's 3.5-point padding.
    shifted = offset_copy(place, fig=ax.figure, units="points", **({"y": -7} if axis == "x" else {"x": -7}))
    for a, b, label in zip(*xy, labels):
        ax.text(a, b, label, transform=shifted, fontsize=7, **text)


def _text_inches(labels) -> float:
    """Room for the longest of `labels` at 7 pt (about 0.052 inch a character) plus a tick."""
    return 0.052 * max(len(t) for t in labels) + 0.3


def _values(mapping: Mapping[str, float | None], keys: Sequence[str]) -> np.ndarray:
    return np.array([np.nan if mapping[k] is None else mapping[k] for k in keys], dtype=np.float64)


FIGURES = ("pairwise_kappa_heatmap.png", "per_emotion_kappa.png", "krippendorff_alpha.png")


def write_figures(result: dict, out_dir) -> list[pathlib.Path]:
    """Pairwise κ heatmap, per-emotion κ of each model vs the humans, α per emotion with CIs."""
    return [draw_figure(name, result, out_dir) for name in FIGURES]


def draw_figure(name: str, result: dict, out_dir) -> pathlib.Path:
    """One of `FIGURES`, drawn from the result dict (the first two need only its κ part)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, and a faster import

    path = pathlib.Path(out_dir) / name
    label = _text_inches(result["annotators"])
    if name == "pairwise_kappa_heatmap.png":
        pw = result["pairwise_mean_kappa"]
        matrix = np.array([[np.nan if v is None else v for v in row] for row in pw["matrix"]])
        r = len(pw["annotators"])
        fig = Figure(figsize=(label + 0.3 * r + 1.6, 0.75 * label + 0.3 * r + 0.8))
        ax = fig.add_subplot()
        low = float(np.nanmin(matrix)) if np.isfinite(matrix).any() else 0.0
        image = ax.imshow(matrix, cmap="viridis", vmin=min(0.0, low), vmax=1)
        _category_labels(ax, "x", pw["annotators"], rotation=45, ha="right")
        _category_labels(ax, "y", pw["annotators"])
        if r <= 30:
            _cell_labels(fig, ax, matrix)
        fig.colorbar(image, ax=ax, label="mean quadratic-weighted κ over the emotions", fraction=0.04)
        ax.set_title("Pairwise κ (humans first)")
        return _save(fig, path, (label, 0.75 * label + 0.2, 1.2, 0.4))
    if name == "per_emotion_kappa.png":
        ann = result["annotators"]
        humans = np.array([_values(a["per_emotion_kappa"], NAMES) for a in ann.values() if a["human"]])
        fig = Figure(figsize=(14, 4 + _text_inches(NAMES)))
        ax = fig.add_subplot()
        x = np.arange(E)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)          # emotions with no defined κ
            ax.fill_between(x, np.nanmin(humans, 0), np.nanmax(humans, 0), color="0.85", label="humans (min-max)")
            ax.plot(x, np.nanmean(humans, 0), color="k", lw=2.5, label="humans (mean)")
        markers = "osD^v<>ph*x+"
        for k, (who, a) in enumerate((n, a) for n, a in ann.items() if not a["human"]):
            ax.plot(x, _values(a["per_emotion_kappa"], NAMES), marker=markers[k % len(markers)], ms=3, lw=1,
                    label=who)
        _category_labels(ax, "x", NAMES, rotation=90)
        ax.set_xlim(-0.5, E - 0.5)
        ax.set_ylabel("κ vs the human raters (mean over humans)")
        ax.set_title("Per-emotion agreement with the human raters")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        return _save(fig, path, (0.7, _text_inches(NAMES), label + 0.6, 0.4))
    if name == "krippendorff_alpha.png":
        alpha = _values(result["krippendorff_alpha"], NAMES)
        ci = np.array([[np.nan if v is None else v for v in result["krippendorff_alpha_ci95"][n]] for n in NAMES])
        order = np.argsort(np.where(np.isnan(alpha), -np.inf, alpha))  # highest at the top
        fig = Figure(figsize=(_text_inches(NAMES) + 5, 9))
        ax = fig.add_subplot()
        y = np.arange(E)
        err = np.stack([alpha[order] - ci[order, 0], ci[order, 1] - alpha[order]])
        ax.errorbar(alpha[order], y, xerr=np.nan_to_num(np.abs(err)), fmt="o", ms=4, capsize=2)
        _category_labels(ax, "y", [NAMES[i] for i in order])
        ax.set_ylim(-0.5, E - 0.5)
        ax.set_xlabel("Krippendorff's α (interval), human raters, 95% bootstrap CI")
        ax.set_title("Human inter-rater reliability per emotion")
        return _save(fig, path, (_text_inches(NAMES), 0.6, 0.2, 0.4))
    raise ValueError(f"unknown figure {name!r}; expected one of {FIGURES}")


def write_outputs(result: dict, out_dir, figures: bool = True) -> list[pathlib.Path]:
    """agreement.json / .md / .tex, per_emotion.csv and (optionally) the PNG figures."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "agreement.json", out / "agreement.md", out / "agreement.tex", out / "per_emotion.csv"]
    paths[0].write_text(json.dumps(json_ready(result), indent=1, allow_nan=False, ensure_ascii=False) + "\n")
    paths[1].write_text(report_markdown(result))
    paths[2].write_text(latex_table(result))
    header, rows = per_emotion_rows(result)
    with open(paths[3], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    if figures:
        paths += write_figures(result, out)
    return paths


# ---------------------------------------------------------------------------
# Reading hq.csv (and extra annotators).

@dataclasses.dataclass
class Annotations:
    ratings: np.ndarray          # [R, N, 40] float64, NaN = not rated, after rescaling
    names: list[str]
    human: np.ndarray            # [R] bool
    images: list[str]
    source: dict[str, str]       # annotator -> the file its rows came from
    report: dict                 # counts for agreement.json["input"]


@dataclasses.dataclass
class Rows:
    """One file's rows, column by column (`read_rows`)."""
    path: pathlib.Path
    lines: np.ndarray            # [rows] int: the line each row starts on
    images: list[str]
    annotators: list[str]
    human: np.ndarray            # [rows] bool
    values: np.ndarray           # [rows, 40] float64: the emotion ratings, NaN = not rated

    def where(self, row: int) -> str:
        return f"{self.path}:{self.lines[row]}"


_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n"}


def _flag(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise AgreementInputError(f"{where}: human must be True or False, got {value!r}")


def _flags(values: Sequence, where) -> np.ndarray:
    """`_flag` of each value (each distinct value parsed once); errors name the first bad row."""
    parsed = {}
    for i, value in enumerate(values):
        if value not in parsed:
            parsed[value] = _flag(value, where(i))
    return np.fromiter(map(parsed.__getitem__, values), dtype=bool, count=len(values))


def read_rows(path, human_default: bool | None = None) -> Rows:
    """The rows of a CSV in the hq.csv layout, or of a JSONL file (by the `.jsonl` suffix).

    `human_default`: the flag of rows without a `human` column/key (None: the column is required).
    """
    path = pathlib.Path(path)
    rows = (_rows_jsonl if path.suffix.lower() == ".jsonl" else _rows_csv)(path, human_default)
    if not rows.annotators:
        raise AgreementInputError(f"{path}: no rows")
    if "" in rows.images or "" in rows.annotators:
        first = min(c.index("") for c in (rows.images, rows.annotators) if "" in c)
        raise AgreementInputError(f"{rows.where(first)}: empty image or annotator")
    return rows


def _rows_csv(path: pathlib.Path, human_default: bool | None) -> Rows:
    data = _mapped(path)
    line_end = data.find(b"\n")
    try:
        header = next(csv.reader([data[:line_end if line_end >= 0 else len(data)].decode("utf-8")]), None)
    except UnicodeDecodeError as e:
        raise AgreementInputError(f"{path}:1: not UTF-8 ({e})") from None
    if header is None:
        raise AgreementInputError(f"{path}: empty file")
    column = {name.strip(): i for i, name in enumerate(header)}
    required = ["image", "annotator", "annotations"] + (["human"] if human_default is None else [])
    missing = [c for c in required if c not in column]
    if missing:
        raise AgreementInputError(f"{path}:1: missing column(s) {missing}; found {header}")
    plain = _split_plain_csv(data, len(header)) if column["annotations"] == len(header) - 1 else None
    if plain is not None:
        fields, starts, ends = plain
        lines = np.arange(2, len(starts) + 2)
        values, slow = _plain_dict_values(data, starts, ends)
        rows = np.flatnonzero(slow)                # the rest: one by one
        annotations = {i: data[starts[i]:ends[i]] for i in rows.tolist()}
        if any(b"\n" in text or b"\r" in text for text in annotations.values()):
            plain = None                           # a dict over several lines: the line numbers move
    if plain is None:                              # quotes or line breaks where the fast path can't follow
        try:
            records = _split_csv(data[:].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise AgreementInputError(f"{path}: not UTF-8 ({e})") from None
        lines = np.array([line for line, _ in records], dtype=np.int64)
        for line, record in records:
            if len(record) != len(header):
                raise AgreementInputError(f"{path}:{line}: {len(record)} fields, the header has {len(header)}")
        fields = list(zip(*(record for _, record in records))) or [()] * len(header)
        annotations, rows = fields[column["annotations"]], np.arange(len(records))
        values = np.full((len(records), E), np.nan)
    where = _where(path, lines)
    human = (_flags(fields[column["human"]], where) if "human" in column
             else np.full(len(lines), human_default, dtype=bool))
    _read_dicts(annotations, rows, where, values)
    return Rows(path, lines, list(map(str.strip, fields[column["image"]])),
                list(map(str.strip, fields[column["annotator"]])), human, values)


def _mapped(path: pathlib.Path) -> bytes | mmap.mmap:
    """The file's bytes, mapped instead of read: hq.csv is 90 MB, and its copy (and the copy's
    page faults) cost ~0.1 s. Slices of the map are bytes; it is unmapped with its last user."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            return b""                                   # an empty file cannot be mapped
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _where(path: pathlib.Path, lines: np.ndarray):
    """row -> 'file:line', for error messages."""
    return lambda row: f"{path}:{lines[row]}"


def _split_csv(text: str) -> list[tuple[int, list[str]]]:
    """(line where the record starts, fields) for the records after the header (csv module)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    out, line = [], reader.line_num + 1
    for record in reader:
        start, line = line, reader.line_num + 1          # a quoted field may span lines
        if record:
            out.append((start, record))
    return out


def _find_all(buf: np.ndarray, char: str, chunk: int = 1 << 20) -> np.ndarray:
    """np.flatnonzero(buf == ord(char)), a cache-sized chunk at a time (2x faster on 90 MB)."""
    hit = np.empty(min(chunk, len(buf)), dtype=bool)
    found = [np.flatnonzero(np.equal(buf[a:a + chunk], ord(char), out=hit[:len(buf[a:a + chunk])])) + a
             for a in range(0, len(buf), chunk)]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _split_plain_csv(data: bytes, columns: int) -> tuple[list[tuple[str, ...]], np.ndarray, np.ndarray] | None:
    """(the leading `columns - 1` fields as columns, where each record's last field starts and ends
    in `data`) when every record is one line of unquoted fields, the last one possibly quoted
    whole with no '"' inside: how csv.writer (or pandas) writes hq.csv, quoting the dicts with a
    comma. Record i is then on line i + 2 (unless a quoted last field holds a line break:
    `_rows_csv` checks the fields `_plain_dict_values` does not take; it takes none with one).
    None as soon as the file is anything else; `_split_csv` reads it then. Why: csv.reader steps
    through each of hq.csv's 90 MB of characters; here numpy finds the line breaks and quotes,
    and the dicts are read where they are.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    body = data.find(b"\n") + 1
    if not body:
        return None
    breaks = _find_all(buf, "\n")[1:]                   # the line break after each record...
    if data[-1:] != b"\n":
        breaks = np.append(breaks, len(data))           # ...or the end of the file
    begin = np.append(body, breaks[:-1] + 1)[:len(breaks)]
    end = breaks - ((data[body - 2:body] == b"\r\n") & (breaks < len(data)))     # before '\r\n'
    quotes = _find_all(buf, '"')
    low, high = np.searchsorted(quotes, begin), np.searchsorted(quotes, end)
    quoted = high - low == 2
    opening, closing = quotes[np.minimum(low, len(quotes) - 1)], quotes[np.minimum(low + 1, len(quotes) - 1)]
    if ((high - low > 2).any() or (high - low == 1).any() or (high - low).sum() != len(quotes) or (end <= begin).any()
            or (quoted & ((closing != end - 1) | (buf[opening - 1] != ord(",")))).any()):
        return None                                      # quotes elsewhere, blank lines, lines ending oddly
    lead_end = np.where(quoted, opening, end)            # the text before a quoted last field, or all of it
    text = b"\n".join([data[a:b] for a, b in zip(begin.tolist(), lead_end.tolist())])
    if b"\r" in text or np.any(np.fromiter(map(bytes.count, text.split(b"\n"), itertools.repeat(b",")),
                                             dtype=np.int64, count=len(begin)) != columns - 1):
        return None
    cells = text.replace(b"\n", b",")
    try:
        leading = cells.decode("utf-8").split(",")
    except UnicodeDecodeError:
        return None
    last = np.fromiter(map(len, cells.split(b",")[columns - 1::columns]), dtype=np.int64, count=len(begin))
    fields = [tuple(leading[c::columns]) for c in range(columns - 1)]
    return fields, np.where(quoted, opening + 1, end - last), np.where(quoted, closing, end)


def _rows_jsonl(path: pathlib.Path, human_default: bool | None) -> Rows:
    lines, images, annotators, flags, annotations = [], [], [], [], []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise AgreementInputError(f"{where}: not a JSON object ({e})") from None
            if not isinstance(obj, dict):
                raise AgreementInputError(f"{where}: not a JSON object")
            missing = [k for k in ("image", "annotator", "annotations") if k not in obj]
            if "human" not in obj and human_default is None:
                missing.append("human")
            if missing:
                raise AgreementInputError(f"{where}: missing key(s) {missing}")
            lines.append(number)
            images.append(str(obj["image"]).strip())
            annotators.append(str(obj["annotator"]).strip())
            flags.append(_flag(obj["human"], where) if "human" in obj else human_default)
            annotations.append(obj["annotations"])
    lines = np.array(lines, dtype=np.int64)
    values = np.full((len(lines), E), np.nan)
    _read_dicts(annotations, np.arange(len(lines)), _where(path, lines), values)
    return Rows(path, lines, images, annotators, np.array(flags, dtype=bool), values)


# Annotations: Python dict literals ("{'Family|Emotion': 3, ...}") or JSON objects.

def _read_dicts(annotations, rows: np.ndarray, where, values: np.ndarray) -> None:
    """values[i] = the 40 ratings (NaN = missing key or None) of annotations[i] (a dict or its
    text) for each i in rows, one dict at a time; errors name the row (`where(i)`) and key."""
    for index, (positions, columns), keys, table, fast in _parsed_by_layout(annotations, rows, where):
        block = np.array(table, dtype=np.float64).reshape(len(index), len(keys))
        bad = ~np.isfinite(block) & np.array(fast)[:, None]       # JSON's NaN / Infinity, 1e999
        if bad.any():
            i, p = np.argwhere(bad)[0]
            raise AgreementInputError(f"{where(index[i])}: rating of {keys[p]!r} is {block[i, p]}, "
                                      "not a finite number (leave the key out for 'not rated')")
        values[np.ix_(index, columns)] = block[:, positions]


def _parsed_by_layout(annotations, rows, where) -> list[tuple]:
    """Per key layout: (row indices, `_key_columns`, keys, their values, whether each row had only
    numbers), errors raised in the order of the rows."""
    layouts: dict[tuple, tuple] = {}
    for i in rows.tolist():
        d = parse_annotations(_text(annotations[i], where(i)), where(i))
        keys, values = tuple(d), list(d.values())
        if keys not in layouts:
            layouts[keys] = ([], _key_columns(keys, where(i)), keys, [], [])
        plain = _NUMBER.issuperset(map(type, values))        # else None, bool, str...: one by one
        if not plain:
            values = [_checked(v, k, where(i)) for k, v in zip(keys, values)]
        index, _, _, table, fast = layouts[keys]
        index.append(i)
        table.append(values)
        fast.append(plain)
    return list(layouts.values())


def _text(raw, where: str):
    if not isinstance(raw, bytes):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AgreementInputError(f"{where}: annotations are not UTF-8 ({e})") from None


_UNSET = object()
_JSON = json.JSONDecoder()


def parse_annotations(raw, where: str) -> dict:
    """The annotations dict from a Python literal (ast.literal_eval, never eval) or JSON text.

    Why the json detour: literal_eval takes ~10x longer. A Python dict repr without '"' or '\\'
    in it is valid JSON once its quotes are swapped, meaning the same dict; anything else goes to
    literal_eval.
    """
    if isinstance(raw, dict):
        return raw
    text = str(raw).strip()
    value = _UNSET
    if "\\" not in text and ('"' not in text or "'" not in text):
        try:
            value, end = _JSON.raw_decode(text.replace("'", '"'))   # no-op on JSON text
            if end != len(text):
                value = _UNSET
        except ValueError:
            pass
    if value is _UNSET:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise AgreementInputError(f"{where}: annotations is not a dict literal ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise AgreementInputError(f"{where}: annotations is a {type(value).__name__}, not a dict")
    return value


def _key_columns(keys: tuple, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the row of its emotion keys, their emotion columns); extras are skipped."""
    positions, columns, seen = [], [], {}
    for p, key in enumerate(keys):
        try:
            parsed = taxonomy.parse_key(key)
        except taxonomy.UnknownEmotionError as e:
            raise AgreementInputError(f"{where}: unknown key {key!r} ({e})") from None
        if parsed.kind != "emotion":
            continue
        if parsed.index in seen:
            raise AgreementInputError(f"{where}: keys {seen[parsed.index]!r} and {key!r} are the same emotion "
                                      f"{NAMES[parsed.index]!r}")
        seen[parsed.index] = key
        positions.append(p)
        columns.append(parsed.index)
    return np.array(positions, dtype=np.int64), np.array(columns, dtype=np.int64)


_NUMBER = {int, float}


def _checked(value, key, where: str) -> float:
    """One value off the fast path: None is missing; bool, str, NaN and the like are errors."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AgreementInputError(f"{where}: rating of {key!r} is {value!r}, not a finite number")
    return float(value)


# The plain layout, vectorised. hq.csv's 45k dicts are ~90 MB of text, mostly the same 40-44 keys
# over and over; `_plain_dict_values` reads them with whole-buffer numpy operations, without a
# Python object per key or value (only the numbers that are not single digits become floats).

_TOKEN_WIDTH = 24                # numbers on the fast path are shorter: '-1.2345678901234567e-10'
_NUMBER_CHARS = np.zeros(256, dtype=bool)
_NUMBER_CHARS[list(b"0123456789+-.eE")] = True
_MAX_LAYOUTS = 32                # key layouts tried before the remaining rows go one by one


@dataclasses.dataclass
class _Slots:
    """The "'key': value" items ("slots") of the dicts at data[starts[r]:ends[r]], by their quotes."""
    row: np.ndarray              # [slots] the dict each one is in
    first: np.ndarray            # [rows] each dict's first slot
    count: np.ndarray            # [rows] its number of slots (0 where its quotes don't pair up)
    key: np.ndarray              # [slots] position of the quote opening the key
    value: np.ndarray            # [slots] where the value's text starts (after "': ")
    length: np.ndarray           # [slots] its length, up to ", '" or the dict's final '}'


def _plain_dict_values(data: bytes, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ratings [rows, 40], slow [rows] bool) of the dicts at data[starts[r]:ends[r]].

    A row is taken when its text is exactly "{'key': NUMBER, 'key': NUMBER, ...}" as `repr`
    writes it (or '{}'), its keys a layout `_key_columns` accepts, none repeated, without '\\',
    and each NUMBER a finite plain decimal (digits, '.', 'e', a sign) that `float` reads as Python
    reads the literal. Every other row is `slow` (ratings NaN): `_read_dicts` reads those one by
    one and raises the errors, so this path decides nothing the per-row reader would not.
    """
    rows = len(starts)
    values = np.full((rows, E), np.nan)
    if len(data) < 8:
        return values, np.ones(rows, dtype=bool)
    buf = np.frombuffer(data, dtype=np.uint8)
    slots, paired = _slots(buf, starts, ends)
    number, plain = _numbers(buf, slots)
    bad = ~paired | (np.bincount(slots.row[~plain], minlength=rows) > 0)
    has = slots.count > 0
    bad[has] |= (slots.key[slots.first[has]] != starts[has] + 1) | (buf[starts[has]] != ord("{"))
    bad[has] |= buf[ends[has] - 1] != ord("}")
    bad[~has] |= (ends - starts != 2)[~has] | (buf[starts] != ord("{"))[~has] | (buf[starts + 1] != ord("}"))[~has]
    slow = bad | has                                  # '{}' rates nothing: taken as it is
    for keys, members in _layouts(data, starts, slots, np.flatnonzero(~bad)):
        columns = _plain_key_columns(keys)
        if columns is not None:                      # else the per-row reader raises, naming the row
            positions, emotions = columns
            values[members[:, None], emotions] = number[slots.first[members][:, None] + positions]
            slow[members] = False
    return values, slow


def _slots(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[_Slots, np.ndarray]:
    """The slots of the dicts at buf[starts[r]:ends[r]], and which dicts have an even number of
    quotes (an odd one is not plain: a quote inside a value or an escaped one)."""
    quotes = _find_all(buf, "'")
    low, high = np.searchsorted(quotes, starts), np.searchsorted(quotes, ends)
    paired = (high - low) % 2 == 0
    n = np.where(paired, high - low, 0)
    within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    quotes = quotes[np.repeat(low, n) + within]          # the quotes inside the dicts that pair up
    opening, closing = quotes[0::2], quotes[1::2]
    count = n // 2
    first = np.cumsum(count) - count
    row = np.repeat(np.arange(len(starts)), count)
    last = (first + count - 1)[count > 0]
    end = np.empty_like(opening)
    end[:-1] = opening[1:] - 2                           # before the ", '" of the next slot...
    end[last] = ends[row[last]] - 1                      # ...or before the dict's '}'
    value = closing + 3
    return _Slots(row, first, count, opening, value, end - value), paired


def _numbers(buf: np.ndarray, slots: _Slots) -> tuple[np.ndarray, np.ndarray]:
    """(each slot's number, whether its text is a plain number, read exactly as Python would)."""
    number = np.full(len(slots.value), np.nan)
    first = buf[np.minimum(slots.value, len(buf) - 1)] - np.uint8(ord("0"))       # wraps around below '0'
    digit = (slots.length == 1) & (first < 10)
    number[digit] = first[digit]                         # most ratings: one digit
    wide = np.flatnonzero((slots.length > 1) & (slots.length < _TOKEN_WIDTH)
                          & (slots.value <= len(buf) - _TOKEN_WIDTH))
    if wide.size:
        window = np.lib.stride_tricks.sliding_window_view(buf, _TOKEN_WIDTH)[slots.value[wide]]
        pad = np.arange(_TOKEN_WIDTH) >= slots.length[wide, None]
        window[pad] = 0                                  # each number then ends in at least one 0 byte
        text = window.tobytes()
        plain = np.ones(len(wide), dtype=bool)
        if text.translate(None, b"0123456789+-.eE\0") or text.count(0) != pad.sum():
            plain = (_NUMBER_CHARS[window] | pad).all(axis=1)     # rarely: find the culprits
        plain &= ~_leading_zero_int(window)
        text = text if plain.all() else window[plain].tobytes()
        number[wide[plain]] = _floats(text.replace(b"\0", b" ").split())
    return number, np.isfinite(number)


def _leading_zero_int(window: np.ndarray) -> np.ndarray:
    """'07', '-012': `float` reads them, Python's literal syntax does not (it allows '0', '00').
    window: the numbers' texts, padded with 0 bytes."""
    signed = (window[:, 0] == ord("-")) | (window[:, 0] == ord("+"))
    lead = np.where(signed, window[:, 1], window[:, 0])
    after = np.where(signed, window[:, 2], window[:, 1]) - np.uint8(ord("0"))
    suspect = np.flatnonzero((lead == ord("0")) & (after < 10))      # '0' then a digit: rare
    text = window[suspect]
    fraction = ((text == ord(".")) | (text == ord("e")) | (text == ord("E"))).any(axis=1)
    nonzero = ((text >= ord("1")) & (text <= ord("9"))).any(axis=1)
    out = np.zeros(len(window), dtype=bool)
    out[suspect] = ~fraction & nonzero
    return out


def _floats(tokens: list[bytes]) -> np.ndarray:
    """float of each token; NaN where `float` does not read it ('1-2', 'e5', '.')."""
    try:
        return np.fromiter(map(float, tokens), dtype=np.float64, count=len(tokens))
    except ValueError:
        out = np.full(len(tokens), np.nan)
        for i, token in enumerate(tokens):
            try:
                out[i] = float(token)
            except ValueError:
                pass
        return out


def _layouts(data: bytes, starts: np.ndarray, slots: _Slots, rows: np.ndarray):
    """Yields (keys, the rows with exactly those keys) among `rows`.

    A layout is the first remaining row's text around its values: for each slot, ", '" + key +
    "': " (for the first, the byte before the dict and "{'"). The rows with as many slots are compared with it without
    a Python object per key: rows whose values have the same lengths (say, all one-digit
    ratings) read alike but for their values, so each such group compares whole rows with its
    first one, and only that one with the layout, 8 bytes at a time. A row that differs waits
    for a later layout.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    words = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))   # unaligned 8-byte reads
    rows = rows[slots.count[rows] > 0]
    for _ in range(_MAX_LAYOUTS):
        if not rows.size:
            return
        model = rows[0]
        mine = slots.first[model] + np.arange(slots.count[model])
        edges = [data[a:b] for a, b in zip((slots.key[mine] - 2).tolist(), slots.value[mine].tolist())]
        candidates = rows[slots.count[rows] == len(edges)]
        slot = slots.first[candidates][:, None] + np.arange(len(edges))      # [candidates, slots]
        first, group = _groups(np.concatenate([slots.key[slot] - starts[candidates, None],
                                               slots.value[slot] - slots.key[slot], slots.length[slot]], axis=1))
        same = _same_edges(words, slots, slot[first], edges)[group]
        order, size = np.argsort(group, kind="stable"), np.bincount(group)
        for a, n in zip((np.cumsum(size) - size).tolist(), size.tolist()):
            if n > 1:
                members = order[a:a + n]
                same[members] &= _same_text(buf, starts, slots, candidates[members])
        # The first edge starts with the byte before the dict: its CSV quote, or the comma before it.
        if all((e[1:3] == b"{'" if j == 0 else e[:3] == b", '") and e[-3:] == b"': " for j, e in enumerate(edges)):
            yield tuple(e[3:-3] for e in edges), candidates[same]
        rows = np.setdiff1d(rows, candidates[same], assume_unique=True)
        rows = rows[rows != model]


def _groups(shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row of each group, each row's group) of the equal rows of an int matrix.

    Grouped by a 64-bit hash of the row (np.unique(axis=0) sorts whole rows: 10x slower); a row
    whose hash collides with a different row's gets a group of its own.
    """
    mix = np.random.default_rng(0).integers(1, 2 ** 63, size=shape.shape[1], dtype=np.uint64) | np.uint64(1)
    hashed = (shape.astype(np.uint64) * mix).sum(axis=1)           # wraps around: a hash
    _, first, group = np.unique(hashed, return_index=True, return_inverse=True)
    stray = np.flatnonzero((shape != shape[first[group]]).any(axis=1))
    group[stray] = len(first) + np.arange(len(stray))
    return np.concatenate([first, stray]), group


def _same_text(buf: np.ndarray, starts: np.ndarray, slots: _Slots, rows: np.ndarray) -> np.ndarray:
    """Which rows (whose slots sit where rows[0]'s do) read like rows[0] but for their values."""
    mine = slots.first[rows[0]] + np.arange(slots.count[rows[0]])
    size = slots.value[mine[-1]] + slots.length[mine[-1]] + 1 - starts[rows[0]]
    text = np.lib.stride_tricks.sliding_window_view(buf, size)[starts[rows]]     # [rows, size]
    value = np.zeros(size, dtype=bool)
    for a, n in zip((slots.value[mine] - starts[rows[0]]).tolist(), slots.length[mine].tolist()):
        value[a:a + n] = True
    return ((text == text[0]) | value).all(axis=1)


def _same_edges(words: np.ndarray, slots: _Slots, slot: np.ndarray, edges: list[bytes]) -> np.ndarray:
    """Which rows of slots [rows, n] have exactly `edges` around their values, 8 bytes at a time."""
    size = np.array([len(e) for e in edges])
    start = slots.key[slot] - 2
    same = (slots.value[slot] - start == size).all(axis=1)
    start[~same] = 0                                                   # keeps every read inside data
    differ = np.zeros(slot.shape, dtype=bool)
    for w in range(-(-size.max() // 8)):
        offset = np.minimum(8 * w, size - 8)                           # the last word may overlap
        expected = np.array([int.from_bytes(e[o:o + 8], "little") for e, o in zip(edges, offset.tolist())],
                            dtype=np.uint64)
        differ |= words[start + offset] != expected
    return same & ~differ.any(axis=1)


def _plain_key_columns(raw_keys: tuple[bytes, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """`_key_columns` of a layout of the fast path; None where the per-row reader must decide."""
    try:
        keys = tuple(k.decode("utf-8") for k in raw_keys)
        # A repeated key: the dict keeps the last value. '\\': an escape. A line break: the line numbers move.
        if len(set(keys)) == len(keys) and not any(c in k for k in keys for c in "\\\n\r"):
            return _key_columns(keys, "")
    except (UnicodeDecodeError, AgreementInputError):
        pass
    return None


def read_annotations(ratings_path, extra_paths: Sequence = (), *,
                     rescale_patterns: Sequence[str] = UNIT_INTERVAL_PATTERNS) -> Annotations:
    """hq.csv (with its `human` column) plus extra model annotators -> an `Annotations` table.

    Annotators matching `rescale_patterns` (fnmatch, whole name) are multiplied by 7. An
    annotator's rows must all come from one file; (image, annotator) must be unique.
    """
    files = [(pathlib.Path(ratings_path), None)] + [(pathlib.Path(p), False) for p in extra_paths]
    parts = [read_rows(path, default) for path, default in files]
    source = _one_file_per_annotator(parts)
    annotator_ids, order = _codes([a for p in parts for a in p.annotators])
    image_ids, images = _codes([i for p in parts for i in p.images])
    flag = _one_flag_per_annotator(parts, annotator_ids, order)
    # Humans first (by name), then the others in the order of the files: the order of every table.
    names = sorted(n for n, f in zip(order, flag) if f) + [n for n, f in zip(order, flag) if not f]
    name_index = {n: i for i, n in enumerate(names)}
    a = np.array([name_index[n] for n in order], dtype=np.int64)[annotator_ids]
    _no_duplicates(parts, annotator_ids * len(images) + image_ids, order, images)
    ratings = np.full((len(names), len(images), E), np.nan)
    ratings[a, image_ids] = np.concatenate([p.values for p in parts])
    rescaled = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in rescale_patterns)]
    for name in rescaled:
        ratings[name_index[name]] *= MAX_RATING
    human = np.array([flag[order.index(name)] for name in names], dtype=bool)
    has_row = np.zeros(ratings.shape[:2], dtype=bool)
    has_row[a, image_ids] = True
    report = _input_report(ratings, names, human, has_row, rescaled, files)
    return Annotations(ratings, names, human, images, source, report)


def _codes(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """(each value's index among the distinct values, the distinct values in order of appearance)."""
    distinct = list(dict.fromkeys(values))
    code = {v: i for i, v in enumerate(distinct)}
    return np.fromiter(map(code.__getitem__, values), dtype=np.int64, count=len(values)), distinct


def _locate(parts: Sequence[Rows], row: int) -> str:
    """'file:line' of a row numbered across all files."""
    for p in parts:
        if row < len(p.annotators):
            return p.where(row)
        row -= len(p.annotators)
    raise IndexError(row)


def _one_file_per_annotator(parts: Sequence[Rows]) -> dict[str, str]:
    source = {}
    for p in parts:
        mine = dict.fromkeys(p.annotators)
        clash = [i for i, a in enumerate(p.annotators) if a in source] if source.keys() & mine.keys() else []
        if clash:
            name = p.annotators[clash[0]]
            raise AgreementInputError(f"{p.where(clash[0])}: annotator {name!r} also has rows in "
                                      f"{source[name]}; each annotator must come from one file")
        source.update(dict.fromkeys(mine, str(p.path)))
    return source


def _one_flag_per_annotator(parts: Sequence[Rows], ids: np.ndarray, order: list[str]) -> np.ndarray:
    """The human flag of each annotator of `order` (ids: each row's); all its rows must agree."""
    human = np.concatenate([p.human for p in parts])
    first = np.full(len(order), len(ids))
    np.minimum.at(first, ids, np.arange(len(ids)))                  # each annotator's first row
    wrong = np.flatnonzero(human != human[first][ids])
    if wrong.size:
        i, f = wrong[0], first[ids[wrong[0]]]
        raise AgreementInputError(f"{_locate(parts, i)}: {order[ids[i]]!r} is human={bool(human[i])} here but "
                                  f"human={bool(human[f])} at {_locate(parts, f)}")
    return human[first]


def _no_duplicates(parts: Sequence[Rows], pair: np.ndarray, annotators: list[str], images: list[str]) -> None:
    """Each (annotator, image) pair code once; else the error names the first repeat and its original."""
    order = np.argsort(pair, kind="stable")
    repeat = np.flatnonzero(pair[order][1:] == pair[order][:-1]) + 1
    if repeat.size:
        again = order[repeat].min()                   # the first row (in file order) that repeats one
        first = np.flatnonzero(pair == pair[again])[0]
        annotator, image = divmod(int(pair[again]), len(images))
        raise AgreementInputError(f"duplicate rating of image {images[image]!r} by {annotators[annotator]!r}: "
                                  f"{_locate(parts, first)} and {_locate(parts, again)}")


def _input_report(ratings, names, human, has_row, rescaled, files) -> dict:
    """What was read, and every value the readout will change or ignore, per annotator."""
    per = {}
    counts = has_row.sum(axis=1)
    for i, name in enumerate(names):
        r = ratings[i][has_row[i]]                                         # the images it has rows for
        v = r[~np.isnan(r)]
        per[name] = {"rows": int(counts[i]), "missing_ratings": int(np.isnan(r).sum()),
                     "outside_0_7": int(((v < 0) | (v > MAX_RATING)).sum()),
                     "fractional": int((v != np.trunc(v)).sum())}
    unit_like = [n for i, n in enumerate(names) if not human[i] and n not in rescaled
                 and (~np.isnan(ratings[i])).any() and np.nanmax(ratings[i]) <= 1.0]
    return {"files": [str(p) for p, _ in files], "rows": int(counts.sum()), "images": ratings.shape[1],
            "annotators": len(names), "humans": int(human.sum()), "rescaled_x7": rescaled,
            "not_rescaled_but_max_le_1": unit_like, "per_annotator": per}


def read_demographics(path, images: Sequence[str], columns: Sequence[str] | None = None) -> tuple[dict, dict]:
    """({attribute: value per image (None = unknown)}, report) from a CSV with an `image` column."""
    path = pathlib.Path(path)
    index = {img: i for i, img in enumerate(images)}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "image" not in fields:
            raise AgreementInputError(f"{path}:1: no 'image' column; found {fields}")
        wanted = list(columns) if columns else [c for c in fields if c != "image"]
        absent = [c for c in wanted if c not in fields]
        if absent or not wanted:
            raise AgreementInputError(f"{path}:1: attribute column(s) {absent or '(none)'} not found; found {fields}")
        values = {c: [None] * len(images) for c in wanted}
        first, unknown = {}, 0
        for record in reader:
            where = f"{path}:{reader.line_num}"
            record = {(k or "").strip(): v for k, v in record.items()}
            image = (record.get("image") or "").strip()
            if image in first:
                raise AgreementInputError(f"duplicate image {image!r} in demographics: {first[image]} and {where}")
            first[image] = where
            if image not in index:
                unknown += 1
                continue
            for c in wanted:
                text = (record.get(c) or "").strip()
                values[c][index[image]] = text or None
    matched = len(set(first) & set(index))
    if not matched:
        raise AgreementInputError(f"{path}: no image matches the ratings' images (e.g. {next(iter(first), None)!r} "
                                  f"vs {images[0]!r})")
    return values, {"file": str(path), "attributes": wanted, "matched_images": matched,
                    "images_without_demographics": len(images) - matched, "unknown_images": unknown}


# ---------------------------------------------------------------------------
# A synthetic hq.csv of the published shape (tests, the benchmark, trying the CLI).

# (name, kind, noise): 14 model annotators named so that the default groups and the Hume rescale
# apply as they would to the published baselines. 'unit' answers on 0-1, 'random' uniformly.
SYNTHETIC_MODELS = (
    ("Empathic Insight Face Large", "model", 0.5), ("Empathic Insight Face Small", "model", 0.8),
    ("Hume Face*", "unit", 1.2),
    *((f"VLM-{c} {shots}", "vlm", noise + (0.4 if shots == "ZS" else 0.0))
      for c, noise in zip("ABCDE", (0.9, 1.0, 1.1, 1.3, 1.6)) for shots in ("MS", "ZS")),
    ("Random Baseline", "random", 0.0),
)


SYNTHETIC_DEMOGRAPHICS = {
    "ethnicity": ("African", "East Asian", "South Asian", "Caucasian", "Hispanic", "Middle Eastern"),
    "gender": ("female", "male"), "age": ("young adult", "adult", "middle-aged", "elderly")}


def synthetic_hq(num_images: int = 2500, seed: int = 0, models=SYNTHETIC_MODELS, experts: int = 8,
                 per_image: int = 4) -> tuple[list[dict], dict]:
    """(rows of hq.csv as dicts, {image: demographics}), deterministic per seed.

    Each image has hidden intensities like the synthetic EmoNet-Face's (1-3 dominant emotions at
    2.5-7, a few faint ones). `per_image` of the `experts` rate it: intensity + personal bias +
    noise, rounded to 0..7, an emotion they don't see left at 0, plus the 4 extra dimensions.
    Models add their own noise and per-emotion bias and answer with full-precision floats (VLMs
    and the random baseline: whole numbers; 'unit': on 0-1). Self-contained on purpose: a
    benchmark input must not move when the face simulator in `data/synthetic.py` changes.
    """
    rng = np.random.default_rng(seed)
    expert_bias, expert_noise = rng.uniform(-0.4, 0.4, experts), rng.uniform(0.4, 0.9, experts)
    model_bias = rng.uniform(-0.3, 0.3, len(models))[:, None] + rng.uniform(-0.5, 0.5, (len(models), E))
    rows, demographics = [], {}
    for i in range(num_images):
        image = f"{i:05d}"
        latent = np.zeros(E)
        dominant = rng.choice(E, size=rng.integers(1, 4), replace=False)
        latent[dominant] = rng.uniform(2.5, MAX_RATING, size=dominant.size)
        faint = (rng.random(E) < 0.08) & (latent == 0)
        latent[faint] = rng.uniform(0.5, 2.0, size=faint.sum())
        demographics[image] = {k: str(rng.choice(v)) for k, v in SYNTHETIC_DEMOGRAPHICS.items()}
        for r in sorted(rng.choice(experts, size=per_image, replace=False)):
            noisy = latent + expert_bias[r] + rng.normal(0, expert_noise[r], size=E)
            noisy = np.where(latent + rng.normal(0, 0.5, size=E) < 0.6, np.minimum(noisy, 0.4), noisy)
            scores = {taxonomy.key_of(e): int(v) for e, v in enumerate(np.clip(np.round(noisy), 0, MAX_RATING))}
            scores.update({taxonomy.extra_key_of(d.index): int(rng.integers(d.low, d.high + 1))
                           for d in taxonomy.EXTRA_DIMENSIONS})
            rows.append({"image": image, "annotator": f"expert-{r + 1}", "human": True, "annotations": scores})
        for m, (name, kind, noise) in enumerate(models):
            score = np.clip(latent + model_bias[m] + rng.normal(0, noise, size=E), 0, MAX_RATING)
            if kind == "vlm":
                score = np.round(score)
            elif kind == "unit":
                score = score / MAX_RATING
            elif kind == "random":
                score = rng.integers(0, NUM_LEVELS, size=E).astype(np.float64)
            values = [int(v) for v in score] if kind in ("vlm", "random") else [float(v) for v in score]
            rows.append({"image": image, "annotator": name, "human": False,
                         "annotations": {taxonomy.key_of(e): v for e, v in enumerate(values)}})
    return rows, demographics


def write_hq_csv(rows: Sequence[dict], path) -> pathlib.Path:
    """rows -> a CSV in the published layout (annotations as a Python-literal dict)."""
    path = pathlib.Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "annotator", "human", "annotations"])
        for row in rows:
            writer.writerow([row["image"], row["annotator"], row["human"], repr(row["annotations"])])
    return path


def write_demographics_csv(demographics: Mapping[str, Mapping[str, str]], path) -> pathlib.Path:
    path = pathlib.Path(path)
    columns = list(next(iter(demographics.values())))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *columns])
        writer.writerows([image, *(d[c] for c in columns)] for image, d in demographics.items())
    return path


# ---------------------------------------------------------------------------
# Command line.

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emonet_jax.evaluate.agreement",
                                description="EmoNet-Face HQ expert agreement (the paper's protocol).")
    p.add_argument("--ratings", required=True, help="hq.csv: image, annotator, human, annotations")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--extra", action="append", default=[],
                   help="extra (model) annotators: CSV in the hq.csv layout (human optional, default "
                        "False) or .jsonl with the same keys; repeatable; they join the 'Our Models' group")
    p.add_argument("--rescale_unit_interval", default=",".join(UNIT_INTERVAL_PATTERNS),
                   help="comma-separated fnmatch patterns of annotators on a 0-1 scale, multiplied by 7 "
                        "(default %(default)r, the published convention; '' for none)")
    p.add_argument("--demographics", help="CSV with an 'image' column and attribute columns")
    p.add_argument("--demographic_columns", default="", help="comma-separated attribute columns (default: all)")
    p.add_argument("--min_group_images", type=int, default=MIN_GROUP_IMAGES,
                   help="demographics: attribute values with fewer images are skipped (and listed)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP)
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True, help="write the PNG figures")
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class _FigureWorker:
    """Draws the figures in a second process, so that they cost little wall time on 2+ cores.

    The worker imports matplotlib (~0.5-1 s) while this process reads the ratings, and draws the
    figures as soon as κ and α are known, while this process computes the rest. On Linux it is
    forked at start-up, before any BLAS call or thread of ours (a spawned one would re-import
    numpy and this module first: ~1 s more CPU); elsewhere spawned.
    """

    def __init__(self, out_dir: pathlib.Path):
        import concurrent.futures
        import multiprocessing

        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self.out_dir = out_dir
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method))
        self.jobs = [self.pool.submit(_import_matplotlib)]

    def draw(self, result: dict) -> None:
        self.jobs += [self.pool.submit(draw_figure, name, result, self.out_dir) for name in FIGURES]

    def paths(self) -> list[pathlib.Path]:
        return [job.result() for job in self.jobs[1:]]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _import_matplotlib() -> None:
    import matplotlib.figure  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = pathlib.Path(args.out)
    worker = _FigureWorker(out) if args.figures else None
    try:
        try:
            table = read_annotations(args.ratings, args.extra, rescale_patterns=_split(args.rescale_unit_interval))
            demographics, demo_report = None, None
            if args.demographics:
                demographics, demo_report = read_demographics(args.demographics, table.images,
                                                              _split(args.demographic_columns) or None)
        except (AgreementInputError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        extras = [n for n in table.names if table.source[n] != str(pathlib.Path(args.ratings))]
        groups = ((OURS, tuple(fnmatch_escape(n) for n in extras)),) + GROUPS
        result = _evaluate(table.ratings, table.names, table.human, full=True, seed=args.seed, groups=groups,
                           demographics=demographics, bootstrap=args.bootstrap,
                           min_group_images=args.min_group_images,
                           on_figure_data=worker.draw if worker else None)
        result["input"] = json_ready(table.report)
        if demo_report:
            result["demographics"]["input"] = demo_report
        paths = write_outputs(result, out, figures=False)
        if worker:
            paths += worker.paths()
    finally:
        if worker:
            worker.close()
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def fnmatch_escape(name: str) -> str:
    """A pattern matching exactly `name` ('[', '*', '?' bracketed)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


if __name__ == "__main__":
    sys.exit(main())



