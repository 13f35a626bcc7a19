"""Procedural cartoon faces: a synthetic, learnable stand-in for EmoNet-Face images.

Each emotion maps to a FACS-inspired profile over a few facial "action unit" parameters;
an intensity vector mixes the profiles linearly into one parameter vector, and a small
vector renderer (PIL polygons drawn at 2x, LANCZOS-downsampled) turns it into a face.
Demographics change only appearance and the rng only nuisance (pose, colours, lighting),
so the emotion signal lives in the expression geometry that a small CNN/ViT can learn.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

FACIAL_PARAMS: tuple[str, ...] = (
    "brow_raise",       # whole brows up (surprise, interest)
    "brow_furrow",      # brows down and together (anger, concentration)
    "brow_inner_up",    # inner corners up, sad/worried tilt
    "eye_open",         # upper lid up, white above the iris (fear, surprise)
    "eye_squint",       # lower lid up, cheek crease (Duchenne smile, pain)
    "lid_droop",        # upper lid down (fatigue, contempt, bliss)
    "gaze_down",        # signed: negative looks up
    "gaze_aside",       # signed: sideways gaze
    "mouth_smile",      # both corners up
    "mouth_frown",      # both corners down
    "mouth_open",       # jaw drop, dark inner mouth and teeth
    "lip_press",        # thin, pressed lips and chin crease
    "lip_corner_asym",  # one corner up: smirk / contempt
    "nose_wrinkle",     # nose bridge lines, raised upper lip
    "cheek_flush",      # reddened cheeks
    "pallor",           # desaturated, greyish skin
    "head_tilt",        # signed head roll
    "tears",            # tear streaks below the eyes
)
# Unsigned effects (open, press, wrinkle, flush, pallor, tears) ignore negative values.
_PARAM_INDEX = {name: i for i, name in enumerate(FACIAL_PARAMS)}
PARAM_LIMIT = 1.5  # Several co-active emotions may add up; beyond this faces get grotesque.

# Hand-written profiles. Members of a CONFUSABLE_GROUPS entry intentionally share a profile
# (up to small tweaks) so the renderer cannot tell them apart; everything else differs.
_PROFILES: dict[str, dict[str, float]] = {
    "Amusement": dict(mouth_smile=1.0, mouth_open=0.6, eye_squint=0.6, cheek_flush=0.3, brow_raise=0.2),
    "Elation": dict(mouth_smile=1.0, mouth_open=0.7, eye_squint=0.5, cheek_flush=0.35, brow_raise=0.3),
    "Pleasure/Ecstasy": dict(lid_droop=0.8, mouth_open=0.5, head_tilt=0.6, cheek_flush=0.6, mouth_smile=0.4,
                             brow_inner_up=0.3, gaze_down=-0.3),
    "Contentment": dict(mouth_smile=0.6, lid_droop=0.35, eye_squint=0.2),
    "Relief": dict(mouth_smile=0.55, lid_droop=0.4, eye_squint=0.15, brow_inner_up=0.05),
    "Thankfulness/Gratitude": dict(mouth_smile=0.6, brow_inner_up=0.6, head_tilt=0.3, gaze_down=0.4,
                                   tears=0.3),
    "Affection": dict(mouth_smile=0.7, eye_squint=0.4, head_tilt=0.6, cheek_flush=0.3, lid_droop=0.2),
    "Infatuation": dict(cheek_flush=0.9, mouth_smile=0.4, eye_open=0.4, gaze_aside=0.5, head_tilt=-0.4,
                        brow_inner_up=0.2),
    "Hope/Enthusiasm/Optimism": dict(mouth_smile=0.7, brow_raise=0.6, eye_open=0.4, gaze_down=-0.6),
    "Triumph": dict(mouth_open=1.0, mouth_smile=0.6, brow_furrow=0.4, eye_squint=0.4, cheek_flush=0.5,
                    head_tilt=-0.3),
    "Pride": dict(mouth_smile=0.4, lip_press=0.5, lid_droop=0.3, gaze_down=-0.5, brow_raise=0.2,
                  head_tilt=-0.3),
    "Interest": dict(brow_raise=0.6, eye_open=0.4, head_tilt=0.5, brow_inner_up=0.2, mouth_open=0.1),
    "Awe": dict(brow_raise=0.8, eye_open=0.5, mouth_open=0.5, brow_inner_up=0.5, gaze_down=-0.7),
    "Astonishment/Surprise": dict(brow_raise=1.0, eye_open=1.0, mouth_open=0.9),
    "Concentration": dict(brow_furrow=0.7, eye_squint=0.4, lip_press=0.6, gaze_down=0.5),
    "Contemplation": dict(gaze_aside=0.7, gaze_down=-0.5, brow_furrow=0.3, lip_press=0.3, head_tilt=0.4),
    "Longing": dict(brow_inner_up=0.7, gaze_aside=-0.6, lid_droop=0.3, mouth_frown=0.2, gaze_down=-0.3),
    "Teasing": dict(lip_corner_asym=0.9, mouth_smile=0.5, eye_squint=0.3, brow_raise=0.3, gaze_aside=0.3),
    "Impatience and Irritability": dict(brow_furrow=0.6, lip_press=0.7, gaze_aside=-0.5, mouth_frown=0.3,
                                        nose_wrinkle=0.2),
    "Sexual Lust": dict(lid_droop=0.6, mouth_open=0.35, cheek_flush=0.7, lip_corner_asym=0.3,
                        mouth_smile=0.3, brow_raise=0.2),
    "Doubt": dict(lip_corner_asym=-0.6, brow_furrow=0.3, mouth_frown=0.4, head_tilt=-0.5, eye_squint=0.3,
                  lip_press=0.3, gaze_aside=0.2),
    "Fear": dict(eye_open=1.0, brow_inner_up=0.8, brow_raise=0.5, mouth_open=0.45, pallor=0.8,
                 brow_furrow=0.3),
    "Distress": dict(brow_inner_up=0.9, brow_furrow=0.5, mouth_frown=0.6, tears=0.6, mouth_open=0.3,
                     pallor=0.3),
    "Confusion": dict(brow_furrow=0.6, brow_inner_up=0.3, head_tilt=0.7, gaze_aside=-0.3,
                      lip_corner_asym=-0.4, mouth_open=0.2),
    "Embarrassment": dict(gaze_down=0.8, cheek_flush=0.9, head_tilt=-0.4, mouth_smile=0.3,
                          gaze_aside=0.3, lip_press=0.2),
    "Shame": dict(gaze_down=0.9, cheek_flush=0.8, head_tilt=-0.4, mouth_smile=0.2, gaze_aside=0.3,
                  lip_press=0.3, brow_inner_up=0.1),
    "Disappointment": dict(mouth_frown=0.8, lip_press=0.45, brow_inner_up=0.3, lid_droop=0.3,
                           lip_corner_asym=-0.2),
    "Sadness": dict(mouth_frown=0.8, brow_inner_up=0.8, lid_droop=0.4, gaze_down=0.5, tears=0.7, pallor=0.2),
    "Bitterness": dict(mouth_frown=0.8, lip_press=0.5, brow_inner_up=0.25, lid_droop=0.3,
                       lip_corner_asym=-0.3, brow_furrow=0.1),
    "Sourness": dict(mouth_frown=0.8, lip_press=0.5, brow_inner_up=0.2, lid_droop=0.3,
                     lip_corner_asym=-0.25, nose_wrinkle=0.1),
    "Contempt": dict(lip_corner_asym=1.0, lid_droop=0.4, gaze_down=-0.3, lip_press=0.2, head_tilt=-0.5),
    "Disgust": dict(nose_wrinkle=1.0, mouth_frown=0.5, brow_furrow=0.5, eye_squint=0.5, mouth_open=0.2,
                    gaze_aside=-0.2),
    "Anger": dict(brow_furrow=1.0, eye_squint=0.5, lip_press=0.7, eye_open=0.3, cheek_flush=0.5,
                  nose_wrinkle=0.2),
    "Malevolence/Malice": dict(brow_furrow=0.7, lip_corner_asym=0.5, mouth_smile=0.4, lid_droop=0.4,
                               gaze_down=-0.2, eye_squint=0.2),
    "Pain": dict(eye_squint=1.0, brow_furrow=0.8, nose_wrinkle=0.6, mouth_open=0.5, mouth_frown=0.3,
                 tears=0.3, pallor=0.2),
    "Helplessness": dict(brow_inner_up=1.0, lid_droop=0.4, mouth_frown=0.4, head_tilt=0.5, brow_raise=0.3,
                         mouth_open=0.2, gaze_down=0.3),
    "Fatigue/Exhaustion": dict(lid_droop=1.0, gaze_down=0.4, mouth_open=0.3, pallor=0.5, head_tilt=0.3,
                               brow_raise=-0.2),
    "Emotional Numbness": dict(pallor=0.8, lid_droop=0.4, gaze_aside=0.2),
    "Intoxication/Altered States of Consciousness": dict(lid_droop=0.7, head_tilt=0.8, cheek_flush=0.8,
                                                         mouth_smile=0.4, gaze_aside=0.4,
                                                         lip_corner_asym=0.3, mouth_open=0.2),
    "Jealousy & Envy": dict(gaze_aside=0.8, brow_furrow=0.5, lip_press=0.5, lip_corner_asym=-0.3,
                            mouth_frown=0.3, eye_squint=0.3),
}

CONFUSABLE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("Amusement", "Elation"),
    ("Contentment", "Relief"),
    ("Embarrassment", "Shame"),
    ("Disappointment", "Bitterness", "Sourness"),
)


def expression_matrix(emotion_names: Sequence[str]) -> np.ndarray:
    """Profiles of `emotion_names` (any order) as a [len(names), len(FACIAL_PARAMS)] matrix."""
    unknown = [name for name in emotion_names if name not in _PROFILES]
    if unknown:
        raise KeyError(f"unknown emotion name(s): {unknown}")
    matrix = np.zeros((len(emotion_names), len(FACIAL_PARAMS)), np.float32)
    for row, name in enumerate(emotion_names):
        for param, weight in _PROFILES[name].items():
            matrix[row, _PARAM_INDEX[param]] = weight
    return matrix


def expression_params(intensity: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Intensities in 0..7 (last axis = emotions) -> additive, clipped facial parameters."""
    mixed = (np.asarray(intensity, np.float32) / 7.0) @ np.asarray(matrix, np.float32)
    return np.clip(mixed, -PARAM_LIMIT, PARAM_LIMIT).astype(np.float32)


def read_expression(params: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The inverse of `expression_params`: the 0..7 intensities that best explain a face.

    A non-negative least-squares fit of the facial parameters by the emotions' profiles
    (scipy's NNLS, which picks a sparse explanation, as a person names a few emotions rather
    than all 40 a little). On a face's exact parameters it recovers the intensities almost
    exactly (clipping aside); on a noisy reading of them, emotions with near-equal profiles
    trade intensity, so alike emotions are confused in proportion to how alike they are drawn.
    `params`: [..., len(FACIAL_PARAMS)] -> [..., len(matrix)].
    """
    from scipy.optimize import nnls
    basis = (np.asarray(matrix, np.float64) / 7.0).T          # [params, emotions]
    flat = np.asarray(params, np.float64).reshape(-1, basis.shape[0])
    out = np.stack([nnls(basis, p)[0] for p in flat]) if len(flat) else np.zeros((0, basis.shape[1]))
    return np.clip(out, 0.0, 7.0).reshape(*np.shape(params)[:-1], basis.shape[1])


# ----------------------------------------------------------------------------- appearance

_SKIN_TONES = (
    (242, 208, 182), (228, 186, 148), (204, 154, 112),
    (178, 126, 88), (140, 94, 62), (104, 68, 48),
)
# Checked in order, so the more specific phrase must come first.
_ETHNICITY_TONE = (
    ("southeast asian", 2), ("south asian", 4), ("indian", 4), ("east asian", 1),
    ("middle eastern", 2), ("arab", 2), ("hispanic", 3), ("latin", 3),
    ("african", 5), ("black", 5), ("caucasian", 0), ("white", 0), ("european", 0),
)
_AGE_LEVEL = (("young", 0), ("teen", 0), ("middle", 2), ("elder", 3), ("old", 3), ("senior", 3),
              ("adult", 1))
_HAIR_COLOURS = ((28, 22, 20), (60, 40, 28), (105, 72, 45), (150, 80, 45), (205, 170, 105))
_IRIS_COLOURS = ((70, 45, 25), (110, 70, 35), (60, 100, 150), (80, 115, 70))


def _stable_choice(value: str, n: int) -> int:
    # crc32 rather than hash(): str hashes are salted per process and would break determinism.
    return zlib.crc32(value.strip().lower().encode("utf-8")) % n


def _keyword_choice(value: str, table: tuple[tuple[str, int], ...], n: int) -> int:
    low = value.strip().lower()
    for keyword, choice in table:
        if keyword in low:
            return choice
    return _stable_choice(low, n)


def _gender_kind(value: str) -> str:
    low = value.strip().lower()
    if "female" in low or "woman" in low:  # before "male", which "female" contains
        return "female"
    if "male" in low or low == "man":
        return "male"
    return ("female", "male", "neutral")[_stable_choice(low, 3)]


@dataclasses.dataclass(frozen=True)
class _Look:
    skin: np.ndarray
    hair: np.ndarray
    iris: tuple[int, int, int]
    background: tuple[int, int, int]
    shirt: tuple[int, int, int]
    gender: str
    long_hair: bool
    beard: bool
    wrinkles: float


def _appearance(demographics: Mapping[str, str], rng: np.random.Generator) -> _Look:
    # Every rng draw happens unconditionally and in a fixed order, so the same seed gives the
    # same nuisance whatever the demographics or expression are.
    tone = _keyword_choice(str(demographics.get("ethnicity", "")), _ETHNICITY_TONE, len(_SKIN_TONES))
    gender = _gender_kind(str(demographics.get("gender", "")))
    age = _keyword_choice(str(demographics.get("age", "")), _AGE_LEVEL, 4)
    skin = np.asarray(_SKIN_TONES[tone], np.float64) + rng.uniform(-6, 6, 3)
    hair_pool = _HAIR_COLOURS if tone <= 2 else _HAIR_COLOURS[:2]
    hair = np.asarray(hair_pool[rng.integers(len(hair_pool))], np.float64)
    grey = (0.0, 0.08, 0.4, 0.85)[age]
    hair = hair * (1 - grey) + np.array([205.0, 205.0, 210.0]) * grey
    iris_pool = _IRIS_COLOURS if tone == 0 else _IRIS_COLOURS[:2]
    iris = iris_pool[rng.integers(len(iris_pool))]
    background = tuple(int(v) for v in rng.uniform(70, 235, 3))
    shirt = tuple(int(v) for v in rng.uniform(30, 220, 3))
    long_draw, beard_draw = rng.random(2)
    long_hair = bool(long_draw < {"female": 0.8, "neutral": 0.4}.get(gender, 0.0))
    beard = bool(gender == "male" and beard_draw < 0.4)
    return _Look(skin, hair, iris, background, shirt, gender, long_hair, beard,
                 wrinkles=(0.0, 0.0, 0.55, 1.0)[age])


# ----------------------------------------------------------------------------- geometry

_ANGLES = np.linspace(0, 2 * np.pi, 40, endpoint=False)
_UNIT_CIRCLE = np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], 1)
_PIVOT = np.array([0.0, 0.8])  # roll around the neck, so a tilt also shifts the head sideways
_TOP_HALF = np.linspace(np.pi, 2 * np.pi, 24)
_HALF_TURN = np.linspace(0, np.pi, 20)
_SPAN = {n: np.linspace(-1, 1, n) for n in (5, 9, 15, 21)}


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Face coordinates (unit = half face width, y down, eyes near y=0) -> canvas pixels."""

    center: np.ndarray
    scale: float
    linear: np.ndarray  # scaled rotation about _PIVOT, folded into one affine map
    offset: np.ndarray

    def __call__(self, xy: np.ndarray, tilt: bool = True) -> list[float]:
        if tilt:
            return (xy @ self.linear + self.offset).ravel().tolist()
        return (xy * self.scale + self.center).ravel().tolist()

    def width(self, w: float) -> int:
        return max(1, round(w * self.scale))


def _make_frame(canvas: int, jitter: np.ndarray, tilt: float) -> _Frame:
    center = canvas * (np.array([0.5, 0.52]) + 0.04 * jitter[:2])
    angle = math.radians(16.0 * tilt)
    c, s = math.cos(angle), math.sin(angle)
    scale = canvas * 0.3 * (1 + 0.05 * jitter[2])
    linear = scale * np.array([[c, s], [-s, c]])
    return _Frame(center, scale, linear, center + scale * _PIVOT - _PIVOT @ linear)


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return _UNIT_CIRCLE * (rx, ry) + (cx, cy)


def _curve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([x, y], 1)


def _rgb(colour: np.ndarray, alpha: float | None = None) -> tuple[int, ...]:
    values = colour.tolist() if isinstance(colour, np.ndarray) else colour
    rgb = tuple(min(max(int(v), 0), 255) for v in values)
    return rgb if alpha is None else rgb + (int(min(max(alpha, 0.0), 1.0) * 255),)


# ----------------------------------------------------------------------------- drawing

@dataclasses.dataclass(frozen=True)
class _Painter:
    draw: ImageDraw.ImageDraw
    frame: _Frame
    look: _Look
    skin: np.ndarray  # after pallor

    def poly(self, pts: np.ndarray, colour: tuple[int, ...], tilt: bool = True) -> None:
        self.draw.polygon(self.frame(pts, tilt), fill=colour)

    def line(self, pts: np.ndarray, colour: tuple[int, ...], width: float) -> None:
        self.draw.line(self.frame(pts), fill=colour, width=self.frame.width(width), joint="curve")

    def crease(self, pts: np.ndarray, strength: float, width: float = 0.03) -> None:
        # Lines are darkened skin so they read on every tone; alpha scales with the cause.
        if strength > 0.02:
            self.line(pts, self.crease_rgb + (int(255 * min(strength, 1.0)),), width)

    @functools.cached_property
    def crease_rgb(self) -> tuple[int, ...]:
        return _rgb(self.skin * 0.5)


def _draw_body(p: _Painter) -> None:
    p.poly(_ellipse(0, 2.35, 1.9, 0.95), p.look.shirt, tilt=False)
    neck = np.array([[-0.42, 0.7], [0.42, 0.7], [0.46, 1.6], [-0.46, 1.6]])
    p.poly(neck, _rgb(p.skin * 0.82), tilt=False)


def _head_outline(look: _Look) -> np.ndarray:
    jaw = {"female": 0.2, "male": 0.06, "neutral": 0.13}[look.gender]
    pts = _ellipse(0, 0, 1.0, 1.3)
    lower = np.clip(pts[:, 1] / 1.3, 0, 1)
    pts[:, 0] *= 1 - jaw * lower ** 2  # narrow only the chin half
    return pts


def _draw_head(p: _Painter) -> None:
    if p.look.long_hair:
        top = _curve(1.12 * np.cos(_TOP_HALF), 1.38 * np.sin(_TOP_HALF) - 0.02)
        p.poly(np.concatenate([top, [[1.2, 1.25], [-1.2, 1.25]]]), _rgb(p.look.hair * 0.85))
    for side in (-1, 1):
        p.poly(_ellipse(side * 0.97, 0.02, 0.16, 0.26), _rgb(p.skin * 0.9))
    outline = _head_outline(p.look)
    p.poly(outline, _rgb(p.skin))
    if p.look.beard:  # translucent stubble over the jaw; the mouth is drawn on top later
        jaw = outline[outline[:, 1] > 0.45]
        p.poly(np.concatenate([jaw[np.argsort(-jaw[:, 0])], [[-0.7, 0.48], [0.7, 0.48]]]),
               _rgb(p.look.hair, 0.15))


def _draw_hair_cap(p: _Painter) -> None:
    outer = _curve(1.07 * np.cos(_TOP_HALF), 1.38 * np.sin(_TOP_HALF))
    top = 0.82 if p.look.gender == "male" else 0.74
    hairline = _curve(0.99 * np.cos(_HALF_TURN), -0.22 - (top - 0.22) * np.sin(_HALF_TURN) ** 0.7)
    p.poly(np.concatenate([outer, hairline]), _rgb(p.look.hair))


def _eye_heights(e: dict[str, float]) -> tuple[float, float]:
    upper = 0.10 * (1 + 0.9 * e["eye_open"] - 0.85 * e["lid_droop"] - 0.35 * e["eye_squint"]
                    - 0.25 * max(e["gaze_down"], 0))
    lower = 0.075 * (1 + 0.6 * e["eye_open"] - 0.9 * e["eye_squint"])
    return float(np.clip(upper, 0.008, 0.22)), float(np.clip(lower, 0.006, 0.14))


def _draw_eye(p: _Painter, e: dict[str, float], side: int) -> None:
    ex, ey, half = side * 0.38, -0.05, 0.2
    upper_h, lower_h = _eye_heights(e)
    t = _SPAN[15]
    bulge = (1 - t ** 2) ** 0.7
    upper = _curve(ex + half * t, ey - upper_h * bulge)
    lower = _curve(ex + half * t, ey + lower_h * bulge)
    p.poly(np.concatenate([upper, lower[::-1]]), (245, 245, 240))
    iris_xy = (ex + 0.11 * e["gaze_aside"], ey + 0.07 * e["gaze_down"])
    p.poly(_ellipse(*iris_xy, 0.085, 0.085), p.look.iris)
    p.poly(_ellipse(*iris_xy, 0.04, 0.04), (15, 12, 12))
    p.poly(_ellipse(iris_xy[0] - 0.03, iris_xy[1] - 0.03, 0.018, 0.018), (250, 250, 250))
    # Skin-coloured lids mask whatever part of the iris falls outside the eye opening.
    wide = half + 0.08
    for curve, sign in ((upper, -1), (lower, 1)):
        ends = [[ex + wide, ey], [ex + wide, ey + sign * 0.3], [ex - wide, ey + sign * 0.3], [ex - wide, ey]]
        p.poly(np.concatenate([curve, ends]), _rgb(p.skin))
    lash = 0.045 if p.look.gender == "female" else 0.032
    p.line(upper, (30, 20, 20), lash)
    p.crease(upper + (0, -0.05), 0.35)
    p.crease(lower + (0, 0.05), 1.2 * e["eye_squint"], 0.028)


def _draw_brows(p: _Painter, e: dict[str, float]) -> None:
    raise_, furrow, inner_up = 0.22 * e["brow_raise"], e["brow_furrow"], e["brow_inner_up"]
    width = {"female": 0.055, "male": 0.085, "neutral": 0.07}[p.look.gender]
    colour = _rgb(np.minimum(p.look.hair * 0.55, p.skin * 0.5))  # grey brows still read on dark skin
    for side in (-1, 1):
        inner = [side * (0.17 - 0.05 * furrow), -0.30 - raise_ + 0.12 * furrow - 0.17 * inner_up]
        mid = [side * 0.38, -0.37 - raise_ + 0.05 * furrow - 0.05 * inner_up]
        outer = [side * 0.6, -0.31 - 0.8 * raise_ + 0.06 * inner_up]
        p.line(np.array([inner, mid, outer]), colour, width)
        glabella = np.array([[side * 0.05, -0.28], [side * 0.07, -0.14]])
        p.crease(glabella, 1.2 * furrow, 0.028)
    center_y = -0.5 - 0.5 * raise_
    p.crease(np.array([[-0.14, center_y + 0.04], [0, center_y], [0.14, center_y + 0.04]]), inner_up)


def _draw_forehead(p: _Painter, e: dict[str, float]) -> None:
    strength = max(e["brow_raise"], 0) + 0.6 * p.look.wrinkles
    x = 0.38 * _SPAN[9]
    for y in (-0.6, -0.68):
        p.crease(_curve(x, y + 0.1 * x ** 2 - 0.04 * max(e["brow_raise"], 0)), strength, 0.025)
    for side in (-1, 1):
        for dy in (-0.06, 0.0, 0.06):
            crow = np.array([[side * 0.62, -0.05 + 0.3 * dy], [side * 0.74, -0.05 + dy * 1.6]])
            p.crease(crow, p.look.wrinkles + 0.6 * max(e["eye_squint"], 0), 0.022)


def _draw_nose(p: _Painter, e: dict[str, float]) -> None:
    wrinkle = max(e["nose_wrinkle"], 0)
    base_y = 0.42 - 0.06 * wrinkle
    nostrils = np.array([[-0.14, base_y - 0.05], [-0.07, base_y + 0.01], [0, base_y + 0.02],
                         [0.07, base_y + 0.01], [0.14, base_y - 0.05]])
    p.line(nostrils, _rgb(p.skin * 0.6), 0.035)
    p.crease(np.array([[0.06, -0.0], [0.1, base_y - 0.12]]), 0.35)
    for side in (-1, 1):
        for y in (0.02, 0.1, 0.18):
            p.crease(np.array([[side * 0.04, y], [side * 0.17, y - 0.05]]), 1.3 * wrinkle, 0.03)
        fold_strength = 0.9 * wrinkle + 0.6 * max(e["mouth_smile"], 0) + 0.5 * p.look.wrinkles
        fold = np.array([[side * 0.2, base_y - 0.06], [side * 0.34, 0.56], [side * 0.42, 0.76]])
        p.crease(fold, fold_strength, 0.028)


def _draw_flush(p: _Painter, e: dict[str, float]) -> None:
    alpha = 0.7 * float(np.clip(e["cheek_flush"], 0, 1.2))
    if alpha > 0.01:
        for side in (-1, 1):
            p.poly(_ellipse(side * 0.56, 0.32, 0.25, 0.16), (225, 55, 70, int(255 * min(alpha, 0.85))))


def _mouth_curves(e: dict[str, float]) -> dict[str, np.ndarray]:
    smile, frown, asym = e["mouth_smile"], e["mouth_frown"], e["lip_corner_asym"]
    press, opening = max(e["lip_press"], 0), 0.32 * max(e["mouth_open"], 0)
    half = 0.37 * (1 + 0.2 * smile - 0.25 * press - 0.1 * frown + 0.1 * opening)
    t = _SPAN[21]
    # Positive asym pulls the viewer's-left corner up, negative the right one (mirror smirk).
    left, right = -0.34 * max(asym, 0) + 0.06 * max(-asym, 0), -0.34 * max(-asym, 0) + 0.06 * max(asym, 0)
    corner = -0.25 * smile + 0.25 * frown + np.where(t < 0, left, right)
    x = -0.04 * asym + half * t
    mid = 0.72 + corner * t ** 2
    prof = np.sqrt(1 - t ** 2)
    upper_in = mid - (0.35 * opening + 0.04 * max(e["nose_wrinkle"], 0)) * prof
    lower_in = mid + 0.65 * opening * prof
    thick = max(1 - 0.8 * press, 0.1)
    return dict(
        upper_in=_curve(x, upper_in), lower_in=_curve(x, lower_in),
        upper_out=_curve(x, upper_in - 0.065 * thick * prof ** 0.6),
        lower_out=_curve(x, lower_in + 0.085 * thick * prof ** 0.6),
        teeth=_curve(x, upper_in + min(0.08, 0.45 * opening) * prof), opening=np.array(opening),
        corners=np.array([[x[0], mid[0]], [x[-1], mid[-1]]]),
    )


def _draw_mouth(p: _Painter, e: dict[str, float]) -> None:
    c = _mouth_curves(e)
    pale = float(np.clip(e["pallor"], 0, 1))
    # A fixed rosy offset (not a skin multiple) keeps the mouth contrasted on dark skin too.
    lip = p.skin * 0.5 + np.array([110.0, 32.0, 40.0]) * (1 - 0.5 * pale) + 0.25 * pale * p.skin
    if p.look.gender == "female":
        lip = lip * 0.9 + np.array([40.0, 0.0, 10.0])
    p.poly(np.concatenate([c["upper_out"], c["lower_out"][::-1]]), _rgb(lip))
    if c["opening"] > 0.01:
        p.poly(np.concatenate([c["upper_in"], c["lower_in"][::-1]]), (55, 18, 22))
        p.poly(np.concatenate([c["upper_in"], c["teeth"][::-1]]), (240, 236, 225))
    press = max(e["lip_press"], 0)
    p.line(c["upper_in"], _rgb(lip * 0.35), 0.03 + 0.035 * press)
    chin = _curve(0.12 * _SPAN[5], 0.98 - 0.04 * (1 - _SPAN[5] ** 2))
    p.crease(chin, 1.2 * press + 0.3 * p.look.wrinkles, 0.03)
    asym = e["lip_corner_asym"]
    if abs(asym) > 0.02:  # dimple (AU14) beside the pulled corner
        x, y = c["corners"][0 if asym > 0 else 1]
        side = -1 if asym > 0 else 1
        dimple = np.array([[x + side * 0.03, y - 0.08], [x + side * 0.07, y], [x + side * 0.03, y + 0.08]])
        p.crease(dimple, 1.2 * abs(asym), 0.03)


def _draw_tears(p: _Painter, e: dict[str, float]) -> None:
    amount = float(np.clip(e["tears"], 0, 1.5))
    if amount < 0.02:
        return
    colour = (150, 205, 255, 220)
    for side in (-1, 1):
        x0, y0, length = side * 0.5, 0.04, 0.25 + 0.45 * amount
        bottom = y0 + length
        streak = np.array([[x0 - 0.035, y0], [x0 + 0.035, y0], [x0 + 0.045, bottom], [x0 - 0.045, bottom]])
        p.poly(streak, colour)
        p.poly(_ellipse(x0, y0 + length, 0.065, 0.08), colour)


def _draw_face(p: _Painter, e: dict[str, float]) -> None:
    _draw_body(p)
    _draw_head(p)
    for side in (-1, 1):
        _draw_eye(p, e, side)
    _draw_forehead(p, e)
    _draw_nose(p, e)
    _draw_flush(p, e)
    _draw_mouth(p, e)
    _draw_brows(p, e)
    _draw_hair_cap(p)
    _draw_tears(p, e)


def _pallid(skin: np.ndarray, pallor: float) -> np.ndarray:
    # Pallor = drained, slightly blue-grey skin; blend toward its own luminance, a bit lighter.
    amount = min(0.6 * max(pallor, 0.0), 0.85)
    grey = skin.mean() * 1.1 + np.array([0.0, 6.0, 16.0])
    return skin * (1 - amount) + grey * amount


def _light(img: Image.Image, direction: float, strength: float) -> Image.Image:
    # A linear brightness ramp: cheap stand-in for uneven studio lighting.
    size = img.size[0]
    axis = (np.arange(size, dtype=np.float32) / max(size - 1, 1)) - 0.5
    ramp = 1 + strength * (np.cos(direction) * axis[None, :] + np.sin(direction) * axis[:, None])
    pixels = np.asarray(img, np.float32) * ramp[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def render_face(params: np.ndarray, demographics: Mapping[str, str], size: int,
                rng: np.random.Generator) -> Image.Image:
    """Render one RGB `size` x `size` face with expression `params` ([len(FACIAL_PARAMS)])."""
    values = np.clip(np.asarray(params, np.float64).reshape(-1), -PARAM_LIMIT, PARAM_LIMIT)
    if values.shape[0] != len(FACIAL_PARAMS):
        raise ValueError(f"expected {len(FACIAL_PARAMS)} params, got {values.shape[0]}")
    e = dict(zip(FACIAL_PARAMS, values.tolist()))
    look = _appearance(demographics, rng)
    jitter = rng.uniform(-1, 1, 3)
    direction, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.3)
    canvas = Image.new("RGB", (2 * size, 2 * size), look.background)
    frame = _make_frame(2 * size, jitter, e["head_tilt"])
    _draw_face(_Painter(ImageDraw.Draw(canvas, "RGBA"), frame, look, _pallid(look.skin, e["pallor"])), e)
    return _light(canvas.resize((size, size), Image.Resampling.LANCZOS), direction, strength)
