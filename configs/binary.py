"""Fine-tuning on EmoNet-Face Binary (expert present/absent votes) from a Big run, evaluated on HQ.

    python -m emonet_jax.main --config=configs/binary.py --workdir=workdirs/binary \
        --config.init_from=workdirs/big
    python -m emonet_jax.main --config=configs/binary.py:demo --workdir=workdirs/binary_demo \
        --config.init_from=workdirs/big_demo
"""

from configs import common


def get_config(arg: str | None = None):
    arg = common.check_arg(arg, ("", "demo"))
    c = common.base()
    c.data.train = (("emonet_face_binary", "train", 1.0),)
    c.loss.soft_label_weight = 0.0
    c.loss.extra_weight = 0.0
    c.total_steps = 3_000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 100
    c.optimizer.layer_decay = 0.75
    if arg == "demo":
        common.demo(c)
        c.total_steps = 100
        c.optimizer.lr = 3e-4
    return c
