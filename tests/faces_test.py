"""Tests for the procedural face renderer (emonet_jax.data.faces)."""

import itertools

import numpy as np
import pytest
from PIL import Image

from emonet_jax.data import faces

EMOTIONS = (
    "Amusement", "Elation", "Pleasure/Ecstasy", "Contentment", "Thankfulness/Gratitude", "Affection",
    "Infatuation", "Hope/Enthusiasm/Optimism", "Triumph", "Pride", "Interest", "Awe",
    "Astonishment/Surprise", "Concentration", "Contemplation", "Relief", "Longing", "Teasing",
    "Impatience and Irritability", "Sexual Lust", "Doubt", "Fear", "Distress", "Confusion",
    "Embarrassment", "Shame", "Disappointment", "Sadness", "Bitterness", "Contempt", "Disgust", "Anger",
    "Malevolence/Malice", "Sourness", "Pain", "Helplessness", "Fatigue/Exhaustion", "Emotional Numbness",
    "Intoxication/Altered States of Consciousness", "Jealousy & Envy",
)
NUM_PARAMS = len(faces.FACIAL_PARAMS)
DEMO = {"ethnicity": "Hispanic", "gender": "female", "age": "adult"}
DEMOS = (
    DEMO,
    {"ethnicity": "African", "gender": "male", "age": "elderly"},
    {"ethnicity": "Martian", "gender": "nonbinary", "age": "ageless"},
)


def _render(params, demographics=DEMO, size=64, seed=0):
    return faces.render_face(np.asarray(params, np.float32), demographics, size, np.random.default_rng(seed))


def _pixels(image):
    return np.asarray(image, np.float32)


def _cosine(matrix, a, b):
    u, v = matrix[EMOTIONS.index(a)], matrix[EMOTIONS.index(b)]
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_params_are_unique_names():
    assert len(set(faces.FACIAL_PARAMS)) == NUM_PARAMS
    assert 12 <= NUM_PARAMS <= 20


def test_matrix_shape_dtype_and_determinism():
    matrix = faces.expression_matrix(EMOTIONS)
    assert matrix.shape == (40, NUM_PARAMS)
    assert matrix.dtype == np.float32
    assert np.all(np.abs(matrix) <= 1.0)
    assert np.all(np.linalg.norm(matrix, axis=1) > 0.3)  # every emotion shows on the face
    np.testing.assert_array_equal(matrix, faces.expression_matrix(EMOTIONS))


def test_matrix_depends_on_names_not_order():
    order = np.random.default_rng(0).permutation(40)
    shuffled = faces.expression_matrix([EMOTIONS[i] for i in order])
    np.testing.assert_array_equal(shuffled, faces.expression_matrix(EMOTIONS)[order])


def test_unknown_emotion_raises_key_error_naming_it():
    with pytest.raises(KeyError, match="Schadenfreude"):
        faces.expression_matrix(["Amusement", "Schadenfreude"])


def test_confusable_groups_share_profiles():
    matrix = faces.expression_matrix(EMOTIONS)
    for group in faces.CONFUSABLE_GROUPS:
        for a, b in itertools.combinations(group, 2):
            assert _cosine(matrix, a, b) > 0.95, (a, b)


def test_other_emotions_are_distinct():
    matrix = faces.expression_matrix(EMOTIONS)
    group_of = {name: i for i, group in enumerate(faces.CONFUSABLE_GROUPS) for name in group}
    for a, b in itertools.combinations(EMOTIONS, 2):
        if a in group_of and group_of[a] == group_of.get(b):
            continue
        assert _cosine(matrix, a, b) < 0.9, (a, b)
    assert _cosine(matrix, "Amusement", "Anger") < 0.5
    assert _cosine(matrix, "Fear", "Contentment") < 0.5


def test_expression_params_mixes_and_clips():
    matrix = faces.expression_matrix(EMOTIONS)
    intensity = np.zeros(40, np.float32)
    np.testing.assert_array_equal(faces.expression_params(intensity, matrix), np.zeros(NUM_PARAMS))
    intensity[EMOTIONS.index("Anger")] = 7
    np.testing.assert_allclose(faces.expression_params(intensity, matrix), matrix[EMOTIONS.index("Anger")])
    intensity[EMOTIONS.index("Amusement")] = 3.5
    expected = matrix[EMOTIONS.index("Anger")] + 0.5 * matrix[EMOTIONS.index("Amusement")]
    np.testing.assert_allclose(faces.expression_params(intensity, matrix), expected, rtol=1e-6)
    params = faces.expression_params(np.full(40, 7.0), matrix)
    assert params.shape == (NUM_PARAMS,) and params.dtype == np.float32
    assert np.all(np.abs(params) <= faces.PARAM_LIMIT)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_output_mode_and_size(size):
    image = _render(np.zeros(NUM_PARAMS), size=size)
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB" and image.size == (size, size)


def test_rejects_wrong_param_count():
    with pytest.raises(ValueError):
        _render(np.zeros(NUM_PARAMS + 1))


@pytest.mark.parametrize("demographics", DEMOS)
def test_every_param_changes_pixels(demographics):
    neutral = _pixels(_render(np.zeros(NUM_PARAMS), demographics, seed=3))
    for i, name in enumerate(faces.FACIAL_PARAMS):
        params = np.zeros(NUM_PARAMS)
        params[i] = 1.0
        diff = np.abs(_pixels(_render(params, demographics, seed=3)) - neutral).mean()
        assert diff > 0.15, (name, diff)


def test_same_inputs_give_identical_bytes():
    params = faces.expression_params(np.linspace(0, 7, 40), faces.expression_matrix(EMOTIONS))
    for demographics in DEMOS:
        first, second = (_render(params, demographics, seed=7).tobytes() for _ in range(2))
        assert first == second


def test_seed_adds_nuisance_variation():
    assert _render(np.zeros(NUM_PARAMS), seed=1).tobytes() != _render(np.zeros(NUM_PARAMS), seed=2).tobytes()


@pytest.mark.parametrize("key,values", [
    ("ethnicity", ("Caucasian", "East Asian", "African", "Hispanic", "Middle Eastern", "South Asian")),
    ("gender", ("male", "female")),
    ("age", ("young adult", "elderly")),
])
def test_demographics_change_pixels(key, values):
    images = [_pixels(_render(np.zeros(NUM_PARAMS), {**DEMO, key: value}, seed=4)) for value in values]
    for a, b in itertools.combinations(images, 2):
        assert np.abs(a - b).mean() > 0.5


def test_skin_tone_ordering_is_sensible():
    tones = [np.mean(faces._SKIN_TONES[faces._keyword_choice(name, faces._ETHNICITY_TONE, 6)])
             for name in ("Caucasian", "East Asian", "South Asian", "African")]
    assert tones == sorted(tones, reverse=True)


def test_unknown_demographics_do_not_crash():
    odd = ({}, {"ethnicity": "", "gender": "", "age": ""}, {"ethnicity": "Atlantean", "age": "42"})
    for demographics in odd:
        assert _render(np.zeros(NUM_PARAMS), demographics).size == (64, 64)


def test_large_render_works():
    image = _render(np.full(NUM_PARAMS, 0.5), size=1024)
    assert image.size == (1024, 1024)


def test_global_numpy_rng_untouched():
    state = np.random.get_state()[1].copy()
    _render(np.zeros(NUM_PARAMS))
    np.testing.assert_array_equal(np.random.get_state()[1], state)


def test_read_expression_inverts_expression_params():
    matrix = faces.expression_matrix(EMOTIONS)
    intensity = np.zeros(40)
    intensity[EMOTIONS.index("Anger")], intensity[EMOTIONS.index("Fear")] = 6.0, 3.0
    read = faces.read_expression(faces.expression_params(intensity, matrix), matrix)
    assert read.shape == (40,) and read.min() >= 0 and read.max() <= 7
    np.testing.assert_allclose(read, intensity, atol=1e-3)
    batch = faces.read_expression(np.zeros((3, 2, NUM_PARAMS)), matrix)
    assert batch.shape == (3, 2, 40) and not batch.any()
