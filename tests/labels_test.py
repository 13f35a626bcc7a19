"""Label semantics: soft labels, rating validation, binary votes (on the real binary.csv)."""

import collections
import pathlib

import numpy as np
import pytest

from emonet_jax import labels, taxonomy

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
E = taxonomy.NUM_EMOTIONS
ANGER = taxonomy.NAMES.index("Anger")
FEAR = taxonomy.NAMES.index("Fear")
HELPLESS = taxonomy.NAMES.index("Helplessness")
LEVELS = np.arange(labels.NUM_LEVELS)


def key(name: str) -> str:
    return taxonomy.key_of(taxonomy.NAMES.index(name))


# ---------------------------------------------------------------------------
# soft_label


def test_soft_label_integer_ratings():
    ratings = np.zeros((3, E))
    ratings[:, ANGER] = [2, 2, 5]
    ratings[:, FEAR] = [7, 7, 0]
    valid = np.ones((3, E), bool)
    dist = labels.soft_label(ratings, valid)
    assert dist.shape == (E, labels.NUM_LEVELS) and dist.dtype == np.float32
    np.testing.assert_allclose(dist[ANGER], [0, 0, 2 / 3, 0, 0, 1 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(dist[FEAR], [1 / 3, 0, 0, 0, 0, 0, 0, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(dist[0], np.eye(8)[0], atol=1e-6)  # all rated 0


def test_soft_label_fractional_ratings_split_between_levels():
    ratings = np.zeros((2, E))
    ratings[:, ANGER] = [2.25, 6.5]
    ratings[:, FEAR] = [6.9, 7.0]
    dist = labels.soft_label(ratings, np.ones((2, E), bool))
    np.testing.assert_allclose(dist[ANGER], [0, 0, 0.375, 0.125, 0, 0, 0.25, 0.25], atol=1e-6)
    np.testing.assert_allclose(dist[FEAR], [0, 0, 0, 0, 0, 0, 0.05, 0.95], atol=1e-6)


def test_soft_label_mean_equals_mean_rating_and_masked_raters_ignored():
    rng = np.random.default_rng(0)
    ratings = rng.uniform(0, 7, size=(4, E))
    ratings[:, :10] = np.round(ratings[:, :10])
    valid = rng.random((4, E)) < 0.7
    valid[:, 5] = False                      # an emotion nobody rated
    valid[0, 6], valid[1:, 6] = True, False  # an emotion one rater rated
    # Masked entries must not matter, even out of range.
    dist = labels.soft_label(np.where(valid, ratings, 99.0), valid)
    np.testing.assert_array_equal(dist, labels.soft_label(np.where(valid, ratings, 3.0), valid))
    rated = valid.any(axis=0)
    np.testing.assert_allclose(dist[rated].sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(dist[~rated], 0.0)
    mean_rating = (np.where(valid, ratings, 0).sum(0) / np.maximum(valid.sum(0), 1))[rated]
    np.testing.assert_allclose((dist[rated] * LEVELS).sum(axis=1), mean_rating, atol=1e-5)
    np.testing.assert_allclose(dist[6], labels.soft_label(ratings[:1], np.ones((1, E), bool))[6], atol=1e-6)
    # Dropping a masked rater entirely gives the same result.
    valid[3] = False
    np.testing.assert_allclose(labels.soft_label(ratings, valid), labels.soft_label(ratings[:3], valid[:3]), atol=1e-6)


def test_rating_labels_fields():
    per_rater = {
        "expert-1": {key("Anger"): 2, key("Fear"): 0, "Extra Dimensions|Valence": -2},
        "expert-4": {key("Anger"): 5, key("Fear"): 7, "Extra Dimensions|Valence": 1},
        "expert-6": {key("Anger"): 2},
    }
    out = labels.rating_labels(per_rater)
    assert out.raters == ("expert-1", "expert-4", "expert-6", "")
    np.testing.assert_array_equal(out.rater_mask, [True, True, True, False])
    assert out.ratings.shape == (labels.MAX_RATERS, E) and out.ratings.dtype == np.int32
    np.testing.assert_array_equal(out.ratings[:, ANGER], [2, 5, 2, -1])
    np.testing.assert_array_equal(out.ratings[:, FEAR], [0, 7, -1, -1])
    assert (out.ratings[:, 2] == -1).all()
    np.testing.assert_allclose(out.soft_label[ANGER], [0, 0, 2 / 3, 0, 0, 1 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out.soft_label[FEAR], [0.5, 0, 0, 0, 0, 0, 0, 0.5], atol=1e-6)
    expected_mask = np.zeros(E, bool)
    expected_mask[[ANGER, FEAR]] = True
    np.testing.assert_array_equal(out.soft_label_mask, expected_mask)
    np.testing.assert_array_equal(out.soft_label[~expected_mask], 0.0)
    np.testing.assert_allclose(out.mean_intensity[[ANGER, FEAR]], [3.0, 3.5], atol=1e-6)
    assert out.mean_intensity[~expected_mask].sum() == 0
    np.testing.assert_array_equal(out.extra_mask, [True, False, False, False])
    np.testing.assert_allclose(out.extra, [-0.5, 0, 0, 0], atol=1e-6)


def test_rating_labels_fractional_for_vlm():
    out = labels.rating_labels({"vlm": {key("Anger"): 3.5, key("Fear"): 6.25}}, integer=False)
    np.testing.assert_allclose(out.soft_label[ANGER], [0, 0, 0, 0.5, 0.5, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out.mean_intensity[[ANGER, FEAR]], [3.5, 6.25], atol=1e-6)
    np.testing.assert_allclose((out.soft_label[FEAR] * LEVELS).sum(), 6.25, atol=1e-6)


@pytest.mark.parametrize("value, integer, fragment", [
    (8, True, "8"),
    (-1, True, "-1"),
    (float("nan"), True, "nan"),
    ("abc", True, "'abc'"),
    (3.5, True, "not an integer"),
    (7.5, False, "outside 0..7"),
    (float("inf"), False, "inf"),
    (True, True, "True"),
])
def test_rating_labels_bad_value(value, integer, fragment):
    per_rater = {"expert-2": {key("Fear"): 1}, "expert-3": {key("Fear"): 1, key("Anger"): value}}
    with pytest.raises(labels.LabelError) as info:
        labels.rating_labels(per_rater, integer=integer)
    message = str(info.value)
    assert "'expert-3'" in message and key("Anger") in message and fragment in message, message


def test_rating_labels_accepts_numeric_strings():
    out = labels.rating_labels({"a": {key("Anger"): " 4 "}})
    assert out.ratings[0, ANGER] == 4


def test_rating_labels_too_many_raters():
    per_rater = {f"expert-{i}": {key("Anger"): 1} for i in range(1, 6)}
    with pytest.raises(labels.LabelError) as info:
        labels.rating_labels(per_rater)
    assert "5 raters" in str(info.value) and "expert-5" in str(info.value)


def test_rating_labels_duplicate_emotion_via_alias():
    family = taxonomy.EMOTIONS[HELPLESS].family
    per_rater = {"expert-7": {f"{family}|Helplessness": 3, f"{family}|Hopelessness": 2}}
    with pytest.raises(labels.LabelError) as info:
        labels.rating_labels(per_rater)
    message = str(info.value)
    assert "'expert-7'" in message and "Hopelessness" in message and "twice" in message, message


@pytest.mark.parametrize("name, value", [("Valence", 4), ("Valence", -3.5), ("Arousal", 8),
                                         ("Emotional Vulnerability", 6), ("Dominance", "high")])
def test_rating_labels_extra_dimension_out_of_range(name, value):
    per_rater = {"expert-1": {key("Anger"): 1, f"Extra Dimensions|{name}": value}}
    with pytest.raises(labels.LabelError) as info:
        labels.rating_labels(per_rater)
    assert "'expert-1'" in str(info.value) and f"Extra Dimensions|{name}" in str(info.value)


def test_rating_labels_extra_dimension_bounds_are_inclusive():
    out = labels.rating_labels({"a": {"Extra Dimensions|Valence": -3, "Extra Dimensions|Arousal": 7, "Awe": 2}})
    np.testing.assert_allclose(out.extra[:2], [-3, 7])


def test_rating_labels_without_any_emotion_rating_are_an_error():
    with pytest.raises(labels.LabelError, match="rated no emotion"):
        labels.rating_labels({"a": {"Extra Dimensions|Valence": -3}})
    with pytest.raises(labels.LabelError, match="rated no emotion"):
        labels.rating_labels({"a": {}, "b": {}})


def test_rating_labels_unknown_key_names_rater_and_key():
    with pytest.raises(labels.LabelError) as info:
        labels.rating_labels({"expert-8": {"Positive High-Energy Emotions|Schadenfreude": 3}})
    assert "'expert-8'" in str(info.value) and "Schadenfreude" in str(info.value)
    with pytest.raises(labels.LabelError, match="no rater"):
        labels.rating_labels({})


# ---------------------------------------------------------------------------
# Binary votes


@pytest.mark.parametrize("votes, yes, present", [
    (1, 0, False), (1, 1, True), (2, 1, False), (2, 2, True), (3, 2, True), (3, 3, True), (3, 1, False),
])
def test_presence_rule_strict_majority(votes, yes, present):
    out = labels.binary_labels([(ANGER, i < yes) for i in range(votes)])
    assert out.votes[ANGER] == votes and out.yes[ANGER] == yes
    assert bool(out.present[ANGER]) is present
    assert out.target[ANGER] == pytest.approx(yes / votes)
    assert out.mask[ANGER] and out.mask.sum() == 1 and out.present.sum() == int(present)
    assert "strict majority" in labels.PRESENCE_RULE


def test_empty_binary_labels():
    out = labels.empty_binary_labels()
    assert not out.mask.any() and not out.present.any() and out.target.sum() == 0


@pytest.fixture(scope="module")
def real_votes():
    path = REFERENCE / "binary_annotations.csv"
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (expected shared/reference beside the repo)")
    return labels.read_binary_votes(path), path


def test_real_binary_file_totals(real_votes):
    table, path = real_votes
    assert len(table.votes) == 19_999
    assert table.num_lines == 65_686
    assert sum(len(v) for v in table.votes.values()) == 65_686
    assert table.bad_lines == []
    assert all(len(i) == 5 and i.isdigit() for i in table.votes)
    raw = path.read_text()
    assert ",Hopelessness" in raw and ",Helplessness" not in raw


def test_real_binary_file_patterns_and_presence(real_votes):
    table, _ = real_votes
    patterns = collections.Counter()
    present = collections.Counter()
    judged_per_image = collections.Counter()
    helpless_votes = 0
    for image_id, votes in table.votes.items():
        out = table.labels(image_id)
        judged = np.nonzero(out.mask)[0]
        judged_per_image[len(judged)] += 1
        helpless_votes += int(out.votes[HELPLESS])
        for e in judged:
            pattern = (int(out.votes[e]), int(out.yes[e]))
            patterns[pattern] += 1
            present[pattern, bool(out.present[e])] += 1
            assert out.target[e] == pytest.approx(pattern[1] / pattern[0])
        assert not out.present[~out.mask].any()
    assert dict(patterns) == {(1, 0): 22291, (1, 1): 3037, (2, 1): 3652, (3, 2): 1943, (3, 3): 9075}
    assert judged_per_image == {2: 19_999}
    # The hard rule on the published patterns.
    assert dict(present) == {((1, 0), False): 22291, ((1, 1), True): 3037, ((2, 1), False): 3652,
                             ((3, 2), True): 1943, ((3, 3), True): 9075}
    assert helpless_votes > 0  # 'Hopelessness' rows landed on Helplessness
    assert table.labels("99999") is None


def test_read_binary_votes_bad_lines(tmp_path):
    path = tmp_path / "votes.csv"
    path.write_text(
        "path,annotator,value,emotion\n"       # 1
        "00001,human-1,True,Anger\n"            # 2 good
        "00001,human-2,True,Schadenfreude\n"    # 3 unknown emotion
        "00001,human-3,maybe,Anger\n"           # 4 bad value
        "00002,human-1,,Fear\n"                 # 5 empty field
        "00002,human-2,False\n"                 # 6 missing field
        "00001,human-1,False,Anger\n"           # 7 repeated vote
        "00002,human-1,true,Hopelessness\n"     # 8 good (alias)
        "00002,human-1,False,helplessness\n"    # 9 repeated via the alias
        "\n"                                    # 10 blank
        "00003,human-4,0,Fear\n"                # 11 good
        "00003,human-5,yes,Nonsense\n"          # 12 unknown emotion
    )
    table = labels.read_binary_votes(path)
    lines = [line for line, _ in table.bad_lines]
    assert lines == [3, 4, 5, 6, 7, 9, 12], table.bad_lines
    reasons = dict(table.bad_lines)
    assert "Schadenfreude" in reasons[3]
    assert "'maybe'" in reasons[4]
    assert "missing field" in reasons[5] and "missing field" in reasons[6]
    assert "repeated" in reasons[7] and "human-1" in reasons[7]
    assert "repeated" in reasons[9]
    assert "Nonsense" in reasons[12]
    assert table.votes == {"00001": [(ANGER, True)], "00002": [(HELPLESS, True)], "00003": [(FEAR, False)]}
    assert table.num_lines == 10  # data rows, the blank line aside


def test_read_binary_votes_missing_column(tmp_path):
    path = tmp_path / "votes.csv"
    path.write_text("path,annotator,vote,emotion\n00001,human-1,True,Anger\n")
    with pytest.raises(labels.LabelError) as info:
        labels.read_binary_votes(path)
    message = str(info.value)
    assert "'value'" in message and "'vote'" in message and str(path) in message, message
