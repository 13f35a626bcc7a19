"""Pre-training on EmoNet-Face Big (VLM rating distributions), evaluated on HQ.

    python -m emonet_jax.main --config=configs/big.py --workdir=workdirs/big
    python -m emonet_jax.main --config=configs/big.py:demo --workdir=workdirs/big_demo
"""

from configs import common


def get_config(arg: str | None = None):
    arg = common.check_arg(arg, ("", "demo"))
    c = common.base()
    c.data.train = (("emonet_face_big", "train", 1.0),)
    c.loss.binary_weight = 0.0
    c.total_steps = 30_000
    if arg == "demo":
        common.demo(c)
    return c
