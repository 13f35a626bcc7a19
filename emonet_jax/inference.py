"""A trained run as a function from images to the 40 emotions' scores.

    run = inference.Run.load("workdirs/hq")        # WORKDIR/config.json + its latest checkpoint
    scores = run.predict(images)                  # uint8 [N, H, W, 3] -> {'intensity', 'presence'}

Images are resized (whole image, bilinear) to the run's input size and scaled to [-1, 1],
the preprocessing the trainer's evaluation uses with `input.eval_crop = 1`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from emonet_jax import checkpoint
from emonet_jax.data import pipeline
from emonet_jax.models import emonet


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model: emonet.EmotionModel
    params: Any
    workdir: pathlib.Path

    def __post_init__(self):
        def predict(params, x):
            logits = self.model.apply({"params": params}, x)["logits"]
            return {"intensity": emonet.expected_intensity(logits), "presence": emonet.presence_probability(logits)}
        self._predict = jax.jit(predict)

    @classmethod
    def load(cls, workdir) -> "Run":
        workdir = pathlib.Path(workdir)
        config_file = workdir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: is {workdir} a training workdir?")
        config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
        model = emonet.build(config)
        size = config.input.image_size
        target = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32)))
        target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), target["params"])
        params, _ = checkpoint.load_params(workdir, target)
        return cls(config, model, params, workdir)

    @property
    def image_size(self) -> int:
        return self.config.input.image_size

    def predict(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        """uint8 [N, size, size, 3] -> {'intensity': 0-7 [N, 40], 'presence': [N, 40]}."""
        outputs = [self._predict(self.params, pipeline.to_unit_range(images[i:i + batch_size]))
                   for i in range(0, len(images), batch_size)]
        return {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in ("intensity", "presence")}


def read_images(paths: Sequence, size: int, resample: str = "bilinear") -> tuple[np.ndarray, list[int], list[str]]:
    """(uint8 [n, size, size, 3] of the readable files, their indices in `paths`, errors).

    An unreadable or non-image file (text, empty, truncated, a decompression bomb) becomes one
    error line naming it; the rest go on.
    """
    images, kept, errors = [], [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                images.append(pipeline.resize(np.asarray(im.convert("RGB")), size, resample=resample))
            kept.append(i)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            errors.append(f"{path}: cannot read image ({e})")
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, kept, errors


def reference_means(workdir) -> tuple[np.ndarray, str]:
    """Per-head mean intensity over the run's HQ predictions (written by the trainer's
    evaluation): the offsets subtracted to give the published `mean_subtracted` scores."""
    path = pathlib.Path(workdir) / "eval" / "hq_predictions.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the trainer's evaluation first "
                                "(it writes the HQ predictions whose per-head means are subtracted)")
    with np.load(path, allow_pickle=False) as data:
        return data["intensity"].mean(axis=0), f"mean over {len(data['intensity'])} HQ images ({path})"
