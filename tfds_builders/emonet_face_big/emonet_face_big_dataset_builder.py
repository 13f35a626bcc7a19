"""EmoNet-Face BIG: `tfds build tfds_builders/emonet_face_big --config=224 [--manual_dir=DIR]`."""

from emonet_jax.data import builder


class Builder(builder.EmoNetFaceBuilder):
    """laion/emonet-face-big as array_record shards (see emonet_jax/data/builder.py)."""

    kind = "big"
    HF_REPO = "laion/emonet-face-big"
    VALIDATION_PERCENT = 2.0
