"""Pre-trains the demo's image tower on synthetic faces, without any emotion label.

The paper's model reads frozen SigLIP2 embeddings; SigLIP2 learned what faces look like from
web images and captions long before anyone rated an emotion. The demo (`configs/hq.py:demo`)
mirrors that: its ViT tower is pre-trained here to describe the *geometry* of synthetic faces
(the 18 facial parameters the renderer drew: brow height, lid opening, lip corners, ...) on
faces that are not in any demo split, then frozen while the demo learns the 40 emotions from
the Big VLM labels and Binary votes alone. Which emotions a geometry means, and how raters
label it, the tower never sees.

    python experiments/pretrain_demo_tower.py --out=emonet_jax/assets/demo_tower.npz

writes the tower as a big_vision .npz (loaded by `models/pretrained.py`, like a SigLIP
checkpoint) and a JSON card beside it with the command's arguments, the held-out R^2 of each
facial parameter and the time taken. Deterministic for a given seed on a given machine.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from emonet_jax.data import faces, pipeline, prepare, sources, synthetic
from emonet_jax.models import pretrained
from emonet_jax.models.vit import ViT

# The demo's splits use generator seeds 0..2 (configs/common.py demo(), seed 0); these faces
# come from another seed, so no demo image is seen here.
PRETRAIN_SEED = 20_251_122
HELD_OUT = 1_000


def render(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, size, size, 3], facial parameters [n, 18]) of one chunk.

    Drawn like the demo's records: a PNG at the synthetic data's original size, then the
    builders' own resize and JPEG encoding (`sources.encode_image`) to the record size.
    """
    start, count, size = args
    images, params = [], []
    for image in synthetic.images(count, PRETRAIN_SEED, prepare.SyntheticSpec.image_size, id_offset=start):
        record = sources.encode_image(image.png, size)
        images.append(np.asarray(Image.open(io.BytesIO(record)).convert("RGB")))
        params.append(image.params)  # faces.expression_params already clipped them to PARAM_LIMIT
    return np.stack(images), np.stack(params).astype(np.float32)


def faces_dataset(num: int, size: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    chunk = 1_000
    jobs = [(s, min(chunk, num - s), size) for s in range(0, num, chunk)]
    with multiprocessing.Pool(workers) as pool:
        parts = pool.map(render, jobs)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class GeometryReader(nn.Module):
    """The tower (named `img`, as in EmotionModel) and a linear read-out of the parameters."""
    img: ViT
    num_outputs: int

    @nn.compact
    def __call__(self, x):
        embedding, _ = self.img(x)
        return nn.Dense(self.num_outputs, name="readout")(embedding.astype(jnp.float32))


def train(args) -> dict:
    start = time.time()
    cache = pathlib.Path(args.cache) if args.cache else None
    if cache and cache.exists():
        with np.load(cache) as data:
            images, params = data["images"], data["params"]
    else:
        images, params = faces_dataset(args.faces + HELD_OUT, args.record_size, args.workers)
        if cache:
            np.savez(cache, images=images, params=params)
    if len(images) != args.faces + HELD_OUT:
        raise ValueError(f"{cache} holds {len(images)} faces, not --faces + {HELD_OUT}")
    render_seconds = time.time() - start
    num_train = args.faces
    mean, std = params[:num_train].mean(0), params[:num_train].std(0) + 1e-6
    target = (params - mean) / std
    tower = ViT.from_variant(args.variant, pool="map", dtype=jnp.dtype(args.compute_dtype))
    model = GeometryReader(tower, params.shape[1])
    variables = model.init(jax.random.key(args.seed), jnp.zeros((1, args.image_size, args.image_size, 3)))
    init_card = None
    if args.init:
        # Continue from an earlier tower (a second cosine cycle); the read-out starts fresh.
        loaded, _ = pretrained.init_tower(variables["params"], args.init)
        variables = {"params": loaded}
        init_card = json.loads(pathlib.Path(args.init).with_suffix(".json").read_text())
    schedule = optax.warmup_cosine_decay_schedule(0, args.lr, args.warmup, args.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=args.weight_decay))
    opt_state = tx.init(variables)

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss_fn(v):
            return jnp.mean(jnp.square(model.apply(v, x) - y))
        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    predict = jax.jit(model.apply)
    # The demo's own training augmentation (a mild random resized crop, no flip: some cues
    # are one-sided), so the frozen tower has seen faces framed the way the demo shows them.
    augment = pipeline.Augment(scale=tuple(args.crop_scale), flip=False)
    rng = np.random.default_rng(args.seed)
    eval_x = np.stack([pipeline.resize(im, args.image_size) for im in images[num_train:]])
    eval_x = pipeline.to_unit_range(eval_x)
    recent, train_start = [], time.time()
    for i in range(args.steps):
        rows = rng.integers(0, num_train, args.batch)
        x = pipeline.to_unit_range(np.stack([pipeline.augment_image(images[r], rng, args.image_size, augment)
                                             for r in rows]))
        variables, opt_state, loss = step(variables, opt_state, x, target[rows])
        recent = (recent + [float(loss)])[-200:]
        if (i + 1) % args.log_every == 0:
            print(f"step {i + 1}: loss {np.mean(recent):.4f} ({time.time() - train_start:.0f} s)", flush=True)
    held_out = np.concatenate([np.asarray(predict(variables, eval_x[j:j + 500])) for j in range(0, len(eval_x), 500)])
    truth = target[num_train:]
    r2 = 1 - ((held_out - truth) ** 2).mean(0) / truth.var(0)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pretrained.save_big_vision(out, variables["params"]["img"])
    card = {"command": "python " + " ".join(sys.argv), "args": vars(args), "pretrain_seed": PRETRAIN_SEED,
            "objective": "MSE regression of the 18 standardised facial parameters (faces.FACIAL_PARAMS); "
                         "no emotion label, rating or vote",
            "held_out_faces": HELD_OUT, "held_out_r2_mean": round(float(r2.mean()), 4),
            "held_out_r2": {n: round(float(v), 3) for n, v in zip(faces.FACIAL_PARAMS, r2)},
            "final_train_loss": round(float(np.mean(recent)), 4),
            "init": init_card,
            "render_seconds": round(render_seconds), "train_seconds": round(time.time() - train_start),
            "jax": jax.__version__, "backend": jax.default_backend()}
    out.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", default="xs/8")
    parser.add_argument("--faces", type=int, default=40_000)
    parser.add_argument("--record_size", type=int, default=64, help="the demo's record resolution")
    parser.add_argument("--image_size", type=int, default=48, help="the demo's input resolution")
    parser.add_argument("--crop_scale", type=float, nargs=2, default=(0.85, 1.0))
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--compute_dtype", default="float32")
    parser.add_argument("--cache", default="", help="an .npz that keeps the rendered faces between runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", default="", help="a tower .npz written by this script (its .json card beside it) "
                                                    "to continue from; the card is kept in the new one's")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--log_every", type=int, default=500)
    print(json.dumps(train(parser.parse_args())))


if __name__ == "__main__":
    main()
