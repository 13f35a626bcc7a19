"""EmpathicInsight-Face: 40 emotion MLPs on a frozen image embedding, as ONE batched module.

The published model is 40 separate MLPs, one per emotion, each mapping a 1152-d SigLIP2
So400m pooled embedding to a 0-7 intensity (Small: 1152->128->32->1, Large:
1152->1024->512->256->1, ReLU + dropout). Here the 40 MLPs are one module whose parameters
carry an axis of 40 (`SharedInputDense`, `StackedDense`), so all heads train in one jitted step:

    model = heads.Heads(hidden=heads.VARIANTS["small"], dropout=0.1)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1152)))["params"]
    scores = model.apply({"params": params}, embeddings)          # [B, D] -> [B, 40], taxonomy order

Parameter names are `Dense_{i}/{kernel,bias}`. The first layer, which reads the shared
embedding and does most of the work, has its kernel [D, 40, out] (`SharedInputDense`); every
later kernel is [40, in, out] (`StackedDense`); biases are [40, out]. `per_head_layout` moves
the first kernel's head axis to the front, so that head e (taxonomy.NAMES[e]) is slice e of
every array (`head_params`), and `Head`, one emotion's MLP, applied to that slice gives the
same numbers (a test checks it). Each head has its own initialisation and its own dropout
masks (`HashDropout`), as 40 separate trainings would.

Every product, forward and backward, is one `mixed_precision.matmul` with row-major operands:
the first layer is a single [B, D] x [D, 40 * width] product and its kernel gradient a single
[D, B] x [B, 40 * width] one; after it, activations are [40, B, features] and each layer is
one batched product. `compute_dtype='bfloat16'` runs every product with bfloat16 operands and
float32 accumulation (parameters, embeddings and the optimizer stay float32), which on a CPU
with AMX is several times faster than float32.

Inputs are the raw pooled embedding (`input_norm='none'`, what the published heads take) or
its L2-normalised version (`'l2'`); nothing is learned about the inputs, so an export needs
no input statistics.

Export (what `python -m emonet_jax.predict` reads):

    heads.export(out_dir, params, card)      # out_dir/heads.safetensors + out_dir/card.json
    params, card = heads.load_export(out_dir)
    out = heads.predict(params, card, embeddings)   # {'raw': [N, 40], 'mean_subtracted': [N, 40]}

`heads.safetensors` holds float32 tensors named by their '/'-joined parameter path
(`Dense_0/kernel` ...), in `per_head_layout` (kernels [40, in, out]; `load_export` returns the
module's layout). `card.json` (`make_card`) holds everything needed to use them:

    format            1
    emotions          the 40 names in output order (= emonet_jax.taxonomy.NAMES)
    head_names        the same as the published files' keys, model_<slug>_best
    architecture      variant, hidden (list), input_dim, num_heads, activation, dropout, input_norm
    backbone          the SigLIP tower whose pooled embedding is the input: backbone (its path at
                      training time), backbone_config (ViT settings), backbone_fingerprint
                      (embed.params_fingerprint), dtype (the tower's compute dtype)
    preprocessing     image_size, whole image (no crop), resize filter (PIL), RGB, value_range [-1, 1]
    mean_subtraction  means (40 floats), source (what they are the mean of), rule
    training          per stage: split, epochs, target; seed; compute_dtype

`mean_subtracted = raw - means`, the published files' convention. `load_export` is strict: a
missing, unexpected or mis-shaped tensor, or a card whose emotion order is not this
project's, fails in one error naming the file.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy

from emonet_jax import taxonomy, tree
from emonet_jax.models import mixed_precision

NUM_HEADS = taxonomy.NUM_EMOTIONS
VARIANTS = {"small": (128, 32), "large": (1024, 512, 256)}
INPUT_NORMS = ("none", "l2")
COMPUTE_DTYPES = ("float32", "bfloat16")
CARD_FORMAT = 1
WEIGHTS_FILE = "heads.safetensors"
CARD_FILE = "card.json"


class ExportError(ValueError):
    """An export that cannot be used as it is; the message names the file."""


class Head(nn.Module):
    """One emotion's MLP: [B, D] -> [B]; the reference that `Heads` batches 40 of."""
    hidden: Sequence[int]
    dropout: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"Dense_{i}")(x))
            x = HashDropout(self.dropout, deterministic=self.deterministic)(x)
        return nn.Dense(1, name=f"Dense_{len(self.hidden)}")(x)[..., 0]


class SharedInputDense(nn.Module):
    """`num_heads` Dense layers reading the same input: x [B, in] -> [heads, B, out]; kernel
    [in, heads, out], bias [heads, out].

    The product is one [B, in] x [in, heads * out] `mixed_precision.matmul` (the kernel's
    reshape is free) and its kernel gradient one [in, B] x [B, heads * out]: the wide
    heads * out axis is the output's columns, the orientation XLA:CPU's fast path runs fastest
    (BENCHMARKS.md "Heads"). Turning [B, heads, out] into [heads, B, out] moves rows of `out`
    contiguous values, which XLA fuses into the bias/ReLU/dropout loop that follows."""
    features: int
    num_heads: int
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        batch, n_in = x.shape
        # Each head initialised as its own nn.Dense would be (lecun normal over its fan-in, zero bias).
        init = nn.initializers.lecun_normal(in_axis=0, out_axis=2, batch_axis=(1,))
        kernel = self.param("kernel", init, (n_in, self.num_heads, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.features))
        y = mixed_precision.matmul(x, kernel.reshape(n_in, -1), self.compute_dtype)
        return jnp.transpose(y.reshape(batch, self.num_heads, self.features), (1, 0, 2)) + bias[:, None, :]


class StackedDense(nn.Module):
    """`num_heads` Dense layers side by side, each reading its own head's input: x [heads, B, in]
    -> [heads, B, out]; kernel [heads, in, out], bias [heads, out]. One batched
    `mixed_precision.matmul`; `compute_dtype` is the operand dtype (float32 accumulation,
    float32 parameters)."""
    features: int
    num_heads: int
    compute_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        kernel = self.param("kernel", init, (self.num_heads, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.features))
        return mixed_precision.matmul(x, kernel, self.compute_dtype) + bias[:, None, :]


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_bits(seed, shape) -> jax.Array:
    """uint32 [shape]: element i is fmix((i ^ seed[1]) * golden + seed[0]), MurmurHash3's
    finaliser over a Weyl sequence (the construction of splitmix32), keyed by two seed words.

    XLA's CPU threefry costs ~15 ns per number, a fifth of a heads training step for the
    dropout masks alone; dropout needs bits that look independent, not cryptographic ones.
    The xor with seed[1] is what makes two seeds' masks more than shifted copies of one
    sequence (with seed[0] alone they would be: golden is invertible modulo 2^32)."""
    i = jax.lax.iota(jnp.uint32, int(np.prod(shape)))
    return _fmix32((i ^ seed[1]) * jnp.uint32(0x9E3779B9) + seed[0]).reshape(shape)


class HashDropout(nn.Module):
    """nn.Dropout with masks from `hash_bits`, keyed by two words drawn from the 'dropout' rng."""
    rate: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        if self.deterministic or self.rate == 0:
            return x
        keep = 1.0 - self.rate
        seed = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
        threshold = jnp.uint32(min(round(keep * 2.0**32), 2**32 - 1))
        mask = hash_bits(seed, x.shape) < threshold
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Heads(nn.Module):
    """`num_heads` independent MLPs (`Head`) on the same input: [B, D] -> [B, num_heads]."""
    hidden: Sequence[int] = VARIANTS["small"]
    dropout: float = 0.0
    input_norm: str = "none"
    compute_dtype: str = "float32"
    num_heads: int = NUM_HEADS

    @nn.compact
    def __call__(self, embeddings, *, train: bool = False):
        x = normalize_inputs(embeddings.astype(jnp.float32), self.input_norm)
        widths = [*self.hidden, 1]
        for i, width in enumerate(widths):
            # The first layer reads the shared [B, D] input; from there on x is [heads, B, features].
            layer = SharedInputDense if i == 0 else StackedDense
            x = layer(width, self.num_heads, self.compute_dtype, name=f"Dense_{i}")(x)
            if i < len(self.hidden):
                # One mask over [heads, B, width]: every head draws its own.
                x = HashDropout(self.dropout, deterministic=not train)(nn.relu(x))
        return x[:, :, 0].T


def normalize_inputs(x, input_norm: str):
    if input_norm == "none":
        return x
    if input_norm == "l2":
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    raise ValueError(f"input_norm {input_norm!r}: expected one of {INPUT_NORMS}")


def build(variant: str, hidden: Sequence[int] = (), dropout: float = 0.0, input_norm: str = "none",
          compute_dtype: str = "float32") -> Heads:
    """Heads of a named variant; `hidden` (non-empty) overrides its layer sizes."""
    if variant not in VARIANTS and not hidden:
        raise ValueError(f"heads variant {variant!r}: expected one of {sorted(VARIANTS)} (or give hidden sizes)")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input_norm {input_norm!r}: expected one of {INPUT_NORMS}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
    return Heads(hidden=tuple(hidden) or VARIANTS[variant], dropout=dropout, input_norm=input_norm,
                 compute_dtype=compute_dtype)


def param_shapes(hidden: Sequence[int], dim: int, num_heads: int = NUM_HEADS) -> dict[str, tuple[int, ...]]:
    """{'Dense_i/kernel': (heads, in, out), 'Dense_i/bias': (heads, out)}: the per-head layout
    (`per_head_layout`) that exports hold."""
    widths = [dim, *hidden, 1]
    shapes = {}
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        shapes[f"Dense_{i}/kernel"] = (num_heads, n_in, n_out)
        shapes[f"Dense_{i}/bias"] = (num_heads, n_out)
    return shapes


def per_head_layout(params: Any) -> Any:
    """`Heads` parameters with every kernel [heads, in, out] (what an export holds, and slice e
    of each array is head e's `Head` parameters); the module's first kernel is [in, heads, out]."""
    return _swap_first_kernel(params)


def module_layout(per_head: Any) -> Any:
    """The inverse of `per_head_layout`."""
    return _swap_first_kernel(per_head)


def _swap_first_kernel(params):
    swap = lambda path, x: np.swapaxes(x, 0, 1) if path == "Dense_0/kernel" else x  # noqa: E731
    return tree.map_with_path(swap, params)


def head_params(params: Any, index: int) -> Any:
    """The parameters of head `index` alone, for `Head.apply`."""
    return jax.tree.map(lambda x: x[index], per_head_layout(params))


# --- export ---------------------------------------------------------------------------------

def make_card(*, variant: str, hidden: Sequence[int], dim: int, dropout: float, input_norm: str,
              cache_meta: dict[str, Any], means: np.ndarray, means_source: str,
              training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The export's card.json. `cache_meta` is the meta.json of the embedding cache the heads
    were trained on (embed.py): it names the backbone and its preprocessing."""
    means = np.asarray(means, np.float64)
    if means.shape != (NUM_HEADS,) or not np.isfinite(means).all():
        raise ValueError(f"means must be {NUM_HEADS} finite numbers, got shape {means.shape}")
    return {
        "format": CARD_FORMAT,
        "model": "EmpathicInsight-Face heads (emonet_jax)",
        "emotions": list(taxonomy.NAMES),
        "head_names": [e.head_name for e in taxonomy.EMOTIONS],
        "architecture": {"variant": variant, "hidden": list(hidden), "input_dim": int(dim), "num_heads": NUM_HEADS,
                         "activation": "relu", "dropout": float(dropout), "input_norm": input_norm,
                         "output": "raw 0-7 intensity per emotion (not clipped)"},
        "backbone": {k: cache_meta.get(k) for k in ("backbone", "backbone_config", "backbone_fingerprint", "dtype")},
        "preprocessing": {"image_size": cache_meta.get("image_size"), "crop": "none (the whole image)",
                          "resize": cache_meta.get("resample", "bilinear"), "channels": "RGB",
                          "value_range": [-1.0, 1.0],
                          "embedding": "the tower's pooled output (MAP head), float32"},
        "mean_subtraction": {"means": [float(m) for m in means], "source": means_source,
                             "rule": "mean_subtracted = raw - means[emotion]"},
        "training": training or {},
    }


def export(out_dir, params: Any, card: dict[str, Any]) -> pathlib.Path:
    """Writes out_dir/heads.safetensors (float32, '/'-joined names, `per_head_layout`) and
    out_dir/card.json.

    The card is checked against the parameters first, so an export always loads back."""
    out_dir = pathlib.Path(out_dir)
    flat = {name: np.ascontiguousarray(np.asarray(x, np.float32))
            for name, x in tree.flatten(per_head_layout(jax.device_get(params))).items()}
    problems = _mismatches(flat, card)
    if problems:
        raise ExportError(f"parameters do not match the card: {problems}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, write in ((WEIGHTS_FILE, lambda p: safetensors_numpy.save_file(flat, str(p))),
                        (CARD_FILE, lambda p: p.write_text(json.dumps(card, indent=1, allow_nan=False) + "\n"))):
        tmp = out_dir / (name + ".tmp")
        write(tmp)
        tmp.replace(out_dir / name)  # a reader never sees a half-written file
    return out_dir


def load_export(export_dir) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params for `Heads.apply`, card) of an `export` folder; every problem in one error."""
    export_dir = pathlib.Path(export_dir).expanduser()
    card_path, weights_path = export_dir / CARD_FILE, export_dir / WEIGHTS_FILE
    for path in (card_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path} not found: is {export_dir} a heads export (heads.export)?")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{card_path}: not valid JSON ({e})") from None
    if card.get("format") != CARD_FORMAT:
        raise ExportError(f"{card_path}: card format {card.get('format')!r}, this code reads {CARD_FORMAT}")
    if card.get("emotions") != list(taxonomy.NAMES):
        raise ExportError(f"{card_path}: 'emotions' is not this project's taxonomy order "
                          f"(emonet_jax.taxonomy.NAMES); the heads would be read as the wrong emotions")
    try:
        flat = safetensors_numpy.load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise ExportError(f"{weights_path}: cannot read ({e})") from None
    problems = _mismatches(flat, card)
    if problems:
        raise ExportError(f"{weights_path} does not match {card_path.name}: {problems}")
    return module_layout(tree.unflatten({k: v.astype(np.float32) for k, v in flat.items()})), card


def _mismatches(flat: dict[str, np.ndarray], card: dict[str, Any]) -> str:
    """'' if `flat` holds exactly the tensors the card's architecture needs, else what differs."""
    try:
        arch = card["architecture"]
        expected = param_shapes(arch["hidden"], arch["input_dim"], arch["num_heads"])
        means = card["mean_subtraction"]["means"]
    except (KeyError, TypeError) as e:
        return f"the card lacks {e}"
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    shape = [f"{k}: {tuple(flat[k].shape)} instead of {expected[k]}" for k in sorted(set(expected) & set(flat))
             if tuple(flat[k].shape) != expected[k]]
    parts = [f"{what}: {items}" for what, items in (("missing", missing), ("unexpected", unexpected),
                                                     ("wrong shape", shape)) if items]
    if len(means) != arch["num_heads"]:
        parts.append(f"mean_subtraction.means has {len(means)} values for {arch['num_heads']} heads")
    return "; ".join(parts)


def module_from_card(card: dict[str, Any]) -> Heads:
    arch = card["architecture"]
    return Heads(hidden=tuple(arch["hidden"]), input_norm=arch["input_norm"], num_heads=arch["num_heads"])


def predict(params: Any, card: dict[str, Any], embeddings: np.ndarray, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Pooled embeddings [N, D] of the card's backbone -> {'raw', 'mean_subtracted'}: [N, 40] float32."""
    embeddings = np.asarray(embeddings, np.float32)
    dim = card["architecture"]["input_dim"]
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise ValueError(f"expected embeddings [N, {dim}] (the card's input_dim), got {embeddings.shape}")
    raw = apply_in_batches(module_from_card(card), params, embeddings, batch_size)
    means = np.asarray(card["mean_subtraction"]["means"], np.float32)
    return {"raw": raw, "mean_subtracted": raw - means}


def apply_in_batches(model: Heads, params: Any, embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """model(embeddings) in eval mode with float32 products (what `predict` computes from an
    export, whatever dtype the heads trained in), one compiled shape (the last batch is padded)."""
    fn = _eval_fn(model.clone(compute_dtype="float32"))
    n = len(embeddings)
    out = []
    for start in range(0, n, batch_size):
        chunk = embeddings[start:start + batch_size]
        padded = np.zeros((min(batch_size, max(n, 1)),) + chunk.shape[1:], np.float32)
        padded[:len(chunk)] = chunk
        out.append(np.asarray(fn(params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, model.num_heads), np.float32)


_EVAL_FNS: dict[Heads, Any] = {}


def _eval_fn(model: Heads):
    # Modules are frozen dataclasses (hashable): one jitted function per configuration.
    if model not in _EVAL_FNS:
        _EVAL_FNS[model] = jax.jit(lambda params, x: model.apply({"params": params}, x))
    return _EVAL_FNS[model]
