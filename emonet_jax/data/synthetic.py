"""Synthetic EmoNet-Face: a small world where the true emotions are known.

Each image has latent intensities for the 40 emotions (a few dominant ones, some faint).
`faces.render_face` draws a face whose expression is a fixed linear function of them;
demographics change appearance only. Raters then label the picture the way the real data
was labelled:

Every rater sees the face, never the latent: it reads the face's expression parameters with
N(0, READING) error and explains them by the emotions' profiles (`faces.read_expression`, an
NNLS fit), so emotions drawn alike are confused in proportion to how alike they are drawn, as a
model looking at the pixels must confuse them too. Then:

* experts (HQ, 4 of 8 per image) may also swap emotions the renderer draws alike (profiles
  with cosine > ALIKE_COSINE); each adds a personal bias and judgement noise and rounds to 0..7.
  The judgement noise is the Binary voters' (below), the only real measurement of expert noise
  we have; agreement varies by emotion, as it does in the real data;
* the VLM (Big) does the same with more judgement noise, a per-emotion bias and more swaps;
* Binary experts vote present/absent on two emotions per image with the real protocol's
  shapes of (votes, yes): (1,0), (1,1), (2,1), (3,2), (3,3), in the published shares.

`write_split` stores the rows as parquet in one of the layouts observed on the Hugging Face
Hub (see `sources.SCHEMAS`) so that the builders' real code paths run on them.
Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import multiprocessing
import pathlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emonet_jax import labels as labels_lib
from emonet_jax import taxonomy
from emonet_jax.data import faces, sources

ETHNICITIES = ("African", "East Asian", "South Asian", "Caucasian", "Hispanic", "Middle Eastern")
GENDERS = ("female", "male")
AGES = ("young adult", "adult", "middle-aged", "elderly")
NUM_EXPERTS = 8
EXPERT_NAMES = tuple(f"expert-{i}" for i in range(1, NUM_EXPERTS + 1))
EXPERTS_PER_IMAGE = 4
BINARY_ANNOTATORS = tuple(f"human-{i}" for i in range(1, 8))
ALIKE_COSINE = 0.95
MAX = labels_lib.MAX_INTENSITY
# Error of one reading of each facial parameter (params span about -1.5..1.5; one emotion at
# intensity 5 moves its main parameters by ~0.5-0.7). The Binary shares fix only the total of
# reading error and judgement noise (0.0 -> noise 2.25, 0.1 -> 1.5, 0.2 -> 0.75 fit equally
# well); 0.1 is the middle choice. Median expert kappa at 0.0 / 0.1 / 0.2: 0.58 / 0.47 / 0.38.
READING = 0.1
# Bump when generation changes what a given SyntheticSpec produces (for cache keys).
GENERATOR_VERSION = 2
_MATRIX = faces.expression_matrix(taxonomy.NAMES)


@dataclasses.dataclass(frozen=True)
class RaterModel:
    reading: float                  # std of the rater's reading of each facial parameter
    noise: tuple[float, float]      # per-rater noise std, drawn uniformly from this range
    bias: float                     # per-rater offset, uniform in [-bias, bias]
    emotion_bias: float             # per-emotion offset shared by all raters of this kind
    swap: float                     # chance to swap alike emotions, per image and group


EXPERT = RaterModel(reading=READING, noise=(1.2, 1.8), bias=0.4, emotion_bias=0.0, swap=0.3)
VLM = RaterModel(reading=READING, noise=(2.0, 2.0), bias=0.0, emotion_bias=0.8, swap=0.5)


@dataclasses.dataclass(frozen=True)
class Image:
    image_id: str
    latent: np.ndarray               # float [40] in 0..7 (hidden: no rater sees it)
    params: np.ndarray               # float [len(faces.FACIAL_PARAMS)]: what the face shows
    demographics: dict[str, str]
    png: bytes
    prompt: str
    prompted: int                    # index of the emotion the prompt asked for


def alike_groups(matrix: np.ndarray | None = None) -> list[list[int]]:
    """Groups (size > 1) of emotions the renderer draws alike."""
    if matrix is None:
        matrix = faces.expression_matrix(taxonomy.NAMES)
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-9)
    close = unit @ unit.T > ALIKE_COSINE
    groups, seen = [], set()
    for i in range(len(matrix)):
        if i in seen:
            continue
        group = sorted(set(np.nonzero(close[i])[0].tolist()) - seen)
        seen.update(group)
        if len(group) > 1:
            groups.append(group)
    return groups


def sample_latent(rng: np.random.Generator) -> np.ndarray:
    latent = np.zeros(taxonomy.NUM_EMOTIONS)
    dominant = rng.choice(taxonomy.NUM_EMOTIONS, size=rng.integers(1, 4), replace=False)
    latent[dominant] = rng.uniform(2.5, MAX, size=len(dominant))
    faint = rng.random(taxonomy.NUM_EMOTIONS) < 0.08
    latent[faint & (latent == 0)] = rng.uniform(0.5, 2.0, size=(faint & (latent == 0)).sum())
    return latent


def images(num: int, seed: int, size: int, id_offset: int = 0) -> Iterator[Image]:
    """Streams `num` synthetic images (PNG, size x size), deterministic per seed."""
    matrix = faces.expression_matrix(taxonomy.NAMES)
    for i in range(num):
        rng = np.random.default_rng([seed, id_offset + i])
        latent = sample_latent(rng)
        demo = {"ethnicity": str(rng.choice(ETHNICITIES)), "gender": str(rng.choice(GENDERS)),
                "age": str(rng.choice(AGES))}
        params = faces.expression_params(latent, matrix)
        face = faces.render_face(params, demo, size, rng)
        buf = io.BytesIO()
        face.save(buf, format="PNG")
        prompted = int(np.argmax(latent))
        prompt = (f"A close-up photo of a {demo['age']} {demo['ethnicity']} {demo['gender']} person "
                  f"showing {taxonomy.NAMES[prompted].lower()}")
        yield Image(f"{id_offset + i:05d}", latent, params, demo, buf.getvalue(), prompt, prompted)


class Raters:
    """A panel of simulated raters of one `RaterModel`."""

    def __init__(self, model: RaterModel, names: tuple[str, ...], seed: int):
        rng = np.random.default_rng([seed, 7919])
        self.model, self.names = model, names
        self.noise = rng.uniform(*model.noise, size=len(names))
        self.bias = rng.uniform(-model.bias, model.bias, size=len(names))
        self.emotion_bias = rng.uniform(-model.emotion_bias, model.emotion_bias, size=taxonomy.NUM_EMOTIONS)
        self.groups = alike_groups()

    def perceive(self, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The intensities a rater reads off a face: its facial parameters, misread a little,
        explained by the emotions' profiles (`faces.read_expression`). Raters see the face,
        never the hidden latent intensities, just as a model does."""
        perceived = read_face(params, self.model.reading, rng)
        for group in self.groups:
            if rng.random() < self.model.swap:
                perceived[group] = perceived[rng.permutation(group)]
        return perceived

    def rate(self, rater: int, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Integer ratings 0..7 of all 40 emotions by one rater of the face with `params`."""
        perceived = self.perceive(params, rng)
        seen = perceived + self.bias[rater] + self.emotion_bias
        noisy = seen + rng.normal(0, self.noise[rater], size=seen.shape)
        # Most raters leave an emotion they don't see at 0 rather than 1.
        noisy = np.where(perceived + rng.normal(0, 0.5, size=seen.shape) < 0.6, np.minimum(noisy, 0.4), noisy)
        return np.clip(np.round(noisy), 0, MAX).astype(int)


def read_face(params: np.ndarray, reading: float, rng: np.random.Generator) -> np.ndarray:
    """[40] intensities one look at a face gives: its parameters read with N(0, reading) error."""
    seen = params + rng.normal(0, reading, size=np.shape(params))
    return faces.read_expression(seen, _MATRIX)


def expert_ratings(image: Image, experts: Raters, seed: int) -> dict[str, dict[str, int]]:
    rng = np.random.default_rng([seed, int(image.image_id), 1])
    chosen = sorted(rng.choice(len(experts.names), size=EXPERTS_PER_IMAGE, replace=False))
    out = {}
    for r in chosen:
        scores = experts.rate(r, image.params, rng)
        out[experts.names[r]] = {taxonomy.key_of(e): int(v) for e, v in enumerate(scores)}
        out[experts.names[r]].update(extra_ratings(scores.astype(float), rng))
    return out


def extra_ratings(latent: np.ndarray, rng: np.random.Generator) -> dict[str, int]:
    """Valence/arousal/dominance/vulnerability, loosely tied to the emotion families of the
    intensities the rater gave (`latent`: [40] in 0..7)."""
    families = np.array([taxonomy.FAMILIES.index(e.family) for e in taxonomy.EMOTIONS])
    positive = latent[families <= 1].sum() - latent[(families == 2) | (families == 3)].sum()
    out = {}
    for d, raw in zip(taxonomy.EXTRA_DIMENSIONS,
                      (positive / 4, latent.max() * 0.8, positive / 6, latent[families == 3].sum() / 3)):
        out[taxonomy.extra_key_of(d.index)] = int(np.clip(np.round(raw + rng.normal(0, 0.5)), d.low, d.high))
    return out


def vlm_ratings(image: Image, vlm: Raters, seed: int) -> dict[str, int]:
    rng = np.random.default_rng([seed, int(image.image_id), 2])
    return {taxonomy.key_of(e): int(v) for e, v in enumerate(vlm.rate(0, image.params, rng))}


# Each Binary vote: the expert reads the face (read_face, READING error), adds N(0, VOTE_NOISE)
# and says "present" above VOTE_THRESHOLD; a first "present" stands alone with chance
# ACCEPT_ALONE. Fitted (grid over noise 0..3.5, threshold 1..5, accept 0.05..0.3 on 3,000
# images) to the published shares of (votes, yes): (1,0) 55.7%, (1,1) 7.6%, (2,1) 9.1%,
# (3,2) 4.9%, (3,3) 22.7%; the fit gives 56.0 / 7.5 / 8.8 / 4.3 / 23.5 (L1 0.02).
# (Before raters read faces it was latent + N(0, 2.5) > 3.25.) HQ experts' judgement noise
# is drawn from VOTE_NOISE +- 20%: the same experts, the same perception.
VOTE_NOISE, VOTE_THRESHOLD, ACCEPT_ALONE = 1.5, 2.25, 0.17


def binary_votes(image: Image, seed: int) -> list[tuple[str, str, bool]]:
    """(annotator, emotion name, present?) on the prompted emotion and one other.

    The protocol reproduces the published shapes: a first vote; a "present" may be
    accepted alone, or confirmed by a second expert and, if confirmed, by a third.
    """
    rng = np.random.default_rng([seed, int(image.image_id), 3])
    other = rng.choice([e for e in range(taxonomy.NUM_EMOTIONS) if e != image.prompted])
    votes = []
    for emotion in (image.prompted, int(other)):
        annotators = rng.permutation(BINARY_ANNOTATORS)
        name = taxonomy.NAMES[emotion]

        def vote(k):
            seen = read_face(image.params, EXPERT.reading, rng)[emotion]
            present = bool(seen + rng.normal(0, VOTE_NOISE) > VOTE_THRESHOLD)
            votes.append((annotators[k], name, present))
            return present

        if vote(0) and rng.random() >= ACCEPT_ALONE and vote(1):
            vote(2)
    return votes


# ---------------------------------------------------------------------------
# Parquet in the Hugging Face layouts.

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
DEMOGRAPHICS_TYPE = pa.struct([(k, pa.string()) for k in sources.DEMOGRAPHICS])


def _table(kind: str, schema: sources.Schema, rows: list[dict]) -> pa.Table:
    image_column = schema.image_column
    columns = {image_column: pa.array([r["image"] for r in rows], IMAGE_TYPE)}
    if schema is sources.CARD:
        columns["prompt"] = pa.array([r["prompt"] for r in rows], pa.string())
        columns["demographics"] = pa.array([r["demographics"] for r in rows], DEMOGRAPHICS_TYPE)
        columns["annotations"] = pa.array([json.dumps(r["annotations"]) for r in rows], pa.string())
    elif schema is sources.PATH_LABEL:
        # The HQ parquet holds a Python-literal list of one-rater dicts.
        columns["label"] = pa.array([repr([{k: v} for k, v in r["annotations"].items()]) for r in rows])
    else:
        columns["emotion"] = pa.array([r["prompted"] for r in rows], pa.int64())
    return pa.table(columns)


def _row(kind: str, schema: sources.Schema, image: Image, experts: Raters, vlm: Raters, seed: int) -> dict:
    # The path-only Binary layout names images by row number, as binary.csv does.
    file_name = "" if schema is sources.PATH_EMOTION else f"{image.image_id}.png"
    row = {"image": {"bytes": image.png, "path": file_name}, "prompt": image.prompt,
           "demographics": image.demographics, "prompted": image.prompted}
    if kind == "hq":
        row["annotations"] = expert_ratings(image, experts, seed)
    elif kind == "big":
        row["annotations"] = {"vlm": vlm_ratings(image, vlm, seed)} if schema is sources.PATH_LABEL \
            else vlm_ratings(image, vlm, seed)
    else:
        row["votes"] = binary_votes(image, seed)
        row["annotations"] = [{"annotator": a, "emotion": e, "value": v} for a, e, v in row["votes"]]
    return row


def write_split(out_dir, kind: str, num: int, *, seed: int = 0, size: int = 128,
                schema: str = "card", rows_per_shard: int = 256, workers: int = 1) -> dict:
    """Writes `num` synthetic rows of `kind` as parquet shards in `out_dir`.

    Also writes `truth.npz` (image ids and latent intensities, for checking models) and,
    for Binary, `binary.csv` in the published layout (with 'Hopelessness' for
    Helplessness, as published). Returns a summary.

    Every row is a function of (seed, its index) alone, so the shards can be drawn by `workers`
    processes and the files are the same bytes for any number of them.
    """
    layout = {s.name: s for s in sources.SCHEMAS[kind]}.get(schema)
    if layout is None:
        raise ValueError(f"{kind} has no {schema!r} layout; choose one of {[s.name for s in sources.SCHEMAS[kind]]}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, kind, schema, seed, size, shard, start, min(rows_per_shard, num - start))
            for shard, start in enumerate(range(0, num, rows_per_shard))]
    if workers > 1 and len(jobs) > 1:
        # spawn, not fork: the caller may already run JAX's threads, which a fork would copy mid-flight.
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(jobs))) as pool:
            shards = pool.map(_write_shard, jobs)
    else:
        shards = [_write_shard(job) for job in jobs]
    ids = [i for shard in shards for i in shard["ids"]]
    latents = [x for shard in shards for x in shard["latents"]]
    np.savez(out / "truth.npz", image_id=np.array(ids), latent=np.array(latents, np.float32))
    if kind == "binary":
        with open(out / "binary.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(labels_lib.BINARY_CSV_COLUMNS)
            for image_id, annotator, value, emotion in (v for shard in shards for v in shard["votes"]):
                writer.writerow([image_id, annotator, value, "Hopelessness" if emotion == "Helplessness" else emotion])
    return {"kind": kind, "schema": schema, "rows": num, "shards": len(jobs), "dir": str(out)}


def _write_shard(job) -> dict[str, list]:
    """Draws rows start ... start + count - 1 of a split into its shard file; returns their ids,
    latents and (Binary) votes for the split-wide files."""
    out, kind, schema, seed, size, shard, start, count = job
    layout = {s.name: s for s in sources.SCHEMAS[kind]}[schema]
    experts = Raters(EXPERT, EXPERT_NAMES, seed)
    vlm = Raters(VLM, ("vlm",), seed + 1)
    kind_seed = seed * 1000 + ("hq", "binary", "big").index(kind)
    rows, ids, latents, votes = [], [], [], []
    for image in images(count, kind_seed, size, id_offset=start):
        row = _row(kind, layout, image, experts, vlm, kind_seed)
        ids.append(image.image_id)
        latents.append(image.latent)
        votes += [(image.image_id, a, v, e) for a, e, v in row.get("votes", ())]
        rows.append(row)
    pq.write_table(_table(kind, layout, rows), out / f"{kind}-{shard:05d}.parquet")
    return {"ids": ids, "latents": latents, "votes": votes}
