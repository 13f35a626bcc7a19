"""The EmoNet-Face taxonomy: 40 emotions in 7 families, plus 4 extra dimensions.

The data (`taxonomy.json`, copied from the authors' `data/guide.json`, CC BY 4.0) fixes the
order used everywhere in this project: label vectors, model heads and tables all index
emotions by their position here. Every name that enters from outside (dataset keys, CSV
rows, published head names) goes through `emotion_index` or `parse_key`, so an unknown name
fails loudly instead of becoming a wrong column.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Literal

_DATA_FILE = pathlib.Path(__file__).with_name("taxonomy.json")

# Names used by published files for the same emotion. `data/binary.csv` says
# Hopelessness where the taxonomy says Helplessness.
ALIASES = {"Hopelessness": "Helplessness"}

EXTRA_DIMENSIONS_FAMILY = "Extra Dimensions"


class UnknownEmotionError(KeyError):
    """A name that is neither an emotion, an alias, a slug nor a head name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message.
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Emotion:
    index: int
    name: str
    family: str
    synonyms: tuple[str, ...]

    @property
    def slug(self) -> str:
        """Lower-case identifier used by the published model heads."""
        return slugify(self.name)

    @property
    def head_name(self) -> str:
        """Key of this emotion in the published per-image score files."""
        return f"model_{self.slug}_best"


@dataclasses.dataclass(frozen=True)
class ExtraDimension:
    index: int
    name: str
    low: float
    high: float


def slugify(name: str) -> str:
    # The published heads keep '&' and turn both '/' and ' ' into '_':
    # 'Jealousy & Envy' -> 'jealousy_&_envy', 'Pleasure/Ecstasy' -> 'pleasure_ecstasy'.
    return name.strip().lower().replace("/", "_").replace(" ", "_")


def _load():
    data = json.loads(_DATA_FILE.read_text())
    emotions = tuple(
        Emotion(i, e["name"], e["family"], tuple(e["synonyms"]))
        for i, e in enumerate(data["emotions"]))
    extras = tuple(
        ExtraDimension(i, name, float(lo), float(hi))
        for i, (name, (lo, hi)) in enumerate(data["extra_dimensions"].items()))
    return emotions, tuple(data["families"]), extras


EMOTIONS, FAMILIES, EXTRA_DIMENSIONS = _load()
NUM_EMOTIONS = len(EMOTIONS)
NAMES = tuple(e.name for e in EMOTIONS)
SLUGS = tuple(e.slug for e in EMOTIONS)
HEAD_NAMES = tuple(e.head_name for e in EMOTIONS)
NUM_EXTRA_DIMENSIONS = len(EXTRA_DIMENSIONS)
EXTRA_NAMES = tuple(d.name for d in EXTRA_DIMENSIONS)


@functools.cache
def _lookup() -> dict[str, int]:
    table: dict[str, int] = {}
    for e in EMOTIONS:
        for key in (e.name, e.slug, e.head_name):
            table[key.lower()] = e.index
    for alias, name in ALIASES.items():
        table[alias.lower()] = NAMES.index(name)
    return table


def emotion_index(name: str) -> int:
    """Index of an emotion given its name, an alias, its slug or its head name.

    Matching ignores case and surrounding spaces; anything else raises
    `UnknownEmotionError` naming the offending string.
    """
    index = _lookup().get(str(name).strip().lower())
    if index is None:
        raise UnknownEmotionError(
            f"unknown emotion {name!r}; expected one of the 40 taxonomy names "
            f"(e.g. {NAMES[0]!r}), an alias {sorted(ALIASES)}, a slug or a "
            f"'model_<slug>_best' head name")
    return index


def extra_index(name: str) -> int:
    for d in EXTRA_DIMENSIONS:
        if d.name.lower() == str(name).strip().lower():
            return d.index
    raise UnknownEmotionError(
        f"unknown extra dimension {name!r}; expected one of {list(EXTRA_NAMES)}")


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    kind: Literal["emotion", "extra"]
    index: int


def parse_key(key: str) -> ParsedKey:
    """Parses a published `'Family|Emotion'` rating key.

    `'Extra Dimensions|Valence'` and its siblings are the 4 extra dimensions, not
    emotions. The family part must be a known family, but is not required to be
    the emotion's own family in `taxonomy.json`: the emotion name alone decides
    the column, so a re-grouped family in a published file cannot move a rating.
    A bare emotion name (no '|') is accepted too.
    """
    family, sep, name = str(key).rpartition("|")
    if not sep:
        return ParsedKey("emotion", emotion_index(name))
    family = family.strip()
    if family == EXTRA_DIMENSIONS_FAMILY:
        return ParsedKey("extra", extra_index(name))
    if family not in FAMILIES:
        raise UnknownEmotionError(
            f"unknown family {family!r} in rating key {key!r}; expected one of "
            f"{list(FAMILIES) + [EXTRA_DIMENSIONS_FAMILY]}")
    return ParsedKey("emotion", emotion_index(name))


def key_of(index: int) -> str:
    """The published `'Family|Emotion'` key of emotion `index`."""
    e = EMOTIONS[index]
    return f"{e.family}|{e.name}"


def extra_key_of(index: int) -> str:
    return f"{EXTRA_DIMENSIONS_FAMILY}|{EXTRA_DIMENSIONS[index].name}"
