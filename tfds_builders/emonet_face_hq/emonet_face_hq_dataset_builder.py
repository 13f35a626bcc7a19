"""EmoNet-Face HQ: `tfds build tfds_builders/emonet_face_hq --config=224 [--manual_dir=DIR]`."""

from emonet_jax.data import builder


class Builder(builder.EmoNetFaceBuilder):
    """laion/emonet-face-hq as array_record shards (see emonet_jax/data/builder.py)."""

    kind = "hq"
    HF_REPO = "laion/emonet-face-hq"
    # HQ is the benchmark: one split, all images.
    SINGLE_SPLIT = "test"
