"""The 40-emotion taxonomy against the authors' published reference data."""

import json
import pathlib

import pytest

from emonet_jax import taxonomy

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"
PACKAGED = pathlib.Path(taxonomy.__file__).with_name("taxonomy.json")


def _reference(name: str):
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (expected shared/reference beside the repo)")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def ref_taxonomy():
    return _reference("taxonomy.json")


@pytest.fixture(scope="module")
def transfer():
    return _reference("transfer_mappings.json")


def test_sizes():
    assert taxonomy.NUM_EMOTIONS == 40
    assert len(taxonomy.EMOTIONS) == len(taxonomy.NAMES) == 40
    assert len(set(taxonomy.NAMES)) == 40
    assert len(taxonomy.FAMILIES) == 7
    assert {e.family for e in taxonomy.EMOTIONS} == set(taxonomy.FAMILIES)
    assert taxonomy.NUM_EXTRA_DIMENSIONS == 4


def test_order_and_families_equal_reference(ref_taxonomy):
    ref = ref_taxonomy["emotions"]
    assert list(taxonomy.NAMES) == [e["name"] for e in ref]
    assert [e.family for e in taxonomy.EMOTIONS] == [e["family"] for e in ref]
    assert [list(e.synonyms) for e in taxonomy.EMOTIONS] == [e["synonyms"] for e in ref]
    assert list(taxonomy.FAMILIES) == ref_taxonomy["families"]
    assert [e.index for e in taxonomy.EMOTIONS] == list(range(40))


def test_extra_dimensions_equal_reference(ref_taxonomy):
    ref = ref_taxonomy["extra_dimensions"]
    assert list(taxonomy.EXTRA_NAMES) == list(ref) == [
        "Valence", "Arousal", "Dominance", "Emotional Vulnerability"]
    assert [(d.low, d.high) for d in taxonomy.EXTRA_DIMENSIONS] == [tuple(map(float, v)) for v in ref.values()]
    assert (taxonomy.EXTRA_DIMENSIONS[0].low, taxonomy.EXTRA_DIMENSIONS[0].high) == (-3.0, 3.0)


def test_packaged_taxonomy_equals_reference(ref_taxonomy):
    assert json.loads(PACKAGED.read_text()) == ref_taxonomy


@pytest.mark.parametrize("dataset", ["ferd", "affectnet"])
def test_head_names_equal_transfer_mapping_keys(transfer, dataset):
    keys = list(transfer[dataset])
    assert len(keys) == 40
    assert set(taxonomy.HEAD_NAMES) == set(keys)
    assert len(set(taxonomy.HEAD_NAMES)) == 40
    assert {f"model_{s}_best" for s in taxonomy.SLUGS} == set(keys)


@pytest.mark.parametrize("name, slug", [
    ("Jealousy & Envy", "jealousy_&_envy"),
    ("Impatience and Irritability", "impatience_and_irritability"),
    ("Intoxication/Altered States of Consciousness", "intoxication_altered_states_of_consciousness"),
    ("Pleasure/Ecstasy", "pleasure_ecstasy"),
])
def test_irregular_slugs(transfer, name, slug):
    index = taxonomy.NAMES.index(name)
    assert taxonomy.SLUGS[index] == slug
    assert taxonomy.HEAD_NAMES[index] == f"model_{slug}_best"
    assert f"model_{slug}_best" in transfer["ferd"]
    assert f"model_{slug}_best" in transfer["affectnet"]


def test_index_name_slug_round_trip():
    for i, e in enumerate(taxonomy.EMOTIONS):
        assert taxonomy.EMOTIONS[i].index == i
        assert taxonomy.emotion_index(e.name) == i
        assert taxonomy.emotion_index(e.slug) == i
        assert taxonomy.emotion_index(e.head_name) == i
        assert taxonomy.emotion_index(f"  {e.name.upper()} ") == i
        assert taxonomy.NAMES[taxonomy.emotion_index(e.slug)] == e.name
        assert taxonomy.SLUGS[i] == taxonomy.slugify(e.name) == e.slug
        assert taxonomy.HEAD_NAMES[i] == e.head_name


def test_parse_key_of_every_emotion():
    for i, e in enumerate(taxonomy.EMOTIONS):
        key = taxonomy.key_of(i)
        assert key == f"{e.family}|{e.name}"
        assert taxonomy.parse_key(key) == taxonomy.ParsedKey("emotion", i)
    assert taxonomy.parse_key("Anger") == taxonomy.ParsedKey("emotion", taxonomy.NAMES.index("Anger"))


def test_parse_key_extra_dimensions():
    parsed = taxonomy.parse_key("Extra Dimensions|Valence")
    assert parsed == taxonomy.ParsedKey("extra", 0)
    assert parsed.kind != "emotion"
    for i, name in enumerate(taxonomy.EXTRA_NAMES):
        key = taxonomy.extra_key_of(i)
        assert key == f"Extra Dimensions|{name}"
        assert taxonomy.parse_key(key) == taxonomy.ParsedKey("extra", i)
    with pytest.raises(taxonomy.UnknownEmotionError, match="Pleasantness"):
        taxonomy.parse_key("Extra Dimensions|Pleasantness")
    # An extra dimension is not an emotion.
    with pytest.raises(taxonomy.UnknownEmotionError, match="Valence"):
        taxonomy.emotion_index("Valence")


def test_family_part_does_not_move_the_column():
    # Documented: the emotion name alone decides the column when the family is known.
    anger = taxonomy.NAMES.index("Anger")
    assert taxonomy.EMOTIONS[anger].family != "Positive High-Energy Emotions"
    assert taxonomy.parse_key("Positive High-Energy Emotions|Anger") == taxonomy.ParsedKey("emotion", anger)


def test_alias_hopelessness_is_helplessness():
    helpless = taxonomy.NAMES.index("Helplessness")
    assert "Hopelessness" not in taxonomy.NAMES
    assert taxonomy.emotion_index("Hopelessness") == helpless
    assert taxonomy.emotion_index("hopelessness") == helpless
    family = taxonomy.EMOTIONS[helpless].family
    assert taxonomy.parse_key(f"{family}|Hopelessness") == taxonomy.ParsedKey("emotion", helpless)


def test_unknown_emotion_raises_naming_it():
    with pytest.raises(taxonomy.UnknownEmotionError) as info:
        taxonomy.emotion_index("Schadenfreude")
    assert "Schadenfreude" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(taxonomy.UnknownEmotionError) as info:
        taxonomy.parse_key("Positive High-Energy Emotions|Schadenfreude")
    assert "Schadenfreude" in str(info.value)
    with pytest.raises(taxonomy.UnknownEmotionError, match="model_schadenfreude_best"):
        taxonomy.emotion_index("model_schadenfreude_best")


def test_unknown_family_raises_naming_it():
    with pytest.raises(taxonomy.UnknownEmotionError) as info:
        taxonomy.parse_key("Happy Things|Amusement")
    assert "Happy Things" in str(info.value)
    # str() is the message, not KeyError's repr with extra quotes.
    assert str(info.value).startswith("unknown family 'Happy Things'")
