"""Binary metrics against scikit-learn, on masked random data with ties."""

import ast
import pathlib

import numpy as np
import pytest
from sklearn import metrics as skm

from emonet_jax import taxonomy
from emonet_jax.data import sources
from emonet_jax.evaluate import binary

E = taxonomy.NUM_EMOTIONS
REPO = pathlib.Path(__file__).resolve().parents[1]


def random_case(seed=0, n=600, votes_per_image=6):
    """Scores rounded to 1 decimal (many ties), soft targets from 3 votes, sparse mask."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:05d}" for i in range(n)]
    mask = np.zeros((n, E), bool)
    for i in range(n):
        mask[i, rng.choice(E, votes_per_image, replace=False)] = True
    yes = rng.integers(0, 4, size=(n, E))
    targets = yes / 3.0                                   # 0, 1/3, 2/3, 1
    signal = 2 * targets - 1 + rng.normal(0, 1.0, size=(n, E))
    scores = np.round(signal, 1)
    # Unjudged entries carry garbage that must never be read.
    scores[~mask] = np.nan
    targets[~mask] = -7
    return scores, targets, mask, ids


def test_matches_sklearn_on_masked_data_with_ties():
    scores, targets, mask, ids = random_case()
    result = binary.binary_metrics(scores, targets, mask, ids)
    fold = binary.threshold_fold(ids)
    checked = 0
    for e, name in enumerate(taxonomy.NAMES):
        got = result["per_emotion"][name]
        val, test = mask[:, e] & fold, mask[:, e] & ~fold
        y_val, y_test = targets[val, e] > 0.5, targets[test, e] > 0.5
        s_val, s_test = scores[val, e], scores[test, e]
        assert len(np.unique(s_test)) < s_test.size   # ties really are there
        assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y_test, s_test), abs=1e-9)
        assert got["average_precision"] == pytest.approx(
            skm.average_precision_score(y_test, s_test), abs=1e-9)
        if e % 4 == 0:   # brute force over every distinct validation score (slow: 1 in 4)
            candidates = np.unique(s_val)[::-1]
            f1s = [skm.f1_score(y_val, s_val >= t) for t in candidates]
            assert got["threshold"] == candidates[int(np.argmax(f1s))]
        pred = s_test >= got["threshold"]
        assert got["f1"] == pytest.approx(skm.f1_score(y_test, pred), abs=1e-9)
        assert got["accuracy"] == pytest.approx(skm.accuracy_score(y_test, pred), abs=1e-9)
        checked += 1
    assert checked == E
    for m in binary.METRICS:
        values = [result["per_emotion"][n][m] for n in taxonomy.NAMES]
        assert result["macro"][m] == pytest.approx(np.mean(values), abs=1e-12)
        assert result["macro_n_emotions"][m] == E
    assert result["n_images"] == len(ids)
    assert result["n_threshold_images"] + result["n_test_images"] == len(ids)


def test_ranking_helpers_match_sklearn_on_heavy_ties():
    rng = np.random.default_rng(5)
    for _ in range(20):
        s = rng.integers(0, 4, size=50).astype(float)
        y = rng.random(50) < 0.4
        if y.all() or not y.any():
            continue
        assert binary.roc_auc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
        assert binary.average_precision(s, y) == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)


def test_threshold_chosen_on_threshold_fold_not_test_fold():
    # Emotion 0: in the threshold fold a score of 0.9+ separates the classes; in the test fold
    # the positives sit at 0.5. Choosing on the test fold would pick 0.5 and get F1 = 1.
    ids = [f"img{i}" for i in range(400)]
    fold = binary.threshold_fold(ids)
    scores = np.zeros((400, E))
    targets = np.zeros((400, E))
    mask = np.zeros((400, E), bool)
    mask[:, 0] = True
    targets[::2, 0] = 1
    scores[:, 0] = np.where(targets[:, 0] == 1, np.where(fold, 0.9, 0.5), 0.1)
    result = binary.binary_metrics(scores, targets, mask, ids)
    got = result["per_emotion"][taxonomy.NAMES[0]]
    assert got["threshold"] == 0.9
    assert got["f1"] == 0.0          # no test positive reaches 0.9
    assert got["roc_auc"] == 1.0     # the ranking is still perfect
    # An explicit fold overrides the ids' fold.
    flipped = binary.binary_metrics(scores, targets, mask, ids, fold=~fold)
    assert flipped["per_emotion"][taxonomy.NAMES[0]]["threshold"] == 0.5


def test_one_class_emotion_is_skipped_and_counted():
    scores, targets, mask, ids = random_case(seed=1, n=300)
    one = taxonomy.emotion_index("Pride")
    targets[mask[:, one], one] = 0.0          # nobody ever says present
    result = binary.binary_metrics(scores, targets, mask, ids)
    pride = result["per_emotion"]["Pride"]
    assert all(pride[m] is None for m in binary.METRICS)
    assert result["skipped"]["one_class_in_test"] == {"count": 1, "emotions": ["Pride"]}
    assert result["macro_n_emotions"]["roc_auc"] == E - 1
    others = [result["per_emotion"][n]["roc_auc"] for n in taxonomy.NAMES if n != "Pride"]
    assert result["macro"]["roc_auc"] == pytest.approx(np.mean(others))
    assert "one class in test: 1 (Pride)" in binary.markdown_table(result)


def test_no_positive_in_threshold_fold_keeps_auc_but_not_f1():
    ids = [f"x{i}" for i in range(200)]
    fold = binary.threshold_fold(ids)
    scores = np.linspace(0, 1, 200)[:, None].repeat(E, 1)
    targets = np.zeros((200, E))
    targets[~fold & (np.arange(200) % 2 == 0), :] = 1
    mask = np.ones((200, E), bool)
    result = binary.binary_metrics(scores, targets, mask, ids)
    assert result["skipped"]["no_threshold"]["count"] == E
    m = result["per_emotion"][taxonomy.NAMES[3]]
    assert m["roc_auc"] is not None and m["f1"] is None and m["threshold"] is None
    assert result["macro"]["f1"] is None and result["macro_n_emotions"]["f1"] == 0


def test_soft_targets_follow_strict_majority():
    assert binary.hard_targets(np.array([0, 1 / 3, 0.5, 2 / 3, 1])).tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("bad, message", [
    (lambda s, t, m: s.__setitem__((3, 2), np.inf), "score inf of image '00003' (row 3), emotion"),
    (lambda s, t, m: t.__setitem__((4, 2), 1.5), "target 1.5 of image '00004'"),
])
def test_bad_values_name_image_and_emotion(bad, message):
    scores, targets = np.zeros((10, E)), np.zeros((10, E))
    mask = np.zeros((10, E), bool)
    mask[:, 2] = True
    bad(scores, targets, mask)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        binary.binary_metrics(scores, targets, mask, [f"{i:05d}" for i in range(10)])


def test_shape_and_duplicate_id_errors():
    with pytest.raises(ValueError, match=r"scores must have shape \[N, 40\]"):
        binary.binary_metrics(np.zeros((2, 39)), np.zeros((2, E)), np.ones((2, E), bool), ["a", "b"])
    with pytest.raises(ValueError, match="disagree on N"):
        binary.binary_metrics(np.zeros((2, E)), np.zeros((2, E)), np.ones((2, E), bool), ["a"])
    with pytest.raises(ValueError, match="'a' appears more than once"):
        binary.binary_metrics(np.zeros((2, E)), np.zeros((2, E)), np.ones((2, E), bool), ["a", "a"])


def test_folds_reuse_the_builders_md5_split():
    ids = [f"{i:05d}" for i in range(2000)]
    held = binary.binary_heldout(ids)
    assert held.tolist() == [sources.in_validation(i, 10.0) for i in ids]
    fold = binary.threshold_fold(ids)
    assert fold.tolist() == [sources.in_validation("binary-threshold/" + i, 50.0) for i in ids]
    assert 0.45 < fold.mean() < 0.55
    # The salted fold is not the validation split again: about half of the held-out images.
    assert 0.35 < fold[held].mean() < 0.65


def test_validation_percent_is_the_binary_builders():
    # Read the constant without importing tensorflow_datasets (slow).
    path = REPO / "tfds_builders" / "emonet_face_binary" / "emonet_face_binary_dataset_builder.py"
    tree = ast.parse(path.read_text())
    values = [node.value.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(getattr(t, "id", None) == "VALIDATION_PERCENT" for t in node.targets)]
    assert values == [binary.BINARY_VALIDATION_PERCENT]


def test_markdown_table_lists_every_emotion_and_macro():
    scores, targets, mask, ids = random_case(seed=2, n=200)
    text = binary.markdown_table(binary.binary_metrics(scores, targets, mask, ids))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + E + 1
    assert rows[-1].startswith("| **Macro**")


def test_real_binary_votes_heldout_part(reference_dir):
    # The real vote layout: 2 judged emotions per image, ~1,900 held-out images.
    from emonet_jax import labels
    table = labels.read_binary_votes(reference_dir / "binary_annotations.csv")
    ids = [i for i in sorted(table.votes) if binary.binary_heldout([i])[0]]
    rows = [table.labels(i) for i in ids]
    targets = np.stack([r.target for r in rows])
    mask = np.stack([r.mask for r in rows])
    scores = np.random.default_rng(0).random(targets.shape)
    result = binary.binary_metrics(scores, targets, mask, ids)
    assert result["n_images"] == len(ids) == 1907
    assert 0.4 < result["macro"]["roc_auc"] < 0.6          # random scores rank at chance
    # Pain: 99 of its 1,000 judgements are "present", none in this test fold.
    assert result["skipped"]["one_class_in_test"]["emotions"] == ["Pain"]
    assert result["macro_n_emotions"]["roc_auc"] == E - 1
