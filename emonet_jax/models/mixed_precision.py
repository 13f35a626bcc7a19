"""Matrix products in bfloat16 (float32 accumulation) that stay on XLA:CPU's fast path, backward too.

    from emonet_jax.models import mixed_precision as mp
    y = mp.matmul(a, b)                      # a [..., M, K] @ b [..., K, N] -> float32 [..., M, N]
    y = mp.matmul(a, b, dtype=jnp.float32)   # the same products with float32 operands
    t = mp.transpose(x)                      # x [..., M, N] -> [..., N, M], a real copy on CPU
    t = mp.permute(x, (0, 2, 1, 3))          # any jnp.transpose, a real copy on CPU
    nn.Dense(features, dot_general=mp.dot_general)    # a Flax layer's products through matmul
    mp.Dense(features, dtype=jnp.bfloat16)            # nn.Dense's parameters; products and bias gradient fast
    mp.Dense((heads, head_dim))                       # nn.DenseGeneral's, the same way

Why: on a CPU with AMX (Sapphire Rapids and later) XLA hands a dot to YNNPACK only when both
operands are row-major in the canonical form: lhs [batch..., M, K] contracting its last axis,
rhs [batch..., K, N] contracting its first non-batch axis (`IsDotSupportedByYnn` in XLA's
`backends/cpu/ynn_support.cc`, jax 0.10). A transposed operand is not copied: layout
assignment gives it a column-major layout instead, the dot falls back to Eigen, and Eigen has
no bfloat16 x bfloat16 -> float32 kernel (XLA upcasts the operands, or, for some fusions,
fails with "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32"). The
products autodiff writes for a gradient are exactly such dots (x.T @ g, g @ w.T), so on 2
Sapphire Rapids cores a bfloat16 backward ran slower than float32.

`matmul` therefore has its own VJP in which every product is canonical: the operand that must
be transposed is copied first (`transpose`), choosing for each cotangent the form that copies
fewer elements:

    da = g @ b^T       (copies b)         or  (b @ g^T)^T   (copies g and the result)
    db = a^T @ g       (copies a)         or  (g^T @ a)^T   (copies g and the result)

(The result's transpose is not forced into a copy: its readers are elementwise ops or the
optimizer, into which XLA may fold it.) A gradient nobody reads (e.g. of frozen inputs) is
removed by XLA with its copies.

`transpose` makes the copy real on CPU by flattening the transposed array to one axis between
two `optimization_barrier`s: a rank-1 array has a single layout, so the transpose has to happen
there, and the barriers keep the simplifier from folding it into a layout change or into the
dimension numbers of a neighbouring dot. This leans on how XLA:CPU assigns layouts today (not a documented contract);
tests/mixed_precision_test.py checks the compiled gradient has no dot outside a YNNPACK fusion,
so a jax upgrade that changes it fails there. On other platforms `transpose` is a plain
transpose (their compilers transpose inside the dot). XLA:CPU's transpose is cheap for
activation-sized arrays (~0.2 ms for 256 x 1152) but slow for large ones (~30 ms for a
bfloat16 1152 x 5120), hence the element counts above.

Shapes the fast path does not take (M or N of 1, all dimensions below 8: the same limits as
YNNPACK's) are computed in float32 with plain autodiff, so no bfloat16 dot ever reaches Eigen.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# YNNPACK declines a dot with M or N of 1, or with every dimension below this.
_MIN_FAST_DIM = 8


def transpose(x: jax.Array) -> jax.Array:
    """x [..., M, N] -> [..., N, M], physically copied on CPU (see the module docstring)."""
    return permute(x, (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2))


def permute(x: jax.Array, axes: Sequence[int]) -> jax.Array:
    """`jnp.transpose(x, axes)`, physically copied on CPU like `transpose`: e.g. the attention
    operands' [batch, tokens, heads, head_dim] -> [batch, heads, tokens, head_dim], which a
    batched dot needs (batch axes leading) and XLA would otherwise fold into the dot."""
    axes = tuple(axes)
    return jax.lax.platform_dependent(x, cpu=functools.partial(_copied_permute, axes=axes),
                                      default=functools.partial(jnp.transpose, axes=axes))


def _copied_permute(x, axes):
    # The barrier before keeps XLA from folding the transpose into the dot that made x (which
    # would give that dot a transposed operand); the one after, into the dot that reads it.
    flat = jax.lax.optimization_barrier(jnp.transpose(jax.lax.optimization_barrier(x), axes).reshape(-1))
    return flat.reshape(tuple(x.shape[a] for a in axes))


def matmul(a: jax.Array, b: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """a [..., M, K] @ b [..., K, N] (equal leading batch axes) -> float32 [..., M, N].

    Operands are cast to `dtype` (bfloat16 or float32), products accumulate in float32, and
    the cotangents come back in the operands' own dtypes."""
    if a.ndim != b.ndim or a.ndim < 2 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul expects a [..., M, K] and b [..., K, N] with equal batch axes, "
                         f"got {a.shape} and {b.shape}")
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if min(m, n) == 1 or max(m, k, n) < _MIN_FAST_DIM:
        return _dot(a.astype(jnp.float32), b.astype(jnp.float32), jnp.float32)
    return _matmul(a, b, (jnp.dtype(dtype), a.dtype, b.dtype))


def _dot(a, b, dtype, rhs_contracting=-2):
    """The canonical product: [..., M, K] x [..., K, N] -> float32 [..., M, N]; with
    `rhs_contracting=-1`, b is [..., N, K] (a @ bᵀ, for `_dot_rhs_transposed` only)."""
    batch = tuple(range(a.ndim - 2))
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype),
                               (((a.ndim - 1,), (b.ndim + rhs_contracting,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


def _product_transposes_rhs(dtype) -> bool:
    """Whether a dot in `dtype` may contract its rhs's last axis and stay on the fast path: in
    float32 XLA:CPU hands it to YNNPACK, which transposes while packing; a bfloat16 dot of that
    form is upcast to float32 by XLA."""
    return jnp.dtype(dtype) == jnp.float32


def _dot_rhs_transposed(a, b, dtype):
    """a [..., M, K] x b [..., N, K] -> float32 [..., M, N], i.e. a @ bᵀ.

    Where the product can transpose b itself (`_product_transposes_rhs`: float32), no copy is
    made (XLA:CPU's own transposes are slow: BENCHMARKS.md "Train step without AMX"); elsewhere b
    is copied into the canonical form first."""
    if _product_transposes_rhs(dtype):
        return _dot(a, b, dtype, rhs_contracting=-1)
    return _dot(a, transpose(b), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(a, b, dtypes):
    return _dot(a, b, dtypes[0])


def _matmul_fwd(a, b, dtypes):
    # The residuals are the cast operands: half the memory of float32 ones for bfloat16.
    a, b = a.astype(dtypes[0]), b.astype(dtypes[0])
    return _dot(a, b, dtypes[0]), (a, b)


def _matmul_bwd(dtypes, residuals, g):
    """(da, db) in the operands' dtypes, from float32 accumulations."""
    dtype, a_dtype, b_dtype = dtypes
    a, b = residuals
    g = g.astype(dtype)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    # Each cotangent in the form that copies fewer elements (see the module docstring); where
    # the product transposes b itself, g @ bᵀ copies nothing.
    if k * n <= m * n + m * k or _product_transposes_rhs(dtype):
        da = _dot_rhs_transposed(g, b, dtype)
    else:
        da = _transposed_result(_dot(b, transpose(g), dtype))
    if m * k <= m * n + k * n:
        db = _dot(transpose(a), g, dtype)
    else:
        db = _transposed_result(_dot(transpose(g), a, dtype))
    return da.astype(a_dtype), db.astype(b_dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _transposed_result(y):
    # A cotangent is read by elementwise ops or the optimizer, not as a dot operand, so its
    # transpose need not be a copy in a canonical layout: XLA may fold it into its readers. The
    # barrier keeps it out of the dot that made y (a transposed dot output is off the fast path).
    return _swap_last(jax.lax.optimization_barrier(y))


def _swap_last(x):
    return jnp.swapaxes(x, -1, -2)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general` for a layer's kernel, with `matmul`'s products: a drop-in for Flax's
    `nn.Dense(dot_general=...)`, `nn.DenseGeneral` and `nn.MultiHeadDotProductAttention(
    qkv_dot_general=..., out_dot_general=...)`.

    Takes the form those layers use: no batch axes, lhs's trailing axes contracted with rhs's
    leading ones in the same order; both sides are then reshaped (free) to one [rows, K] x
    [K, N] `matmul` in lhs's dtype. Any other form goes to `jax.lax.dot_general` unchanged.
    The result has the dtype `jax.lax.dot_general` would give."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    trailing = tuple(range(lhs.ndim - n, lhs.ndim))
    if lhs_batch or rhs_batch or tuple(lhs_contract) != trailing or tuple(rhs_contract) != tuple(range(n)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    free, out = lhs.shape[:lhs.ndim - n], rhs.shape[n:]
    k = math.prod(rhs.shape[:n])
    y = matmul(lhs.reshape(math.prod(free), k), rhs.reshape(k, math.prod(out)), lhs.dtype)
    return y.reshape(free + out).astype(preferred_element_type or jnp.result_type(lhs, rhs))


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y [..., *bias.shape] + bias, whose bias gradient is summed in float32 whatever the dtypes.

    Autodiff of a plain bfloat16 `y + bias` sums the cotangent in bfloat16; XLA:CPU gives that
    sum a reducer that adds in float32 and rounds, which YNNPACK declines, and its
    tree-reduction rewrite then turns the sum into a `reduce-window` that took ~30 ms for
    [8, 196, 3072] (a float32 sum of the same array: ~1 ms). BENCHMARKS.md "Train step"."""
    if y.shape[y.ndim - bias.ndim:] != bias.shape:
        raise ValueError(f"add_bias: y {y.shape} does not end with the bias's shape {bias.shape}")
    return _add_bias(y, bias, bias.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_bias(y, bias, bias_ndim):
    return y + bias


def _add_bias_fwd(y, bias, bias_ndim):
    return y + bias, None


def _add_bias_bwd(bias_ndim, _, g):
    # Summed as [rows, bias size] over its rows: a sum over several leading axes of a 4-d
    # cotangent (attention's [batch, tokens, heads, head_dim]) was again a reduce-window.
    bias_shape = g.shape[g.ndim - bias_ndim:]
    rows = g.reshape(-1, math.prod(bias_shape))
    return g, jnp.sum(rows, 0, dtype=jnp.float32).astype(g.dtype).reshape(bias_shape)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# [batch, tokens, heads, head_dim] <-> [batch, heads, tokens, head_dim] (its own inverse), and
# keys as [batch, heads, head_dim, tokens]: the layouts in which attention's products are canonical.
_HEADS_FIRST = (0, 2, 1, 3)
_KEYS_TRANSPOSED = (0, 2, 3, 1)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√head_dim)·v, with query [batch, q_tokens, heads, head_dim] and key, value
    [batch, kv_tokens, heads, head_dim] of one dtype (the compute dtype) -> query's shape and dtype.

    The values of `flax.linen.dot_product_attention(..., force_fp32_for_softmax=True)` (scores
    and softmax in float32, the weights cast to the compute dtype for their product with v), with
    its own VJP so that every product, forward and backward, is a canonical batched `matmul`
    product: on 2 Zen 4 cores a ViT-B/16 block's bfloat16 attention ran 1.2-1.5x faster
    forward+backward than Flax's, whose backward products are cast to float32 and partly run on
    Eigen; forward alone the two are level once Flax's result is cast to bfloat16 as a bfloat16
    model does (`python -m emonet_jax.bench attention`, BENCHMARKS.md "Attention on Zen 4"). The
    backward keeps the bfloat16 weights (as the forward's product used them) and gets softmax's
    row sums Σ_k p·dp as Σ_d g·o, a sum over head_dim instead of over the keys. Shapes the fast
    path does not take (a single query, as in the MAP head, or every dimension below 8) go to
    Flax's function."""
    if (query.ndim != 4 or key.shape != value.shape or key.shape[0] != query.shape[0]
            or key.shape[2:] != query.shape[2:]):
        raise ValueError(f"dot_product_attention expects query [batch, q_tokens, heads, head_dim] and key, value "
                         f"[batch, kv_tokens, heads, head_dim]; got {query.shape}, {key.shape}, {value.shape}")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"dot_product_attention expects one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    dims = (query.shape[1], key.shape[1], query.shape[3])
    if min(dims) == 1 or max(dims) < _MIN_FAST_DIM:
        return flax_attention(query, key, value)
    chunks = attention_chunks(query.shape[0])
    if chunks == 1:
        return _attention(query, key, value, 1)
    return jax.lax.platform_dependent(query, key, value, default=lambda q, k, v: _attention(q, k, v, 1),
                                      cpu=lambda q, k, v: _attention(q, k, v, chunks))


def flax_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Flax's function with the values `dot_product_attention` matches: scores and softmax in
    float32, the result in query's dtype (Flax's is float32 with force_fp32_for_softmax)."""
    out = nn.dot_product_attention(query, key, value, dtype=query.dtype, force_fp32_for_softmax=True)
    return out.astype(query.dtype)


def attention_chunks(batch: int) -> int:
    """Into how many independent attentions `dot_product_attention` splits a batch on CPU.

    YNNPACK spreads a product's rows and columns over the cores but runs its batch axes on one
    core, so each of attention's batched products ([batch, heads, 196, 196] @ [..., 196, 64]
    for ViT-B/16) kept one of 2 Zen 4 cores idle; split into 2 attentions over half the batch,
    XLA runs the halves side by side (BENCHMARKS.md "Train step on Zen 4 (session 15)")."""
    return chunks_for(batch, jax.device_count(), jax.local_device_count(), _schedulable_cores())


def chunks_for(batch: int, devices: int, local_devices: int, cores: int) -> int:
    """The largest divisor of each device's share of `batch` that is at most the device's share
    of `cores` (all devices of this process share them); 1 when the batch does not divide
    evenly or simulated devices outnumber the cores."""
    if batch % devices:
        return 1
    per_device, cores_per_device = batch // devices, cores // local_devices
    return max((n for n in range(1, min(per_device, cores_per_device) + 1) if per_device % n == 0), default=1)


def _schedulable_cores() -> int:
    # What XLA:CPU sizes its thread pool by: the cores this process may run on.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, chunks):
    return _attention_fwd(q, k, v, chunks)[0]


def _attention_fwd(q, k, v, chunks):
    dtype = q.dtype
    outs, residuals = [], []
    for queries, keys_t, values in zip(_permuted_parts(q, _HEADS_FIRST, chunks),
                                       _permuted_parts(k, _KEYS_TRANSPOSED, chunks),
                                       _permuted_parts(v, _HEADS_FIRST, chunks)):
        scores = _dot(queries, keys_t, dtype) * q.shape[-1] ** -0.5        # float32 [b, h, q, k]
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = _dot(weights, values, dtype)                                 # float32 [b, h, q, d]
        outs.append(out.astype(dtype))
        residuals.append((queries, keys_t, values, weights, out))
    return _joined(outs, _HEADS_FIRST), residuals


def _attention_bwd(chunks, residuals, g):
    dtype = residuals[0][0].dtype
    grads = []
    g_parts = _permuted_parts(g.astype(dtype), _HEADS_FIRST, chunks)
    for (queries, keys_t, values, weights, out), g_part in zip(residuals, g_parts):
        d_weights = _dot_rhs_transposed(g_part, values, dtype)             # float32 [b, h, q, k]
        row_sums = jnp.sum(g_part.astype(jnp.float32) * out, -1, keepdims=True)  # Σ_k p·dp = Σ_d g·o
        d_scores = (weights.astype(jnp.float32) * (d_weights - row_sums) * queries.shape[-1] ** -0.5).astype(dtype)
        grads.append([_dot_rhs_transposed(d_scores, keys_t, dtype),         # dq
                      _dot(transpose(d_scores), queries, dtype),           # dk
                      _dot(transpose(weights), g_part, dtype)])            # dv
    return tuple(_joined([part[j].astype(dtype) for part in grads], _HEADS_FIRST) for j in range(3))


def _permuted_parts(x, axes, chunks):
    """`permute(x, axes)` as `chunks` parts of the batch, examples i, i + chunks, ... in part i:
    a batch sharded in contiguous blocks over devices keeps each part on its devices."""
    interleaved = x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:])
    return [permute(interleaved[:, i], axes) for i in range(chunks)]


def _joined(parts, axes):
    """The inverse of `_permuted_parts`: the parts interleaved back into one batch, permuted by `axes`."""
    return permute(jnp.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:]), axes)


_attention.defvjp(_attention_fwd, _attention_bwd)


class Dense(nn.Module):
    """`flax.linen.Dense` (int `features`) or `flax.linen.DenseGeneral` (a tuple of `features`,
    and `axis` naming trailing input axes) with its product through `dot_general` and its bias
    through `add_bias`: a drop-in whose parameter tree and initial values (for the same rng)
    are Flax's, as are its results; only the speed of its bfloat16 gradient differs."""
    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = sorted({a % x.ndim for a in ((self.axis,) if isinstance(self.axis, int) else self.axis)})
        if axes != list(range(x.ndim - len(axes), x.ndim)):
            raise ValueError(f"Dense contracts trailing input axes only; got axis={self.axis} for input {x.shape}")
        contracted = x.shape[x.ndim - len(axes):]
        # DenseGeneral's initialisation: the initialiser sees the kernel as [inputs, outputs].
        flat_init = lambda init, flat: lambda rng, shape, dtype: init(rng, flat, dtype).reshape(shape)  # noqa: E731
        kernel = self.param("kernel", flat_init(self.kernel_init, (math.prod(contracted), math.prod(features))),
                            contracted + features, self.param_dtype)
        bias = self.param("bias", flat_init(self.bias_init, (math.prod(features),)), features, self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        contract = (tuple(axes), tuple(range(len(axes))))
        return add_bias(dot_general(x, kernel, (contract, ((), ()))), bias)


def dots_off_fast_path(compiled_hlo: str) -> list[str]:
    """The dots of a compiled XLA:CPU module (`jax.jit(f).lower(...).compile().as_text()`) that
    do not run in a YNNPACK fusion, as 'name: shape' strings; [] when every product is on it.

    What the tests and `bench` use to check a model keeps its products on the fast path."""
    fast, blocks, name = set(), {}, None
    for line in compiled_hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(1)
            blocks[name] = []
        elif name is not None:
            blocks[name].append(line)
        if '"__ynn_fusion"' in line:
            fast.update(re.findall(r"calls=%([\w.\-]+)", line))
    return [f"{m.group(1)}: {m.group(2)}" for block, lines in blocks.items() if block not in fast
            for m in (re.search(r"%([\w.\-]+) = (\S+) dot\(", line) for line in lines) if m]
