"""EmoNet-Face HQ, the paper's target: train on Big + Binary, evaluate agreement on HQ.

    python -m emonet_jax.main --config=configs/hq.py --workdir=workdirs/hq
    # Start from a pre-trained run instead of from scratch:
    python -m emonet_jax.main --config=configs/hq.py --workdir=workdirs/hq \
        --config.init_from=workdirs/big
    # Synthetic EmoNet-Face, a tiny ViT and 48 px images, for a laptop CPU (`make demo`):
    python -m emonet_jax.main --config=configs/hq.py:demo --workdir=workdirs/demo

Real records are prepared once with `python -m emonet_jax.data.prepare --dataset=hq|binary|big`
(or `tfds build tfds_builders/emonet_face_hq --config=224`).
"""

from configs import common


def get_config(arg: str | None = None):
    arg = common.check_arg(arg, ("", "demo"))
    c = common.base()
    c.total_steps = 20_000
    if arg == "demo":
        common.demo(c)
    return c
