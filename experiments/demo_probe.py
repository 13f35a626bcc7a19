"""Why the demo model does not reach expert level: small in-memory probes on the synthetic world.

Not part of the package; the figures quoted in BENCHMARKS.md ("demo") come from these commands:

    python experiments/demo_probe.py gen --num=4000 --seed=11 --out=/tmp/probe/big_11.npz   # also 12, 13, 14
    python experiments/demo_probe.py train --data=/tmp/probe --steps=1000 --target=clean --arch=cnn
    python experiments/demo_probe.py train --data=/tmp/probe --steps=1000 --target=clean --pool=none

`gen` renders Big-like 64 px faces with their VLM ratings and the noise-free reading of each face
(`faces.read_expression` of its parameters: what every rater perceives before judgement noise).
`ceiling`, `params_mlp` and `params_cnn` split the problem in two (session 4):

    python experiments/demo_probe.py ceiling --num=600                 # kappa of oracles vs the experts
    python experiments/demo_probe.py params_mlp --noise=0.28           # true face params (+ noise) -> VLM labels
    python experiments/demo_probe.py params_cnn --data=/tmp/probe --steps=800   # pixels -> the 18 face params

`ceiling` scores oracles as one more annotator beside 8 synthetic experts on `--num` HQ-like faces
(no rendering): the latent intensities, the noise-free reading, E[VLM rating | face] (mean of 40
VLM draws), and the noise-free reading shrunk towards its mean. `params_mlp` trains an MLP from
the true facial parameters (optionally plus Gaussian noise, `--noise` = share of each parameter's
variance, i.e. 1 - R^2 of a vision model reading them) to the VLM ratings, and reports its kappa
on those HQ-like faces: what a tower that reads the face this well could reach. `params_cnn`
regresses the parameters from the pixels with the `cnn` tower and reports the held-out R^2 per
parameter: how well a small tower reads the face when told what to look at.

`spread` stretches a demo run's HQ scores around their mean (session 5), and also shifts them by
+0.5 so that the paper's truncation rounds them (session 7):

    python experiments/demo_probe.py spread --workdir=workdirs/demo --data_dir=workdirs/cache/synthetic/synthetic-<hash>

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
    images, ratings, clean, params = [], [], [], []
    for image in synthetic.images(num, seed, 64):
        params.append(image.params)
        images.append(np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB")))
        by_key = synthetic.vlm_ratings(image, vlm, seed)
        ratings.append([by_key[taxonomy.key_of(e)] for e in range(taxonomy.NUM_EMOTIONS)])
        clean.append(faces.read_expression(image.params, synthetic._MATRIX))
    np.savez(out, images=np.stack(images), vlm=np.array(ratings, np.int32), clean=np.array(clean, np.float32),
             params=np.array(params, np.float32))


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


# --- the problem in two halves: reading the face, and the readout from what is read ----------

EXPERT_NAMES = synthetic.EXPERT_NAMES


def hq_like(num: int, seed: int) -> tuple[list[synthetic.Image], np.ndarray]:
    """(faces without pixels, expert table [8, N, 40] with NaN where unrated)."""
    experts = synthetic.Raters(synthetic.EXPERT, EXPERT_NAMES, 0)
    images = [face_without_pixels(seed, i) for i in range(num)]
    table = np.full((len(EXPERT_NAMES), num, taxonomy.NUM_EMOTIONS), np.nan)
    for i, image in enumerate(images):
        for name, ratings in synthetic.expert_ratings(image, experts, seed).items():
            table[EXPERT_NAMES.index(name), i] = [ratings[taxonomy.key_of(e)] for e in range(taxonomy.NUM_EMOTIONS)]
    return images, table


def face_without_pixels(seed: int, i: int) -> synthetic.Image:
    latent = synthetic.sample_latent(np.random.default_rng([seed, i]))
    return synthetic.Image(f"{i:05d}", latent, faces.expression_params(latent, synthetic._MATRIX), {}, b"", "", 0)


def vlm_labels(params: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """[draws, N, 40] VLM ratings of faces with these params (the demo's Big labeller)."""
    vlm = synthetic.Raters(synthetic.VLM, ("vlm",), 1)
    rng = np.random.default_rng(seed)
    return np.array([[vlm.rate(0, p, rng) for p in params] for _ in range(draws)])


def kappa_vs_experts(table: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(the scores' mean kappa as one more annotator, the median expert's mean kappa)."""
    names = list(EXPERT_NAMES)
    result = agreement.hq_agreement(np.concatenate([table, scores[None].astype(float)]), names + ["model"],
                                    [True] * len(names) + [False], full=False)["annotators"]
    return result["model"]["mean_kappa"], float(np.median([result[n]["mean_kappa"] for n in names]))


def ceiling(args) -> dict:
    images, table = hq_like(args.num, seed=5)
    params = np.array([image.params for image in images], np.float32)
    clean = np.array([faces.read_expression(p, synthetic._MATRIX) for p in params])
    latent = np.array([image.latent for image in images])
    expected_vlm = vlm_labels(params, 40, seed=99).mean(0)
    oracles = {"latent": latent, "noise-free reading": clean, "E[VLM | face]": expected_vlm,
               "E[VLM | face], rounded": np.round(expected_vlm),
               "noise-free reading shrunk x0.5 to its mean": clean.mean(0) + 0.5 * (clean - clean.mean(0))}
    out = {name: kappa_vs_experts(table, scores) for name, scores in oracles.items()}
    return {"faces": args.num, "median_expert_kappa": out["latent"][1],
            "oracle_kappa": {name: round(k, 3) for name, (k, _) in out.items()}}


def fit(model: nn.Module, x: np.ndarray, loss, steps: int, batch: int, lr: float, seed: int = 0):
    """AdamW (warmup + cosine) on random batches of rows of x; loss(outputs, rows) -> scalar."""
    params = model.init(jax.random.key(seed), x[:1])
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, lr, min(100, steps // 10), steps), weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, rows):
        value, grads = jax.value_and_grad(lambda p: loss(model.apply(p, xb), rows))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        rows = rng.integers(0, len(x), batch)
        params, opt_state, _ = step(params, opt_state, x[rows], rows)
    return params


class ParamsToLogits(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (256, 256):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(taxonomy.NUM_EMOTIONS * 8)(x).reshape(-1, taxonomy.NUM_EMOTIONS, 8)


def params_mlp(args) -> dict:
    train_params = np.array([face_without_pixels(1, i).params for i in range(args.num_train)])
    one_hot = jnp.asarray(np.eye(8, dtype=np.float32)[vlm_labels(train_params, 1, seed=1)[0]])
    hq_images, table = hq_like(600, seed=2)
    hq_params = np.array([image.params for image in hq_images], np.float32)
    # Gaussian reading error with `noise` of each (clipped) parameter's variance.
    scale = np.clip(train_params, -faces.PARAM_LIMIT, faces.PARAM_LIMIT).std(0) * np.sqrt(args.noise)
    rng = np.random.default_rng(1)
    read = lambda p: (np.clip(p, -faces.PARAM_LIMIT, faces.PARAM_LIMIT)  # noqa: E731
                      + rng.normal(0, 1, p.shape) * scale).astype(np.float32)
    model = ParamsToLogits()

    def loss(logits, rows):
        total, count = losses.soft_label_ce(logits, one_hot[rows], jnp.ones(logits.shape[:2], bool))
        return total / count

    params = fit(model, read(train_params), loss, args.steps, args.batch, args.lr)
    scores = np.asarray(emonet.expected_intensity(model.apply(params, read(hq_params))))
    model_kappa, median = kappa_vs_experts(table, scores)
    return {**vars(args), "model_kappa": round(model_kappa, 3),
            "model_kappa_rounded": round(kappa_vs_experts(table, np.round(scores))[0], 3),
            "median_expert_kappa": round(median, 3)}


def params_cnn(args) -> dict:
    data = [np.load(f) for f in sorted(pathlib.Path(args.data).glob("*.npz"))]
    images = np.concatenate([d["images"] for d in data])[:args.num_train + HELD_OUT]
    params = np.clip(np.concatenate([d["params"] for d in data])[:len(images)], -faces.PARAM_LIMIT, faces.PARAM_LIMIT)
    num_train = len(images) - HELD_OUT
    target = jnp.asarray((params - params[:num_train].mean(0)) / (params[:num_train].std(0) + 1e-6))

    class Reader(nn.Module):
        @nn.compact
        def __call__(self, x):
            features, _ = SmallCNN()(pipeline.to_unit_range(x))
            return nn.Dense(params.shape[1])(features)

    model = Reader()
    fitted = fit(model, images[:num_train], lambda out, rows: jnp.mean(jnp.square(out - target[rows])),
                 args.steps, args.batch, args.lr)
    held_out = np.asarray(model.apply(fitted, images[num_train:]))
    truth = np.asarray(target[num_train:])
    r2 = 1 - ((held_out - truth) ** 2).mean(0) / truth.var(0)
    return {**vars(args), "r2_mean": round(float(r2.mean()), 3),
            "r2": {name: round(float(v), 2) for name, v in zip(faces.FACIAL_PARAMS, r2)}}


def spread(args) -> dict:
    """A demo run's HQ scores (eval/hq_predictions.npz) stretched around their mean by each
    factor: how much of the model's kappa a shrunk readout costs; and the same scores shifted
    by +0.5, so the paper's truncation rounds them: how much the truncation costs."""
    scores = np.load(pathlib.Path(args.workdir) / "eval" / "hq_predictions.npz")
    source = pipeline.open_split("emonet_face_hq/64", "test", args.data_dir)
    _, names, table = model_eval.read_expert_ratings(source)
    ids = [pipeline.as_text(source[i]["image_id"]) for i in range(len(source))]
    if list(scores["image_id"]) != ids:
        raise ValueError(f"{args.workdir}'s predictions are not in the order of the HQ records in {args.data_dir}")
    s = scores["intensity"]

    def kappa(ratings):
        result = agreement.hq_agreement(np.concatenate([table, np.clip(ratings, 0, 7)[None]]), names + ["model"],
                                        [True] * len(names) + [False], full=False)["annotators"]
        return round(result["model"]["mean_kappa"], 3)

    factors = (1.0, 1.5, 2.0, 2.5, 3.0)
    stretched = {str(f): s.mean(0) + f * (s - s.mean(0)) for f in factors}
    return {"model_kappa_by_stretch": {f: kappa(r) for f, r in stretched.items()},
            "model_kappa_by_stretch_rounded": {f: kappa(r + 0.5) for f, r in stretched.items()},
            "model_mean": round(float(s.mean()), 3), "model_mean_level": round(float(np.trunc(s).mean()), 3),
            "expert_mean": round(float(np.nanmean(table)), 3), "model_std": round(float(s.std(0).mean()), 3),
            "expert_std": round(float(np.nanstd(table, axis=1).mean()), 3)}


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
    top = sub.add_parser("ceiling")
    top.add_argument("--num", type=int, default=600)
    mlp = sub.add_parser("params_mlp")
    mlp.add_argument("--num_train", type=int, default=15_500)
    mlp.add_argument("--noise", type=float, default=0.0, help="reading error, as a share of each parameter's variance")
    cnn = sub.add_parser("params_cnn")
    cnn.add_argument("--data", required=True, help="folder of `gen` outputs (with params)")
    cnn.add_argument("--num_train", type=int, default=15_500)
    for p in (mlp, cnn):
        p.add_argument("--steps", type=int, default=2000)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--lr", type=float, default=1e-3)
    stretch = sub.add_parser("spread")
    stretch.add_argument("--workdir", required=True, help="a demo run (its eval/hq_predictions.npz)")
    stretch.add_argument("--data_dir", required=True, help="the prepared synthetic records it evaluated on")
    args = parser.parse_args()
    if args.command == "gen":
        generate(args.num, args.seed, args.out)
    else:
        run = {"train": train, "ceiling": ceiling, "params_mlp": params_mlp, "params_cnn": params_cnn,
               "spread": spread}[args.command]
        print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
