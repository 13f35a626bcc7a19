"""HQ agreement: every figure against scikit-learn / scipy / krippendorff, input errors, the CLI.

The references are written the slow, obvious way (a library call per rater pair and emotion) and
share no code with `emonet_jax.evaluate`.
"""

import ast
import csv
import json
import re
import subprocess
import sys
import warnings

import krippendorff
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import cohen_kappa_score

from emonet_jax import taxonomy
from emonet_jax.evaluate import agreement, kappa

E = taxonomy.NUM_EMOTIONS
TOL = 1e-9


def ref_kappa(a, b):
    """scikit-learn's κ on the images both rated, the paper's readout (int(), clipped 0..7)."""
    both = ~np.isnan(a) & ~np.isnan(b)
    if not both.any():
        return np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # undefined κ: sklearn warns, gives nan
        return cohen_kappa_score(np.clip(a[both].astype(int), 0, 7), np.clip(b[both].astype(int), 0, 7),
                                 weights="quadratic", labels=list(range(8)))


def assert_close(actual, expected):
    actual = np.array([np.nan if v is None else v for v in np.ravel(actual)], dtype=float)
    expected = np.asarray(expected, dtype=float).ravel()
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL, equal_nan=True)


def small_table(seed=0, images=30):
    """4 human raters (3 per image, whole ratings) and 2 models (fractional, some outside 0..7)."""
    rng = np.random.default_rng(seed)
    latent = rng.uniform(0, 7, size=(images, E)) * (rng.random((images, E)) < 0.5)
    humans = np.clip(np.round(latent + rng.normal(0, 1.0, size=(4, images, E))), 0, 7)
    for n in range(images):
        humans[rng.integers(4), n] = np.nan                       # 3 of the 4 humans per image
    models = latent + rng.normal(0, [[[1.0]], [[2.0]]], size=(2, images, E)) + 0.3
    ratings = np.concatenate([humans, models])
    ratings[rng.random(ratings.shape) < 0.08] = np.nan            # missing keys
    names = ["h1", "h2", "h3", "h4", "Empathic Insight Test", "Some VLM ZS"]
    return ratings, names, np.array([True] * 4 + [False] * 2)


@pytest.fixture(scope="module")
def table():
    ratings, names, human = small_table()
    result = agreement.hq_agreement(ratings, names, human, bootstrap=200)
    r = len(names)
    pair = np.full((r, r, E), np.nan)
    for i in range(r):
        for j in range(i + 1, r):
            if human[i] or human[j]:
                for e in range(E):
                    pair[i, j, e] = pair[j, i, e] = ref_kappa(ratings[i, :, e], ratings[j, :, e])
    return ratings, names, human, result, pair


# ---------------------------------------------------------------------------
# κ

def test_pairwise_kappa_matches_sklearn_with_missing_fractional_and_out_of_range():
    rng = np.random.default_rng(1)
    ratings = rng.uniform(-1.5, 8.5, size=(5, 40, 6))          # truncation and clipping both matter
    ratings[rng.random(ratings.shape) < 0.4] = np.nan
    ratings[0, :, 0], ratings[1, :, 0] = 3.0, 3.7               # both constant at level 3: nan
    ratings[2, :20, 1], ratings[3, 20:, 1] = np.nan, np.nan     # no common image: nan
    ratings[4, :, 2] = np.where(np.isnan(ratings[4, :, 2]), np.nan, 0.0)   # constant vs varying: 0
    got = kappa.pairwise_quadratic_kappa(ratings)
    want = np.array([[[ref_kappa(ratings[i, :, e], ratings[j, :, e]) for e in range(6)] for j in range(5)]
                     for i in range(5)])
    assert np.isnan(got[0, 1, 0]) and np.isnan(got[2, 3, 1])
    assert_close(got, want)
    assert_close(kappa.cross_quadratic_kappa(ratings[:2], ratings[1:]), want[:2, 1:])


def test_readout_truncates_toward_zero_and_clips():
    np.testing.assert_array_equal(kappa.readout(np.array([3.9, 0.2, -0.5, -1.5, 7.5, 9.0, np.nan])),
                                  [3, 0, 0, 0, 7, 7, np.nan])
    a = np.array([[3.9, 0.2, 7.5, -0.5, 5.99]]).T[None].repeat(2, 0)    # [2, 5, 1]
    a[1, :, 0] = [3, 0, 7, 0, 5]
    assert kappa.pairwise_quadratic_kappa(a)[0, 1, 0] == pytest.approx(1.0)
    a[0, 0, 0] = 4.0                                                     # what rounding 3.9 would give
    assert kappa.pairwise_quadratic_kappa(a)[0, 1, 0] < 1.0
    with pytest.raises(ValueError, match="inf"):
        kappa.pairwise_quadratic_kappa(np.full((2, 3, 1), np.inf))


def test_annotator_kappas_average_the_other_humans(table):
    ratings, names, human, result, pair = table
    got = kappa.annotator_kappas(kappa.pairwise_quadratic_kappa(ratings), human)
    for r in range(len(names)):
        others = [h for h in range(4) if h != r]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            want = np.nanmean(pair[r, others], axis=0)
        assert_close(got[r], want)
        assert_close([result["annotators"][names[r]]["per_emotion_kappa"][n] for n in taxonomy.NAMES], want)


def test_summary_mean_std_median_over_emotions(table):
    ratings, names, human, result, pair = table
    for name in names:
        a = result["annotators"][name]
        v = np.array([x for x in a["per_emotion_kappa"].values() if x is not None])
        assert a["n_emotions"] == v.size
        assert_close([a["mean_kappa"], a["std_kappa"], a["median_kappa"]], [v.mean(), np.std(v, ddof=1), np.median(v)])


def test_kappa_only_mode_has_only_the_kappa_part(table):
    ratings, names, human, result, _ = table
    fast = agreement.hq_agreement(ratings, names, human, full=False)
    assert set(fast) == {"protocol", "emotions", "num_images", "annotators"}
    for name in names:
        assert fast["annotators"][name]["mean_kappa"] == result["annotators"][name]["mean_kappa"]
        assert "spearman_vs_median" not in fast["annotators"][name]
    json.dumps(fast, allow_nan=False)


# ---------------------------------------------------------------------------
# Spearman, Mann-Whitney, Krippendorff, bootstrap

def test_spearman_vs_median_matches_scipy(table):
    ratings, names, human, result, _ = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(ratings[human], axis=0)
    for r in np.flatnonzero(~human):
        rho = []
        for e in range(E):
            ok = ~np.isnan(ratings[r, :, e]) & ~np.isnan(median[:, e])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                   # constant input: nan
                rho.append(stats.spearmanr(ratings[r, ok, e], median[ok, e]).statistic if ok.sum() >= 2 else np.nan)
        a = result["annotators"][names[r]]
        assert_close([a["per_emotion_spearman"][n] for n in taxonomy.NAMES], rho)
        assert_close(a["spearman_vs_median"], np.nanmean(rho))
    assert "spearman_vs_median" not in result["annotators"]["h1"]


def test_nan_median_matches_numpy():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(5, 7, 3)), 1)                 # ties
    x[rng.random(x.shape) < 0.4] = np.nan
    x[:, 0, 0] = np.nan                                          # nothing to take the median of
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)          # numpy: all-NaN slice
        for axis in range(3):
            np.testing.assert_array_equal(agreement.nan_median(x, axis), np.nanmedian(x, axis=axis))
    v = rng.normal(size=8)
    assert agreement.nan_median(v) == np.median(v) and agreement.nan_median(v[:7]) == np.median(v[:7])


def test_spearman_ties_and_constants():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 4, size=(6, 25)).astype(float)
    b = rng.normal(size=(6, 25))
    a[0, 3:9], b[1, ::3] = np.nan, np.nan
    a[2] = 1.0                                                     # constant: nan
    got = agreement.spearman(a, b)
    assert_close(agreement.spearman(a[3:], b[5]), [agreement.spearman(a[k], b[5]) for k in (3, 4, 5)])
    for k in range(6):
        ok = ~np.isnan(a[k]) & ~np.isnan(b[k])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_close(got[k], stats.spearmanr(a[k, ok], b[k, ok]).statistic)
    assert np.isnan(got[2])


@pytest.mark.parametrize("n1,n2,levels", [(5, 7, None), (8, 30, None), (4, 6, 3), (12, 40, None), (60, 300, 9)])
def test_mann_whitney_matches_scipy(n1, n2, levels):
    rng = np.random.default_rng(n1 * 100 + n2)
    draw = (lambda n: rng.integers(0, levels, n).astype(float)) if levels else (lambda n: rng.normal(size=n))
    x, y = draw(n1) + 0.3, draw(n2)
    u, p = agreement.mann_whitney_u(x, y)
    want = stats.mannwhitneyu(x, y, alternative="two-sided")
    assert_close([u, p], [want.statistic, want.pvalue])


def test_krippendorff_alpha_matches_package():
    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 7, size=(50, 5))
    values = np.clip(np.round(truth + rng.normal(0, 1.2, size=(6, 50, 5))), 0, 7)
    values[rng.random(values.shape) < 0.35] = np.nan
    values[:, :, 4] += rng.uniform(0, 0.5, size=(6, 50))           # non-integer values too
    got = agreement.krippendorff_alpha(values)
    want = [krippendorff.alpha(reliability_data=values[:, :, e], level_of_measurement="interval") for e in range(5)]
    assert_close(got, want)
    constant = np.ones((3, 10, 1))
    assert np.isnan(agreement.krippendorff_alpha(constant)[0])    # the package raises here


def test_alpha_bootstrap_sums_are_alpha_of_the_resampled_units():
    rng = np.random.default_rng(4)
    values = np.clip(np.round(rng.uniform(0, 7, size=(1, 40, 2)) + rng.normal(0, 1, size=(4, 40, 2))), 0, 7)
    values[rng.random(values.shape) < 0.3] = np.nan
    stats_ = agreement._alpha_unit_stats(values)
    for _ in range(3):
        idx = rng.integers(0, 40, size=40)
        counts = np.bincount(idx, minlength=40).astype(float)
        got = agreement._alpha_from_sums(np.tensordot(counts, stats_, axes=(0, 0)))
        want = [krippendorff.alpha(reliability_data=values[:, idx, e], level_of_measurement="interval")
                for e in range(2)]
        assert_close(got, want)
    ci = agreement.krippendorff_alpha_ci(values, np.random.default_rng(0), 300)
    alpha = agreement.krippendorff_alpha(values)
    assert ci.shape == (2, 2) and np.all(ci[:, 0] <= alpha) and np.all(alpha <= ci[:, 1])


def test_krippendorff_alpha_in_result(table):
    ratings, names, human, result, _ = table
    want = [krippendorff.alpha(reliability_data=ratings[human][:, :, e], level_of_measurement="interval")
            for e in range(E)]
    assert_close([result["krippendorff_alpha"][n] for n in taxonomy.NAMES], want)
    lo, hi = np.array([result["krippendorff_alpha_ci95"][n] for n in taxonomy.NAMES]).T
    assert np.all(lo <= np.array(want)) and np.all(np.array(want) <= hi)


def test_could_be_annotator_matches_scipy_on_sklearn_kappas(table):
    ratings, names, human, result, pair = table
    for r, name in enumerate(names):
        others = [h for h in range(4) if h != r]
        mine = [pair[r, h, e] for h in others for e in range(E)]
        theirs = [pair[a, b, e] for a in others for b in others if a < b for e in range(E)]
        mine = np.array([k for k in mine if not np.isnan(k)])
        theirs = np.array([k for k in theirs if not np.isnan(k)])
        want = stats.mannwhitneyu(mine, theirs, alternative="two-sided")
        c = result["could_be_annotator"][name]
        assert (c["n_rater_kappas"], c["n_human_kappas"]) == (mine.size, theirs.size)
        assert_close([c["u_statistic"], c["p_value"], c["mean_diff"]],
                     [want.statistic, want.pvalue, mine.mean() - theirs.mean()])
        assert c["verdict"] == ("yes" if want.pvalue > 0.05 else "no")
        assert c["ci95"][0] <= c["mean_diff"] <= c["ci95"][1]


def test_bootstrap_ci_is_seeded_and_matches_a_loop():
    x, y = np.arange(10.0), np.arange(5.0) * 2
    got = agreement.bootstrap_mean_difference(x, y, np.random.default_rng(42), 50)
    rng = np.random.default_rng(42)
    ix, iy = rng.integers(0, 10, size=(50, 10)), rng.integers(0, 5, size=(50, 5))
    diffs = [x[ix[b]].mean() - y[iy[b]].mean() for b in range(50)]
    assert_close(got, np.percentile(diffs, [2.5, 97.5]))
    cache = {}                                           # reused draws give the same CIs
    assert agreement.bootstrap_mean_difference(x, y, 42, 50, cache) == got
    assert agreement.bootstrap_mean_difference(x * 2, y, 42, 50, cache) == \
        agreement.bootstrap_mean_difference(x * 2, y, np.random.default_rng(42), 50)
    assert agreement.bootstrap_mean_difference(x, y + 1, 42, 50, cache) == \
        agreement.bootstrap_mean_difference(x, y + 1, np.random.default_rng(42), 50)


def test_group_comparisons_match_scipy(table):
    ratings, names, human, result, _ = table
    groups = result["groups"]
    assert groups["members"] == {agreement.HUMANS: ["h1", "h2", "h3", "h4"],
                                 agreement.OURS: ["Empathic Insight Test"],
                                 "VLMs with Zero-Shot Prompt": ["Some VLM ZS"]}
    per_emotion = {n: [v for v in a["per_emotion_kappa"].values() if v is not None]
                   for n, a in result["annotators"].items()}
    pooled = {g: np.array([v for n in m for v in per_emotion[n]]) for g, m in groups["members"].items()}
    assert len(groups["comparisons"]) == 3
    for c in groups["comparisons"]:
        a, b = pooled[c["group1"]], pooled[c["group2"]]
        want = stats.mannwhitneyu(a, b, alternative="two-sided")
        assert_close([c["p_value"], c["mean_diff"]], [want.pvalue, a.mean() - b.mean()])


# ---------------------------------------------------------------------------
# Beyond the paper: calibrated readout, demographics

def test_calibrated_kappa_matches_a_loop(table):
    ratings, names, human, result, _ = table
    experts = np.clip(ratings[human].astype(float), 0, 7)
    for r in np.flatnonzero(~human):
        want = []
        for e in range(E):
            pooled = experts[:, :, e][~np.isnan(experts[:, :, e])].astype(int)
            cdf = np.cumsum(np.bincount(pooled, minlength=8)) / pooled.size
            ok = ~np.isnan(ratings[r, :, e])
            mapped = np.full(ratings.shape[1], np.nan)
            mapped[ok] = np.searchsorted(cdf, (stats.rankdata(ratings[r, ok, e]) - 0.5) / ok.sum(), side="left")
            ks = [ref_kappa(mapped, ratings[h, :, e]) for h in range(4)]
            want.append(np.nan if np.all(np.isnan(ks)) else np.nanmean(ks))
        a = result["annotators"][names[r]]
        assert_close([a["calibrated_per_emotion_kappa"][n] for n in taxonomy.NAMES], want)


def test_calibration_ignores_the_model_scale():
    ratings, names, human = small_table(seed=5)
    squeezed = ratings.copy()
    squeezed[~human] = squeezed[~human] / 7 * 0.01 + 2.0          # monotone: same order
    a = agreement.hq_agreement(ratings, names, human, bootstrap=20)["annotators"]
    b = agreement.hq_agreement(squeezed, names, human, bootstrap=20)["annotators"]
    for name in np.array(names)[~human]:
        assert a[name]["calibrated_mean_kappa"] == b[name]["calibrated_mean_kappa"]
        assert a[name]["mean_kappa"] != b[name]["mean_kappa"]     # the paper's readout does see it


def test_demographics_jackknife_matches_leave_one_out_loop():
    ratings, names, human = small_table(seed=6, images=24)
    attribute = ["a" if n % 3 else "b" for n in range(24)]      # a: 16 images, b: 8 - 1 unknown
    attribute[0] = None
    result = agreement.hq_agreement(ratings, names, human, demographics={"kind": attribute},
                                    min_group_images=7, bootstrap=20)
    section = result["demographics"]["attributes"]["kind"]
    assert section["unknown_images"] == 1 and set(section["values"]) == {"a", "b"}

    def means(images):
        sub = agreement.hq_agreement(ratings[:, images], names, human, full=False)["annotators"]
        return np.array([np.nan if sub[n]["mean_kappa"] is None else sub[n]["mean_kappa"] for n in names])

    def jackknife(images):              # (θ, bias-corrected θ, SE) by recomputing without each image
        theta = means(images)
        loo = np.array([means([i for i in images if i != j]) for j in images])
        n = len(images)
        se = np.sqrt((n - 1) / n * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
        return theta, n * theta - (n - 1) * loo.mean(axis=0), se

    overall = jackknife(list(range(24)))[1]
    flags = []
    for value, group in section["values"].items():
        idx = [n for n in range(24) if attribute[n] == value]
        assert group["n_images"] == len(idx)
        theta, corrected, se = jackknife(idx)
        for r, name in enumerate(names):
            g = group["annotators"][name]
            lo, hi = corrected[r] - 1.96 * se[r], corrected[r] + 1.96 * se[r]
            assert_close([g["mean_kappa"], g["mean_kappa_bias_corrected"], *g["ci95"], g["gap_vs_all"]],
                         [theta[r], corrected[r], lo, hi, corrected[r] - overall[r]])
            assert g["flagged"] == (not lo <= overall[r] <= hi)
            flags.append(g["flagged"])
    assert any(flags) and not all(flags)
    skipped = agreement.hq_agreement(ratings, names, human, demographics={"kind": attribute}, min_group_images=10,
                                     bootstrap=20)["demographics"]["attributes"]["kind"]
    assert skipped["skipped"] == {"b": 7} and list(skipped["values"]) == ["a"]


# ---------------------------------------------------------------------------
# Degenerate input

def test_constant_rater_gives_nan_not_a_crash():
    ratings, names, human = small_table(seed=7, images=12)
    ratings[4] = 0.0                                   # a model that always says 0
    ratings[:4, :, 0] = np.where(np.isnan(ratings[:4, :, 0]), np.nan, 0.0)   # and humans agree, on emotion 0
    result = agreement.hq_agreement(ratings, names, human, bootstrap=20)
    model = result["annotators"][names[4]]
    first = taxonomy.NAMES[0]
    assert model["per_emotion_kappa"][first] is None                 # κ undefined: both constant at 0
    assert model["per_emotion_spearman"][first] is None
    assert model["spearman_vs_median"] is None                        # constant everywhere: no ρ at all
    assert result["krippendorff_alpha"][first] is None
    assert all(v in (0.0, None) for v in model["per_emotion_kappa"].values())
    json.dumps(result, allow_nan=False)


def test_rejects_bad_shapes_and_no_humans():
    ratings, names, human = small_table(images=5)
    with pytest.raises(ValueError, match="no human"):
        agreement.hq_agreement(ratings, names, np.zeros(6, bool))
    with pytest.raises(ValueError, match="unique"):
        agreement.hq_agreement(ratings, names[:5] + ["h1"], human)
    with pytest.raises(ValueError, match="40"):
        agreement.hq_agreement(ratings[:, :, :39], names, human)


# ---------------------------------------------------------------------------
# Reading hq.csv

HEADER = "image,annotator,human,annotations\n"
AMUSEMENT = taxonomy.key_of(taxonomy.NAMES.index("Amusement"))
ANGER = taxonomy.key_of(taxonomy.NAMES.index("Anger"))


def write(tmp_path, text, name="hq.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def row(image, annotator, human, annotations):
    return f'{image},{annotator},{human},"{annotations!r}"\n'


@pytest.mark.parametrize("body,line,needle", [
    (row(1, "a", True, {AMUSEMENT: 3}) + row(2, "a", True, {"Bogus Family|Anger": 1}), 3, "Bogus Family|Anger"),
    (row(1, "a", True, {AMUSEMENT: 3}) + row(2, "a", True, {"Negative Emotions|Boredom": 1}), 3, "Boredom"),
    (row(1, "a", True, {AMUSEMENT: 3}) + row(2, "a", "maybe", {AMUSEMENT: 1}), 3, "maybe"),
    (row(1, "a", True, {AMUSEMENT: "high"}), 2, AMUSEMENT),
    (row(1, "a", True, {AMUSEMENT: True}), 2, AMUSEMENT),
    (row(1, "a", True, {AMUSEMENT: float("inf")}).replace("inf", "1e999"), 2, AMUSEMENT),
    (row(1, "a", True, {AMUSEMENT: 1}) + f'2,a,True,"{{""{AMUSEMENT}"": NaN}}"\n', 3, AMUSEMENT),
    ('1,a,True,"{\'x\': 3"\n', 2, "not a dict literal"),
    ('1,a,True,"[1, 2]"\n', 2, "list"),
    ('1,a,True,"{1: 2}",extra\n', 2, "5 fields"),
])
def test_bad_rows_name_their_line(tmp_path, body, line, needle):
    path = write(tmp_path, HEADER + body)
    with pytest.raises(agreement.AgreementInputError) as e:
        agreement.read_annotations(path)
    assert f"{path}:{line}:" in str(e.value) and needle in str(e.value)


def test_duplicate_rating_names_both_lines(tmp_path):
    path = write(tmp_path, HEADER + row(1, "a", True, {AMUSEMENT: 3}) + row(2, "a", True, {AMUSEMENT: 3})
                 + row(1, "a", True, {AMUSEMENT: 4}))
    with pytest.raises(agreement.AgreementInputError, match=rf"'1' by 'a': {path}:2 and {path}:4"):
        agreement.read_annotations(path)


def test_missing_column_and_line_numbers_after_a_multiline_record(tmp_path):
    with pytest.raises(agreement.AgreementInputError, match=r":1: missing column\(s\) \['human'\]"):
        agreement.read_annotations(write(tmp_path, "image,annotator,annotations\n1,a,{}\n"))
    # A dict literal spread over lines is valid; the records after it keep their true line numbers.
    text = HEADER + f'1,a,True,"{{\'{AMUSEMENT}\':\n 3}}"\n' + row(2, "a", True, {"Nope|Anger": 1})
    with pytest.raises(agreement.AgreementInputError, match=r"hq.csv:4: unknown key 'Nope\|Anger'"):
        agreement.read_annotations(write(tmp_path, text))
    text = HEADER + row(1, "a", True, {AMUSEMENT: 1}) + '2,a,True,"{\'Nope|Anger\':\n 3}"\n'
    with pytest.raises(agreement.AgreementInputError, match=r"hq.csv:3: unknown key 'Nope\|Anger'"):
        agreement.read_annotations(write(tmp_path, text))


def test_missing_key_is_missing_and_extras_are_ignored(tmp_path):
    extra = taxonomy.extra_key_of(0)
    path = write(tmp_path, HEADER + row("x", "a", True, {AMUSEMENT: 3, extra: -2, ANGER: None})
                 + row("y", "a", True, {ANGER: 5}) + row("x", "m", False, {AMUSEMENT: 2.5})
                 + row("y", "m", False, {extra: 1}))
    t = agreement.read_annotations(path)
    assert t.names == ["a", "m"] and t.images == ["x", "y"] and t.human.tolist() == [True, False]
    amusement, anger = taxonomy.NAMES.index("Amusement"), taxonomy.NAMES.index("Anger")
    assert t.ratings[0, 0, amusement] == 3 and np.isnan(t.ratings[0, 0, anger]) and t.ratings[0, 1, anger] == 5
    assert np.isnan(t.ratings[1, 1]).all()                        # m rated no emotion of y
    assert t.report["per_annotator"]["a"]["missing_ratings"] == 80 - 2
    assert t.report["per_annotator"]["m"] == {"rows": 2, "missing_ratings": 80 - 1, "outside_0_7": 0, "fractional": 1}
    assert t.report["per_annotator"]["m"]["fractional"] == 1


def test_parse_annotations_equals_literal_eval():
    cases = [repr({AMUSEMENT: 3, ANGER: 2.5, "x": -1e-05}), repr({"it's": 1, AMUSEMENT: 0}),
             '{"a\\"b": 1}', "{'a': 1,}", "{ 'a' : 07e0 }", "{}", repr({AMUSEMENT: 1.0000000000000002})]
    for text in cases:
        assert agreement.parse_annotations(text, "here") == ast.literal_eval(text)
    assert agreement.parse_annotations(json.dumps({ANGER: 4, AMUSEMENT: None}), "here") == {ANGER: 4, AMUSEMENT: None}


def plain_split(text):
    """`_split_plain_csv` in the csv module's terms: (line, fields) per record, or None."""
    data = text.encode()
    split = agreement._split_plain_csv(data, 4)
    if split is None:
        return None
    fields, starts, ends = split
    last = [data[a:b].decode() for a, b in zip(starts, ends)]
    return [(i + 2, [*lead, d]) for i, (lead, d) in enumerate(zip(zip(*fields), last))]


def test_fast_csv_split_equals_the_csv_module(tmp_path):
    rows, _ = agreement.synthetic_hq(3, models=agreement.SYNTHETIC_MODELS[:3])
    crlf = agreement.write_hq_csv(rows, tmp_path / "hq.csv").read_bytes().decode()
    assert "\r\n" in crlf
    lf = crlf.replace("\r\n", "\n")
    header, body = lf.split("\n", 1)
    for text in (crlf, lf, lf.rstrip("\n"), lf.split("\n", 1)[0] + "\n", crlf + '9,x,True,"{}"\r\n',
                 lf + "9,x,True,{}\n" + body, lf + "9,x,True,{'a': 1}"):     # unquoted last fields
        assert plain_split(text) == agreement._split_csv(text), text[-80:]
    for text in (lf + '9,"quoted, lead",True,"{}"\n',         # a quoted leading field
                 lf + '9,x,True,"{""a"": 1}"\n',                # a doubled quote inside the last field
                 lf + "\n" + body,                              # a blank line
                 lf + '9,x,True,{"a": 1}\n',                    # a quote inside an unquoted field
                 lf + '9,x,True,"{}"x\n',                       # text after the closing quote
                 lf + '9,x"y,True,"{}"\n',                      # a quote inside a leading field
                 header + "\r\n" + body,                        # line endings change
                 lf.replace(",expert-", "\r,expert-", 1)):      # a stray carriage return
        assert plain_split(text) is None, text[-80:]
    # A last field over two lines: the split cannot see it (read_rows checks the fields the plain
    # dict reader did not take; test_missing_column_and_line_numbers_after_a_multiline_record).


def read_both_ways(tmp_path, texts):
    """(ratings or error message) of CSV rows with these annotation texts: read_rows (plain path
    first) and the per-row reader alone."""
    path = tmp_path / "hq.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "annotator", "human", "annotations"])
        writer.writerows([i, "a", True, t] for i, t in enumerate(texts))

    def outcome(read):
        try:
            return read()
        except agreement.AgreementInputError as e:
            return re.sub(r" at 0x[0-9a-f]+", "", str(e))          # literal_eval's messages name objects

    def per_row():
        values = np.full((len(texts), E), np.nan)
        agreement._read_dicts(texts, np.arange(len(texts)), lambda i: f"{path}:{i + 2}", values)
        return values

    return outcome(lambda: agreement.read_rows(path).values), outcome(per_row)


PLAIN = {AMUSEMENT: 3, "Extra Dimensions|Valence": -2, ANGER: 0.12345678901234568, "Anger": 1}


@pytest.mark.parametrize("text", [
    # Plain: the vectorised reader takes them.
    repr(PLAIN), repr({ANGER: 1e-05, AMUSEMENT: -0.0}), repr({AMUSEMENT: 2.9999999999999996}), "{}",
    repr({"amusement": 7, "anger": 10}), repr({AMUSEMENT: 1.5e300}), repr({AMUSEMENT: 0, ANGER: 00}),
    "{'" + AMUSEMENT + "': +3, '" + ANGER + "': 1E5}", "{'Awe': 07e0, 'anger': .5, 'Elation': 5.}",
    # Not plain: the per-row reader decides (a value, an error, or a missing rating).
    repr({AMUSEMENT: None}), repr({AMUSEMENT: True}), repr({AMUSEMENT: "high"}), repr({AMUSEMENT: float("nan")}),
    "{'" + AMUSEMENT + "': 07}", "{'" + AMUSEMENT + "': 1e999}", "{'" + AMUSEMENT + "': 1_0}",
    "{'" + AMUSEMENT + "': 0x10}", "{'" + AMUSEMENT + "':  3}", "{'" + AMUSEMENT + "': 3 }",
    "{'" + AMUSEMENT + "':3}", "{'" + AMUSEMENT + "': 3,}", "{ '" + AMUSEMENT + "': 3}",
    "{'" + AMUSEMENT + "': 3, '" + AMUSEMENT + "': 4}", repr({AMUSEMENT: 3, "amusement": 4}),
    repr({"it's": 1}), "{'a\\'b': 1}", repr({"Nope|Anger": 1}), repr({AMUSEMENT: {"x": 1}}),
    repr({AMUSEMENT: [1]}), "{'" + AMUSEMENT + "': 1-2}", "{'" + AMUSEMENT + "': -}", "{'" + AMUSEMENT + "': e5}",
    "{'" + AMUSEMENT + "': 1}, {'" + ANGER + "': 2}", "{'" + AMUSEMENT + "' 3}", "{'" + AMUSEMENT + "': 3",
    "[1, 2]", "", "{'a': 1.234567890123456789012345}", "{'" + AMUSEMENT + "': 3}x", "x{'" + AMUSEMENT + "': 3}",
    "{'" + AMUSEMENT + "': 3 4}", "{'" + AMUSEMENT + "': 12345678901234567890123}", "{'Awe': 0, 'Anger': -0.50}",
])
def test_plain_reader_decides_like_the_per_row_reader(tmp_path, text):
    # The text between plain rows, so that the vectorised reader sees all of them together.
    rng = np.random.default_rng(0)
    plain = [repr({taxonomy.key_of(e): float(v) for e, v in enumerate(rng.uniform(0, 7, E))}) for _ in range(3)]
    fast, slow = read_both_ways(tmp_path, plain[:2] + [text] + plain[2:])
    if isinstance(slow, str):
        assert fast == slow
    else:
        np.testing.assert_array_equal(fast, slow)


def test_plain_reader_takes_the_published_layouts_whole(tmp_path):
    rows, _ = agreement.synthetic_hq(20)
    rows[3]["annotations"] = dict(reversed(rows[3]["annotations"].items()))     # another key order
    rows[5]["annotations"] = {}                                                  # rated nothing
    rows[6]["annotations"] = {taxonomy.key_of(0): 2.5}                           # one key: written unquoted
    data = agreement.write_hq_csv(rows, tmp_path / "hq.csv").read_bytes()
    fields, starts, ends = agreement._split_plain_csv(data, 4)
    values, slow = agreement._plain_dict_values(data, starts, ends)
    assert not slow.any()
    texts = [data[a:b].decode() for a, b in zip(starts, ends)]
    expected = np.full_like(values, np.nan)
    agreement._read_dicts(texts, np.arange(len(texts)), str, expected)
    np.testing.assert_array_equal(values, expected)


def test_hume_rescale_default_and_option(tmp_path):
    rows, _ = agreement.synthetic_hq(6, models=agreement.SYNTHETIC_MODELS[:3])
    path = agreement.write_hq_csv(rows, tmp_path / "hq.csv")
    raw = np.array([list(r["annotations"].values()) for r in rows if r["annotator"] == "Hume Face*"])
    assert raw.max() <= 1.0
    scaled = agreement.read_annotations(path)
    hume = scaled.names.index("Hume Face*")
    np.testing.assert_array_equal(scaled.ratings[hume], raw * 7)
    assert scaled.report["rescaled_x7"] == ["Hume Face*"] and scaled.report["not_rescaled_but_max_le_1"] == []
    plain = agreement.read_annotations(path, rescale_patterns=())
    np.testing.assert_array_equal(plain.ratings[hume], raw)
    assert plain.report["not_rescaled_but_max_le_1"] == ["Hume Face*"]


# ---------------------------------------------------------------------------
# Tables and the command line

def test_tables_sorted_by_mean_kappa_and_escaped(table):
    _, names, _, result, _ = table
    md = agreement.markdown_table(result).splitlines()
    means = [result["annotators"][line.split(" | ")[0][2:]]["mean_kappa"] for line in md[2:]]
    assert means == sorted(means, reverse=True) and len(md) == 2 + len(names)
    assert "Could be annotator" in md[0]
    renamed = json.loads(json.dumps(result).replace("Some VLM ZS", "R&D_50% ZS"))
    tex = agreement.latex_table(renamed)
    assert r"R\&D\_50\% ZS" in tex and tex.startswith(r"\begin{tabular}")


def test_cli_end_to_end(tmp_path):
    models = [m for m in agreement.SYNTHETIC_MODELS if m[0] in ("Empathic Insight Face Large", "Hume Face*",
                                                                 "VLM-A ZS", "VLM-A MS", "Random Baseline")]
    rows, demographics = agreement.synthetic_hq(60, seed=1, models=models)
    hq = agreement.write_hq_csv(rows, tmp_path / "hq.csv")
    demo = agreement.write_demographics_csv(demographics, tmp_path / "demographics.csv")
    rng = np.random.default_rng(0)
    extra = tmp_path / "ours.jsonl"
    lines = []
    for r in rows:
        if r["annotator"] == "expert-1":
            noisy = {k: float(v) + rng.normal(0, 0.5) for k, v in r["annotations"].items() if not k.startswith("Extra")}
            lines.append(json.dumps({"image": r["image"], "annotator": "emonet_jax", "annotations": noisy}) + "\n")
    extra.write_text("".join(lines))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "emonet_jax.evaluate.agreement", f"--ratings={hq}", f"--out={out}",
                           f"--extra={extra}", f"--demographics={demo}", "--bootstrap=100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = {p.name: p for p in out.iterdir()}
    assert set(files) == {"agreement.json", "agreement.md", "agreement.tex", "per_emotion.csv",
                          *agreement.FIGURES}
    for name in agreement.FIGURES:
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_nan(token):
        raise AssertionError(f"invalid JSON constant {token}")

    result = json.loads(files["agreement.json"].read_text(), parse_constant=no_nan)
    assert result["input"]["rescaled_x7"] == ["Hume Face*"]
    ours = result["annotators"]["emonet_jax"]
    assert ours["group"] == agreement.OURS and not ours["human"] and ours["n_images"] > 0
    assert set(result["annotators"]) == {*(f"expert-{i}" for i in range(1, 9)), *(m[0] for m in models), "emonet_jax"}
    assert set(result["krippendorff_alpha"]) == set(taxonomy.NAMES)
    gender = result["demographics"]["attributes"]["gender"]
    assert set(gender["values"]) == {"female", "male"} and result["demographics"]["input"]["matched_images"] == 60
    assert result["demographics"]["attributes"]["ethnicity"]["skipped"]       # < 20 images per value
    assert "| emonet_jax | no |" in files["agreement.md"].read_text()
    assert len(files["per_emotion.csv"].read_text().splitlines()) == E + 1
    assert "| Annotator |" in proc.stdout


def test_cli_reports_input_errors(tmp_path):
    path = write(tmp_path, HEADER + row(1, "a", True, {"Nope|Anger": 1}))
    assert agreement.main([f"--ratings={path}", f"--out={tmp_path / 'out'}", "--no-figures"]) == 2
