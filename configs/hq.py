"""EmoNet-Face HQ, the paper's benchmark.

    python -m emonet_jax.main --config=configs/hq.py --workdir=workdirs/hq
    # Synthetic EmoNet-Face and small images, for a laptop CPU (what `make demo` runs):
    python -m emonet_jax.main --config=configs/hq.py:demo --workdir=workdirs/demo

Real records are prepared once with `python -m emonet_jax.data.prepare --dataset=hq|binary|big`
(or `tfds build tfds_builders/emonet_face_hq --config=224`). The demo generates and prepares
the synthetic splits on first use under `data.data_dir`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.data_dir = "~/tensorflow_datasets"
    config.data.resolution = 224          # builder config of the prepared records
    config.data.synthetic = False
    # (dataset, split) pairs; training mixes are the trainer's business.
    config.data.train = (("emonet_face_big", "train"), ("emonet_face_binary", "train"))
    config.data.eval = ("emonet_face_hq", "test")

    config.input = ml_collections.ConfigDict()
    config.input.image_size = 224
    config.input.batch_size = 256         # global, over all processes
    config.input.eval_crop = 0.875
    config.input.num_workers = 0          # grain worker processes (0: threads in-process)
    config.input.threads = 8

    if arg == "demo":
        config.data.synthetic = True
        config.data.data_dir = "workdirs/cache/synthetic"
        config.data.resolution = 64
        config.data.num_hq = 120
        config.data.num_binary = 400
        config.data.num_big = 1200
        config.input.image_size = 48
        config.input.batch_size = 32
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected '' or 'demo'")
    return config
