"""PyTorch baseline for `python -m emonet_jax.bench heads`: the 40 heads trained one after another.

    .venv-torch/bin/python benchmarks/torch_heads.py --variant=small --examples=20000 --epochs=3 --batch=256

What a straightforward port of the published recipe does: 40 separate `nn.Sequential` MLPs
(Small 1152->128->32->1, Large 1152->1024->512->256->1, ReLU + dropout), each trained on its
own with Adam and a mean squared error, batch after batch, head after head. Inputs are the
same kind of data the JAX benchmark uses: random float32 embeddings and 0-7 targets, every
(image, emotion) pair labelled. Prints one JSON object with the same keys as the JAX side
(`seconds`: wall time of the 40 trainings; `images_per_s`: examples x epochs / seconds).

Runs in its own venv (`make torch-venv`: torch only, CPU wheel, no numpy); torch is never a
project dependency, so this file imports nothing from emonet_jax.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

# Kept equal to emonet_jax.models.heads.VARIANTS (this file cannot import the project).
VARIANTS = {"small": (128, 32), "large": (1024, 512, 256)}
NUM_HEADS = 40


def make_head(dim: int, hidden: tuple[int, ...], dropout: float) -> nn.Sequential:
    layers, width = [], dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def train_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
               generator: torch.Generator) -> float:
    """Trains one head in place; returns its last batch loss."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    head.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            rows = order[start:start + batch]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(head(x[rows]).squeeze(-1), y[rows])
            loss.backward()
            opt.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heads", type=int, default=NUM_HEADS, help="fewer heads for a quick trial")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.examples, args.dim, generator=generator)
    targets = 7 * torch.rand(args.examples, NUM_HEADS, generator=generator)
    hidden = VARIANTS[args.variant]
    # Not timed, as the JAX side does not time its compilation: torch's first steps set up
    # its kernels (oneDNN primitives), a few seconds once per process.
    warm = args.batch + args.examples % args.batch  # a full batch and the epoch's last, shorter one
    train_head(make_head(args.dim, hidden, args.dropout), x[:warm], targets[:warm, 0], 1, args.batch, args.lr,
               torch.Generator().manual_seed(args.seed))
    load = os.getloadavg()[0]
    start, start_cpu = time.perf_counter(), time.process_time()
    last_losses = []
    for h in range(args.heads):
        head = make_head(args.dim, hidden, args.dropout)
        last_losses.append(train_head(head, x, targets[:, h].contiguous(), args.epochs, args.batch, args.lr,
                                      generator))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    print(json.dumps({
        "benchmark": "heads", "framework": f"torch {torch.__version__}", "mode": "one head after another",
        "variant": args.variant, "hidden": list(hidden), "dim": args.dim, "heads": args.heads,
        "examples": args.examples, "epochs": args.epochs, "batch": args.batch, "threads": args.threads,
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 2), "images_per_s": round(args.examples * args.epochs / seconds, 1),
        "final_batch_loss_mean": round(sum(last_losses) / len(last_losses), 4), "load_avg_1min_at_start": round(load, 2)}))


if __name__ == "__main__":
    main()
