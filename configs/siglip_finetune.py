"""Full fine-tuning of a pretrained SigLIP / SigLIP2 image tower on EmoNet-Face (Big + Binary,
evaluated on HQ): the alternative to EmpathicInsight-Face's frozen tower + heads.

    # SigLIP2 So400m/14 at 384 px (big_vision .npz or a Hugging Face folder):
    python -m emonet_jax.main --config=configs/siglip_finetune.py:so400m --workdir=workdirs/ft_so400m \
        --config.model.pretrained=/path/to/siglip2-so400m-patch14-384
    # SigLIP2 B/16 at 224 px:
    python -m emonet_jax.main --config=configs/siglip_finetune.py:b16 --workdir=workdirs/ft_b16 \
        --config.model.pretrained=/path/to/siglip2-base-patch16-224
    # CPU smoke run: the tiny random SigLIP tower the tests ship, on the synthetic data:
    python -m emonet_jax.main --config=configs/siglip_finetune.py:demo --workdir=workdirs/ft_demo

The tower starts from `model.pretrained` (its variant must match `model.variant`; the position
embedding is resized to `input.image_size`), the emotion heads from zero. The tower learns
slowly: layer-wise LR decay (block i of D at lr * 0.8^(D - i), heads at lr), a low peak LR,
warmup, no flips (the faces' one-sided cues change meaning when mirrored).
"""

import pathlib

from configs import common

SIZES = {"so400m": ("So400m/14", 384), "b16": ("B/16", 224)}
DEMO_TOWER = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "siglip_tiny" / "vision"


def get_config(arg: str | None = None):
    arg = common.check_arg(arg, ("", *SIZES, "demo"))
    c = common.base()
    c.model.variant, c.input.image_size = SIZES.get(arg or "so400m", SIZES["so400m"])
    c.data.resolution = c.input.image_size
    c.model.pool = "map"
    c.model.compute_dtype = "bfloat16"
    c.input.flip = False
    c.total_steps = 10_000
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.layer_decay = 0.8
    c.optimizer.weight_decay = 1e-4
    if arg == "demo":
        common.demo(c)
        c.model.variant = "mu/8"          # the shape of the tiny tower in tests/fixtures
        c.model.compute_dtype = "float32"
        c.model.pretrained = str(DEMO_TOWER)
        c.total_steps = 100
        c.optimizer.lr = 1e-3
    return c
