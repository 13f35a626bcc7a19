"""EmpathicInsight-Face: 40 MLP heads on frozen SigLIP2 So400m embeddings (emonet_jax/heads_train.py).

    # Embed the splits once (python -m emonet_jax.embed), then:
    python -m emonet_jax.heads_train --config=configs/empathic_insight.py:small --workdir=workdirs/ei_small
    python -m emonet_jax.heads_train --config=configs/empathic_insight.py:large --workdir=workdirs/ei_large
    # Let the trainer make the caches from the prepared records first:
    python -m emonet_jax.heads_train --config=configs/empathic_insight.py:small --workdir=workdirs/ei_small \
        --config.embed.backbone=/path/to/siglip2-so400m-patch16-384
    # Synthetic EmoNet-Face embedded by the tiny test tower, a few minutes on a laptop CPU:
    python -m emonet_jax.heads_train --config=configs/empathic_insight.py:small:demo --workdir=workdirs/ei_demo

Arguments: `small` (1152->128->32->1 per emotion) or `large` (1152->1024->512->256->1), then
optionally `:demo`. The demo generates and prepares the synthetic EmoNet-Face at 64 px (the
same records as `make demo`), embeds every split it needs with the random-weight SigLIP tower
in tests/fixtures/siglip_tiny/vision (32 px, 32-d embeddings; caches under
RECORDS/embeddings, made once, resumable), then runs the real recipe on them.

The published recipe's hyper-parameters are not public; the defaults below are ours.
"""

import ml_collections

from configs import common

SMALL, LARGE = (128, 32), (1024, 512, 256)  # = emonet_jax.models.heads.VARIANTS
DEMO_BACKBONE = "tests/fixtures/siglip_tiny/vision"


def stage(split: str, val_split: str, target: str, epochs: int, lr: float, warmup_steps: int):
    s = ml_collections.ConfigDict()
    s.split = split                  # DATASET:SPLIT, read at data.resolution
    s.cache = ""                     # its embedding cache; '' = data.cache_dir/<dataset>_<res>_<split>
    s.val_split = val_split          # '' = no validation loss
    s.val_cache = ""
    s.target = target                # intensity (mean VLM rating, MSE) | presence (expert votes)
    s.epochs = epochs                # 0 skips the stage
    s.batch_size = 256
    s.lr = lr
    s.warmup_steps = warmup_steps
    s.min_lr_ratio = 0.01
    s.b1 = 0.9
    s.b2 = 0.999
    s.weight_decay = 1e-4
    return s


def get_config(arg: str | None = None):
    variant, _, demo = (arg or "").partition(":")
    variant = common.check_arg(variant, ("small", "large"))
    common.check_arg(demo, ("", "demo"))
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.log_every_steps = 100
    c.keep_checkpoints = 2
    c.export_dir = ""                # '' = WORKDIR/export

    c.model = ml_collections.ConfigDict()
    c.model.variant = variant
    c.model.hidden = ()              # () = the variant's sizes
    c.model.dropout = 0.1 if variant == "small" else 0.2
    c.model.input_norm = "none"      # none (the raw pooled embedding, as published) | l2
    # Operand dtype of the heads' products while training (float32 accumulation; parameters,
    # embeddings, optimizer and evaluation stay float32). bfloat16 gave the float32 loss curves
    # to 4 digits and trains several times faster on CPUs with AMX (Sapphire Rapids+), GPUs and
    # TPUs, 1.6x faster on AVX-512 BF16 (Zen 4; BENCHMARKS.md "Heads"); use float32 on a CPU
    # without bf16 units (no amx_bf16 / avx512_bf16 in its flags).
    c.model.compute_dtype = "bfloat16"

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "~/tensorflow_datasets"   # the prepared TFDS records (for embedding and HQ's rater names)
    c.data.resolution = 384          # builder config of the records the caches were made from
    c.data.cache_dir = ""            # '' = RECORDS/embeddings
    c.data.synthetic = False         # generate + prepare the synthetic EmoNet-Face first
    c.data.synthetic_seed = 0
    c.data.num_hq = 0
    c.data.num_binary = 0
    c.data.num_big = 0

    # Making missing caches (emonet_jax/embed.py); '' = the caches must exist already.
    c.embed = ml_collections.ConfigDict()
    c.embed.backbone = ""
    c.embed.batch_size = 64
    c.embed.image_size = 0           # 0 = the checkpoint's resolution
    c.embed.dtype = "float32"
    c.embed.shard_size = 4096
    c.embed.threads = 8

    c.pretrain = stage("emonet_face_big:train", "emonet_face_big:validation", "intensity", epochs=10, lr=1e-3,
                       warmup_steps=500)
    c.finetune = stage("emonet_face_binary:train", "emonet_face_binary:validation", "presence", epochs=10,
                       lr=1e-4, warmup_steps=100)

    c.eval = ml_collections.ConfigDict()
    c.eval.split = "emonet_face_hq:test"  # required: HQ agreement, and the means the export subtracts
    c.eval.cache = ""
    c.eval.data_dir = ""             # HQ records holding the experts' names; '' = the cache's meta.json data_dir
    c.eval.batch_size = 4096

    if demo:
        c.data.data_dir = "workdirs/cache/synthetic"  # shared with `make demo`: same records
        c.data.resolution = 64
        c.data.synthetic = True
        c.data.num_hq, c.data.num_binary, c.data.num_big = 120, 400, 1200
        c.embed.backbone = DEMO_BACKBONE
        c.embed.threads = 2
        c.log_every_steps = 20
        for s in (c.pretrain, c.finetune):
            s.batch_size = 64
            s.epochs = 30
            s.warmup_steps = 20
        c.pretrain.lr, c.finetune.lr = 3e-3, 3e-4
    return c
