"""Evaluating a model in training: its HQ predictions put beside the experts' ratings.

The model becomes one more annotator of the HQ images; `agreement.hq_agreement` (the one
implementation of the paper's protocol) scores every annotator against the human experts.
Written to WORKDIR/eval/hq_agreement.{json,md} and WORKDIR/eval/hq_predictions.npz.
`HQEvaluator` predicts with the ViT trainer's model; `evaluate_scores` takes scores from any
model (the EmpathicInsight-Face heads trainer uses it).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from emonet_jax import taxonomy
from emonet_jax.data import pipeline
from emonet_jax.evaluate import agreement
from emonet_jax.models import emonet

MODEL_NAME = "model"


def read_expert_ratings(source) -> tuple[list[str], list[str], np.ndarray]:
    """(image ids, expert names, ratings [experts, images, 40] with NaN where not rated)."""
    ids, raters, ratings = [], [], []
    for i in range(len(source)):
        example = source[i]
        ids.append(pipeline.as_text(example["image_id"]))
        raters.append([pipeline.as_text(r) for r in example["raters"]])
        ratings.append(np.asarray(example["ratings"]))
    names = sorted({r for row in raters for r in row if r})
    if not names:
        raise ValueError("the evaluation split has no rater names: is it EmoNet-Face HQ?")
    row_of = {name: i for i, name in enumerate(names)}
    table = np.full((len(names), len(ids), ratings[0].shape[-1]), np.nan)
    for image, (slots, values) in enumerate(zip(raters, ratings)):
        for slot, name in enumerate(slots):
            if name and (values[slot] >= 0).any():
                table[row_of[name], image] = np.where(values[slot] >= 0, values[slot], np.nan)
    return ids, names, table


class HQEvaluator:
    """Predicts the 0-7 intensities of every HQ image and scores them like an annotator."""

    def __init__(self, config, data_dir, trainer):
        self.config = config
        name, split = config.data.eval
        self.source = pipeline.open_split(f"{name}/{config.data.resolution}", split, data_dir,
                                          in_memory=config.input.in_memory)
        self.batch_sharding = trainer.batch_sharding
        self._experts = None
        model = trainer.model

        def predict(params, images):
            out = model.apply({"params": params}, images, train=False)
            return {"intensity": emonet.expected_intensity(out["logits"]),
                    "presence": emonet.presence_probability(out["logits"])}

        self._predict = jax.jit(predict, in_shardings=(trainer.state_shardings["params"], self.batch_sharding),
                                out_shardings=self.batch_sharding)

    def experts(self):
        if self._experts is None:
            self._experts = read_expert_ratings(self.source)
        return self._experts

    def predictions(self, params) -> dict[str, np.ndarray]:
        """{'intensity', 'presence'}: [images, 40] in the split's row order (all processes)."""
        n = len(self.source)
        ds = pipeline.eval_dataset(self.source, global_batch_size=self.config.batch_size,
                                   image_size=self.config.input.image_size, crop=self.config.input.eval_crop,
                                   threads=self.config.input.threads)
        chunks = []
        for local in ds:
            batch = pipeline.device_batch({"image": local["image"]}, self.batch_sharding)
            out = self._predict(params, batch["image"])
            chunks.append(multihost_utils.process_allgather(out, tiled=True))
        # Global batch b holds rows b*B ... b*B + B - 1 (pipeline.eval_positions); the tail is padding.
        return {k: np.concatenate([c[k] for c in chunks])[:n] for k in chunks[0]}

    def run(self, params, step: int, writer, out_dir: pathlib.Path | None) -> dict[str, Any]:
        return evaluate_scores(self.experts(), self.predictions(params), step, writer, out_dir)


def evaluate_scores(experts, scores: dict[str, np.ndarray], step: int, writer,
                    out_dir: pathlib.Path | None) -> dict[str, Any]:
    """Any model's HQ scores scored as one annotator beside the experts, logged and written.

    `experts`: (image ids, names, ratings [experts, images, 40]) from `read_expert_ratings`;
    `scores`: {'intensity': 0-7 [images, 40] in the same image order, other arrays to save}.
    Writes OUT_DIR/eval/hq_agreement.{json,md}, hq_predictions.npz (image_id + every score
    array) and hq_model.csv. Returns the agreement result plus its 'summary'.
    """
    ids, names, table = experts
    if scores["intensity"].shape != table.shape[1:]:
        raise ValueError(f"intensity {scores['intensity'].shape} does not match the experts' {table.shape[1:]}")
    ratings = np.concatenate([table, scores["intensity"][None].astype(np.float64)])
    human = [True] * len(names) + [False]
    result = agreement.hq_agreement(ratings, names + [MODEL_NAME], human, full=False)
    result["step"] = step
    summary = summarise(result, names)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in summary.items()})
    writer.flush()
    if out_dir is not None:
        eval_dir = pathlib.Path(out_dir) / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "hq_agreement.json").write_text(json.dumps(result, indent=1, allow_nan=False))
        (eval_dir / "hq_agreement.md").write_text(f"HQ agreement at step {step}\n\n" + agreement.markdown_table(result))
        np.savez(eval_dir / "hq_predictions.npz", image_id=np.asarray(ids), **scores)
        agreement.write_hq_csv(hq_rows(ids, scores["intensity"][None], [MODEL_NAME], [False]),
                               eval_dir / "hq_model.csv")
    return {**result, "summary": summary}


def hq_rows(image_ids, ratings: np.ndarray, names, human) -> list[dict]:
    """Annotators' scores [R, N, 40] (NaN = not rated) as rows of the published hq.csv layout
    (write them with `agreement.write_hq_csv`; e.g. the model's, for
    `python -m emonet_jax.evaluate.agreement --ratings=hq.csv --extra=FILE`)."""
    rows = []
    for scores, name, is_human in zip(ratings, names, human):
        for image_id, row in zip(image_ids, scores):
            if not np.isnan(row).all():
                rows.append({"image": image_id, "annotator": name, "human": bool(is_human),
                             "annotations": {taxonomy.key_of(e): float(v) for e, v in enumerate(row)
                                             if not np.isnan(v)}})
    return rows


def summarise(result: dict, expert_names: list[str]) -> dict[str, float]:
    """The model's mean κ, the median expert's, and the gap (>= 0: expert level)."""
    annotators = result["annotators"]
    # An annotator with no defined κ on any emotion has mean_kappa None (JSON null): NaN here,
    # so the summary says "undefined" instead of crashing or inventing a number.
    expert = [np.nan if annotators[n]["mean_kappa"] is None else annotators[n]["mean_kappa"] for n in expert_names]
    model = annotators[MODEL_NAME]["mean_kappa"]
    model = np.nan if model is None else float(model)
    median = float(np.nanmedian(expert)) if not np.isnan(expert).all() else np.nan
    return {"model_mean_kappa": model, "median_expert_mean_kappa": median, "model_minus_median_expert": model - median}

