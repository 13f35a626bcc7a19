"""Defaults shared by the configs; each config file starts from `base()` and overrides.

Every key is listed here, so `--config.some_key=...` on any config either sets a real key
or fails naming the key that does not exist.
"""

import pathlib

import ml_collections

import emonet_jax

# The demo's pre-trained image tower (made by experiments/pretrain_demo_tower.py; its card,
# demo_tower.json beside it, says how and how well it reads the synthetic faces).
DEMO_TOWER = pathlib.Path(emonet_jax.__file__).parent / "assets" / "demo_tower.npz"


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 10_000
    c.batch_size = 256                # global, over all processes and devices
    c.grad_accum_steps = 1            # micro-batches per step (batch_size must divide)
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1_000
    c.eval_every_steps = 2_000        # 0: only the final evaluation
    c.keep_checkpoints = 3
    c.init_from = ""                  # a workdir (or checkpoint dir) whose params start this run
    c.init_skip = ()                  # regexes of params that keep their fresh init (e.g. new heads)

    # Mesh axes (data, fsdp); -1 = all remaining devices. Parameters matching an 'fsdp' rule
    # are split over the fsdp axis, the rest replicated; the first matching rule wins.
    c.mesh = (("data", -1), ("fsdp", 1))
    c.sharding_rules = ((".*", "fsdp"),)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.resolution = 224           # builder config of the prepared records
    c.data.synthetic = False          # generate + prepare the synthetic EmoNet-Face instead
    c.data.num_hq = 0                 # synthetic sizes (used only when synthetic)
    c.data.num_binary = 0
    c.data.num_big = 0
    # (dataset, split, weight): each global batch takes rows from every source in
    # proportion to its weight (the per-source sampling rate).
    c.data.train = (("emonet_face_big", "train", 3.0), ("emonet_face_binary", "train", 1.0))
    c.data.eval = ("emonet_face_hq", "test")

    c.input = ml_collections.ConfigDict()
    c.input.image_size = 224
    c.input.eval_crop = 1.0           # faces are centred and fill the frame; no crop at eval
    c.input.crop_scale = (0.6, 1.0)   # random-resized-crop area range at training
    c.input.flip = True
    c.input.num_workers = 0           # grain worker processes (0: threads in-process)
    c.input.threads = 8
    c.input.in_memory = False         # decode each row once and keep it in host memory (small splits)

    c.model = ml_collections.ConfigDict()
    c.model.variant = "B/16"          # Ti|S|M|B|L|So400m / patch
    c.model.pool = "map"              # map (SigLIP) | gap | tok
    c.model.posemb = "learn"
    c.model.dropout = 0.0
    c.model.scan = False              # nn.scan over blocks (big_vision's scanned param layout)
    c.model.remat = False             # recompute activations in the backward pass
    c.model.compute_dtype = "float32"  # or bfloat16 (parameters stay float32)
    c.model.attention = "xla"         # or cudnn: fused attention on NVIDIA GPUs (bfloat16 only)
    c.model.head_hidden = ()          # hidden widths of an MLP before the emotion head
    c.model.head_dropout = 0.0
    c.model.extra_head = True         # valence / arousal / dominance / vulnerability
    c.model.pretrained = ""           # SigLIP/SigLIP2 tower: big_vision .npz or HF folder (models/pretrained.py)

    c.loss = ml_collections.ConfigDict()
    c.loss.soft_label_weight = 1.0    # CE against the rating distribution (HQ, Big)
    c.loss.binary_weight = 1.0        # BCE of P(present) against the Binary votes
    c.loss.binary_soft_targets = True  # target = share of "present" votes, else the majority
    c.loss.extra_weight = 0.1
    c.loss.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-3
    c.optimizer.min_lr_ratio = 0.0
    c.optimizer.warmup_steps = 500
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip_norm = 1.0  # 0: off
    c.optimizer.freeze = ()           # regexes, e.g. ('img/.*',) for a linear probe
    c.optimizer.layer_decay = 1.0     # < 1: layer-wise LR decay down the tower
    return c


def demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Synthetic EmoNet-Face, small images and a small ViT: the whole path on a laptop CPU."""
    c.data.synthetic = True
    c.data.data_dir = "workdirs/cache/synthetic"
    c.data.resolution = 64
    c.data.num_hq = 120
    c.data.num_binary = 400
    c.data.num_big = 1200
    c.input.image_size = 48
    c.input.threads = 2
    c.input.in_memory = True          # a few thousand 64 px rows: decoding them at each read bounds the step rate
    # The synthetic faces draw some cues on one side (a one-sided lip corner means contempt,
    # its mirror image doubt), so a horizontal flip would change the label.
    c.input.flip = False
    c.model.variant = "mu/8"
    c.batch_size = 32
    c.total_steps = 300
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    c.eval_every_steps = 150
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 30
    return c


def demo_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's recipe in the synthetic world: a frozen pre-trained tower and a small MLP
    head trained on the Big VLM labels and the Binary votes.

    A ViT trained from scratch on a few thousand faces does not learn to read them in minutes
    (BENCHMARKS.md, "Demo"); EmpathicInsight-Face does not either: it starts from SigLIP2. The
    stand-in for SigLIP2 was pre-trained on other synthetic faces to describe their geometry,
    never on an emotion label.
    """
    c.model.variant = "xs/8"
    c.model.pretrained = str(DEMO_TOWER)
    c.optimizer.freeze = ("img/.*",)
    c.model.head_hidden = (1024,)     # 256 -> 1024: kappa +0.006 to +0.010 in each of three synthetic worlds (BENCHMARKS.md "Demo")
    c.input.crop_scale = (0.85, 1.0)  # a larger crop can cut away the mouth or the brows
    return c


def check_arg(arg: str | None, allowed: tuple[str, ...]) -> str:
    arg = arg or ""
    if arg not in allowed:
        raise ValueError(f"unknown config argument {arg!r}; expected one of {allowed}")
    return arg
