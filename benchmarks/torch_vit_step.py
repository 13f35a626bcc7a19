"""The PyTorch baseline of `python -m emonet_jax.bench train_step`: one ViT training step.

    .venv-torch/bin/python benchmarks/torch_vit_step.py --variant=B/16 --res=224 --batch=8 --steps=5
    python benchmarks/torch_vit_step.py --device=cuda --dtype=bfloat16 --batch=256 [--compile]

Prints one JSON line with the keys of our benchmark (images_per_s, median_step_s, p90_step_s,
step_s, params, ...). The step is what a PyTorch user writes: forward, cross-entropy against
random labels, backward, global-norm clipping at 1.0 (our optimizer's default) and AdamW, on
random images, with torch.set_num_threads(os.cpu_count()). With `--device=cuda` the same step
runs on the GPU (autocast there for bfloat16; each timed step ends with a synchronize), and
`--compile` wraps the model in `torch.compile` (compiled during the warm-up steps).

The model is timm's `VisionTransformer` with the variant's dimensions (for B/16 at 224, timm's
`vit_base_patch16_224`) when timm imports. timm 1.0 imports torchvision when it is imported
(`timm.layers.create_norm`), and PyPI's torchvision wheels are CUDA builds whose extension
does not load with the CPU wheel of torch, so in `.venv-torch` timm does not import. Then the
model is `TimmLikeViT` below: the same architecture written here (pre-norm blocks, one fused
qkv projection, `F.scaled_dot_product_attention`, exact GELU, LayerNorm eps 1e-6, class token,
learned position embedding, linear head on the class token), with timm's parameter names, so
that timm's state dict loads into it unchanged. The JSON's `model` says which one ran.

Runs in a venv with torch only (`make torch-venv`); torch is never a project requirement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

# Width, depth, MLP width and heads of emonet_jax.models.vit.SIZES (a test checks they agree).
SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
}
NUM_CLASSES = 1000


def parse_variant(variant: str) -> tuple[tuple[int, int, int, int], int]:
    match = re.fullmatch(r"(\w+)/(\d+)", variant)
    if not match or match[1] not in SIZES:
        raise SystemExit(f"unknown variant {variant!r}; expected SIZE/PATCH with SIZE in {sorted(SIZES)}")
    return SIZES[match[1]], int(match[2])


def timm_like_vit(width, depth, mlp_dim, heads, patch, image_size):
    """A torch ViT with timm VisionTransformer's architecture and parameter names."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
            x = F.scaled_dot_product_attention(q, k, v)
            return self.proj(x.transpose(1, 2).reshape(b, n, width))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
            self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class PatchEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, width, patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class TimmLikeViT(nn.Module):
        def __init__(self):
            super().__init__()
            tokens = (image_size // patch) ** 2
            self.patch_embed = PatchEmbed()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
            self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
            self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=1e-6)
            self.head = nn.Linear(width, NUM_CLASSES)

        def forward(self, images):
            x = self.patch_embed(images)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    return TimmLikeViT()


def build_model(variant: str, image_size: int, force_local: bool):
    """(model, name, why timm was not used or None): timm's VisionTransformer when timm
    imports, else TimmLikeViT."""
    (width, depth, mlp_dim, heads), patch = parse_variant(variant)
    why = "--local_model"
    if not force_local:
        try:
            import timm  # noqa: F401  (needs an importable torchvision)
            from timm.models.vision_transformer import VisionTransformer
        # A CUDA build of torchvision beside CPU torch fails with RuntimeError, not ImportError.
        except (ImportError, RuntimeError, OSError) as e:
            why = f"timm did not import: {type(e).__name__}: {e}"
        else:
            model = VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth,
                                      num_heads=heads, mlp_ratio=mlp_dim / width, num_classes=NUM_CLASSES)
            return model, f"timm {timm.__version__} VisionTransformer", None
    model = timm_like_vit(width, depth, mlp_dim, heads, patch, image_size)
    return model, "TimmLikeViT (written here, timm's architecture)", why



def percentile(values: list[float], q: float) -> float:
    """numpy.percentile's default (linear) rule; .venv-torch has torch only, no numpy."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: torch.autocast (parameters stay float32), like model.compute_dtype")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--local_model", action="store_true", help="use TimmLikeViT even if timm imports")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = parser.parse_args()
    load = os.getloadavg()[0]                  # a shared machine: say how busy it was

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, name, why_not_timm = build_model(args.variant, args.res, args.local_model)
    model = model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    images = (torch.rand(args.batch, 3, args.res, args.res) * 2 - 1).to(args.device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,)).to(args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    forward = torch.compile(model) if args.compile else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss.detach())          # waits for the device: the step is done

    for _ in range(args.warmup):
        step()
    seconds, cpu_seconds = [], []
    for _ in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = step()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    median = percentile(seconds, 50)
    print(json.dumps({
        "benchmark": "torch_vit_step", "model": name, "why_not_timm": why_not_timm, "variant": args.variant, "image_size": args.res,
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "dtype": args.dtype,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "compiled": args.compile,
        "params": sum(p.numel() for p in model.parameters()), "images_per_s": args.batch / median,
        "median_step_s": median, "p90_step_s": percentile(seconds, 90), "step_s": seconds,
        "median_step_cpu_s": percentile(cpu_seconds, 50),
        "loss": loss, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_avg_1min_at_start": load}))


if __name__ == "__main__":
    main()
