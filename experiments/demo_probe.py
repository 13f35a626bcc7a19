"""Why the demo model does not reach expert level: small in-memory probes on the synthetic world.

Not part of the package; the figures quoted in BENCHMARKS.md ("demo") come from these commands:

    python experiments/demo_probe.py gen --num=4000 --seed=11 --out=/tmp/probe/big_11.npz   # also 12, 13, 14
    python experiments/demo_probe.py train --data=/tmp/probe --steps=1000 --target=clean --arch=cnn
    python experiments/demo_probe.py train --data=/tmp/probe --steps=1000 --target=clean --pool=none

`gen` renders Big-like 64 px faces with their VLM ratings and the noise-free reading of each face
(`faces.read_expression` of its parameters: what every rater perceives before judgement noise).
`train` fits an EmotionModel (soft-label cross-entropy on one-hot targets, AdamW, warmup + cosine)
on the first `--num_train` images with either the VLM ratings (`--target=vlm`, what the demo has)
or the rounded noise-free reading (`--target=clean`, the best case), then reports the per-emotion
Spearman rho with the noise-free reading on 500 held-out images and the mean kappa against the
synthetic experts on the demo's HQ split (its expected intensity as the rating, and rounded).
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from scipy.stats import spearmanr

from emonet_jax import losses, taxonomy
from emonet_jax.data import faces, pipeline, prepare, synthetic
from emonet_jax.evaluate import agreement, model_eval
from emonet_jax.models import emonet
from emonet_jax.models.vit import ViT

HELD_OUT = 500


def generate(num: int, seed: int, out: str) -> None:
    vlm = synthetic.Raters(synthetic.VLM, ("vlm",), 1)
    images, ratings, clean = [], [], []
    for image in synthetic.images(num, seed, 64):
        images.append(np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB")))
        by_key = synthetic.vlm_ratings(image, vlm, seed)
        ratings.append([by_key[taxonomy.key_of(e)] for e in range(taxonomy.NUM_EMOTIONS)])
        clean.append(faces.read_expression(image.params, synthetic._MATRIX))
    np.savez(out, images=np.stack(images), vlm=np.array(ratings, np.int32), clean=np.array(clean, np.float32))


class Pixels(nn.Module):
    """The raw pixels, flattened: a linear model on them."""

    @nn.compact
    def __call__(self, x, train=False):
        return x.reshape(x.shape[0], -1), {}


class SmallCNN(nn.Module):
    """Three stride-2 3x3 convolutions, flattened (position kept)."""

    @nn.compact
    def __call__(self, x, train=False):
        for width in (32, 64, 128):
            x = nn.relu(nn.Conv(width, (3, 3), strides=2)(x))
        return x.reshape(x.shape[0], -1), {}


def tower(args) -> nn.Module:
    if args.arch == "linear":
        return Pixels()
    if args.arch == "cnn":
        return SmallCNN()
    return ViT(width=args.width, depth=args.depth, mlp_dim=2 * args.width, num_heads=args.heads,
               patch_size=args.patch, pool=args.pool)


def demo_hq() -> tuple[list[str], np.ndarray, np.ndarray]:
    """The demo's synthetic HQ split (configs/common.py demo(): seed 0, 120 images, 64 px)."""
    spec = prepare.SyntheticSpec(num_hq=120, num_binary=400, num_big=1200, seed=0)
    data_dir = prepare.prepare_synthetic(pathlib.Path(tempfile.gettempdir()) / "demo_probe_records", 64, spec)["data_dir"]
    source = pipeline.open_split("emonet_face_hq/64", "test", data_dir)
    _, names, table = model_eval.read_expert_ratings(source)
    return names, table, np.stack([np.asarray(source[i]["image"]) for i in range(len(source))])


def train(args) -> dict:
    files = sorted(pathlib.Path(args.data).glob("*.npz"))
    data = [np.load(f) for f in files]
    images = np.concatenate([d["images"] for d in data])[:args.num_train + HELD_OUT]
    vlm = np.concatenate([d["vlm"] for d in data])[:len(images)]
    clean = np.concatenate([d["clean"] for d in data])[:len(images)]
    num_train = len(images) - HELD_OUT
    model = emonet.EmotionModel(img=tower(args), extra_head=False)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0, args.lr, 100, args.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    opt_state = tx.init(params)
    one_hot = np.eye(8, dtype=np.float32)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, pipeline.to_unit_range(x), train=True)["logits"]
            total, count = losses.soft_label_ce(logits, y, jnp.ones(y.shape[:2], bool))
            return total / count
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, x):
        return emonet.expected_intensity(model.apply({"params": params}, pipeline.to_unit_range(x))["logits"])

    rng = np.random.default_rng(0)
    start, recent = time.time(), []
    for i in range(args.steps):
        idx = rng.integers(0, num_train, args.batch)
        target = vlm[idx] if args.target == "vlm" else np.clip(np.round(clean[idx]), 0, 7).astype(int)
        params, opt_state, loss = step(params, opt_state, images[idx], one_hot[target])
        recent = (recent + [float(loss)])[-100:]
        if (i + 1) % 500 == 0:
            print(f"step {i + 1}: loss {np.mean(recent):.4f} ({time.time() - start:.0f} s)", flush=True)
    held_out = np.concatenate([predict(params, images[j:j + 250]) for j in range(num_train, len(images), 250)])
    rho = np.nanmean([spearmanr(held_out[:, e], clean[num_train:, e])[0] for e in range(taxonomy.NUM_EMOTIONS)])
    names, table, hq_images = demo_hq()
    hq = np.asarray(predict(params, hq_images))
    kappa = {}
    for readout, ratings in (("expected", hq), ("rounded", np.round(hq))):
        result = agreement.hq_agreement(np.concatenate([table, ratings[None].astype(float)]), names + ["model"],
                                        [True] * len(names) + [False], full=False)
        kappa[readout] = result["annotators"]["model"]["mean_kappa"]
    median_expert = float(np.median([result["annotators"][n]["mean_kappa"] for n in names]))
    return {**vars(args), "final_loss": float(np.mean(recent)), "rho_clean_held_out": float(rho),
            "model_kappa": kappa, "median_expert_kappa": median_expert, "seconds": round(time.time() - start)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("gen")
    gen.add_argument("--num", type=int, default=4000)
    gen.add_argument("--seed", type=int, required=True)
    gen.add_argument("--out", required=True)
    fit = sub.add_parser("train")
    fit.add_argument("--data", required=True, help="folder of `gen` outputs")
    fit.add_argument("--num_train", type=int, default=15_500)
    fit.add_argument("--steps", type=int, default=1000)
    fit.add_argument("--batch", type=int, default=64)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--target", choices=("vlm", "clean"), default="vlm")
    fit.add_argument("--arch", choices=("vit", "cnn", "linear"), default="vit")
    fit.add_argument("--pool", choices=("gap", "map", "none"), default="gap")
    fit.add_argument("--width", type=int, default=64)
    fit.add_argument("--depth", type=int, default=4)
    fit.add_argument("--heads", type=int, default=4)
    fit.add_argument("--patch", type=int, default=8)
    args = parser.parse_args()
    if args.command == "gen":
        generate(args.num, args.seed, args.out)
    else:
        print(json.dumps(train(args)))


if __name__ == "__main__":
    main()
