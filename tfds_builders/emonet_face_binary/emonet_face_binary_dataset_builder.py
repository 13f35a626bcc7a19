"""EmoNet-Face BINARY: `tfds build tfds_builders/emonet_face_binary --config=224 [--manual_dir=DIR]`."""

from emonet_jax.data import builder


class Builder(builder.EmoNetFaceBuilder):
    """laion/emonet-face-binary as array_record shards (see emonet_jax/data/builder.py)."""

    kind = "binary"
    HF_REPO = "laion/emonet-face-binary"
    # Held out by image id for threshold selection and the Binary table.
    VALIDATION_PERCENT = 10.0
