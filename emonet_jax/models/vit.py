"""Vision Transformer whose parameter tree matches big_vision's ViT (and so SigLIP's image tower).

Parameter names (unscanned layout):

    embedding/{kernel,bias}                  conv patch embedding
    pos_embedding                            [1, num_patches, width], learned
    cls                                      [1, 1, width], only for pool='tok'
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                                 LayerNorm_1, MlpBlock_0/Dense_{0,1}
    Transformer/encoder_norm
    MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}   pool='map'

With `scan=True` the blocks are one `Transformer/encoderblock` subtree whose leaves carry a
leading depth axis (big_vision's scanned layout): compiles in constant time in the depth, and
`remat` recomputes activations in the backward pass instead of storing them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from emonet_jax.models import mixed_precision

POOLS = ("map", "gap", "tok", "none")


@dataclasses.dataclass(frozen=True)
class Size:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


# Named sizes (big_vision's, plus SigLIP's shape-optimised So400m and tiny ones for tests).
SIZES = {
    "mu": Size(width=32, depth=2, mlp_dim=64, num_heads=2),
    "xs": Size(width=64, depth=4, mlp_dim=256, num_heads=2),  # the demo's pre-trained tower
    "Ti": Size(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": Size(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": Size(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": Size(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": Size(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": Size(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}
_VARIANT = re.compile(r"^(?P<size>[A-Za-z0-9]+)/(?P<patch>\d+)$")


def parse_variant(variant: str) -> tuple[Size, int]:
    """'B/16' -> (Size of B, 16). Fails naming the known sizes."""
    match = _VARIANT.match(variant)
    if not match or match["size"] not in SIZES:
        raise ValueError(f"unknown ViT variant {variant!r}; expected SIZE/PATCH with SIZE in {sorted(SIZES)}, "
                         "e.g. 'B/16' or 'So400m/14'")
    return SIZES[match["size"]], int(match["patch"])


# How the encoder blocks compute softmax(q·k)·v: 'xla' is `mixed_precision.dot_product_attention`
# (XLA ops, any platform and dtype, its products on XLA:CPU's fast path); 'cudnn' is cuDNN's fused (flash) attention on an NVIDIA GPU, which
# never writes the [heads, tokens, tokens] weights to memory (bfloat16 compute only). The MAP
# head's single-query attention always uses 'xla'.
ATTENTION = ("xla", "cudnn")


def cudnn_attention(query, key, value):
    """`Attention`'s attention_fn (inputs [batch, tokens, heads, head_dim]) through cuDNN."""
    return even_length_attention(query, key, value, implementation="cudnn")


def even_length_attention(query, key, value, implementation=None):
    """`jax.nn.dot_product_attention` over an even number of tokens: cuDNN's training kernels
    reject odd lengths (So400m/14 at 384 px has 27² = 729 tokens), so an odd sequence gets one
    zero token, masked out as a key by the sequence lengths and dropped as a query."""
    tokens = query.shape[1]
    if tokens % 2 == 0:
        return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
    lengths = jnp.full((query.shape[0],), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(pad(query), pad(key), pad(value), query_seq_lengths=lengths,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :tokens]


class Attention(nn.Module):
    """`nn.MultiHeadDotProductAttention` without masks or attention dropout: its parameters
    (query/key/value [width, heads, head_dim], out [heads, head_dim, width], each with a bias),
    its initial values for the same rng and its results, with every projection a
    `mixed_precision.Dense` (products on XLA:CPU's fast path, bias gradients summed in float32)
    and the softmax in float32 (a bfloat16 one's sums over the keys are slow reduce-windows on
    XLA:CPU; BENCHMARKS.md "Train step"). `attention_fn` (None: `mixed_precision.dot_product_attention`,
    Flax's values with fast products) maps query, key, value [batch, tokens, heads, head_dim] to
    the same shape, e.g. `cudnn_attention`."""
    num_heads: int
    dtype: Any = jnp.float32
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, inputs_q, inputs_kv):
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"attention width {width} is not a multiple of num_heads={self.num_heads}")
        project = functools.partial(mixed_precision.Dense, dtype=self.dtype,
                                    kernel_init=nn.initializers.xavier_uniform())
        heads = (self.num_heads, width // self.num_heads)
        q = project(heads, name="query")(inputs_q)
        k = project(heads, name="key")(inputs_kv)
        v = project(heads, name="value")(inputs_kv)
        y = (self.attention_fn or mixed_precision.dot_product_attention)(q, k, v)
        return project(width, axis=(-2, -1), name="out")(y)


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        width = x.shape[-1]
        # nn.Dense's parameters, with the bias gradient summed in float32 (mixed_precision.add_bias).
        dense = lambda n: mixed_precision.Dense(n, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                                                bias_init=nn.initializers.normal(stddev=1e-6))
        x = nn.gelu(dense(self.mlp_dim)(x))
        x = nn.Dropout(self.dropout)(x, deterministic)
        return dense(width)(x)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = nn.LayerNorm(dtype=self.dtype)(x)
        fused = cudnn_attention if self.attention == "cudnn" else None
        # Named as Flax's layer was, which checkpoints and the importers (pretrained.py) use.
        y = Attention(self.num_heads, self.dtype, fused, name="MultiHeadDotProductAttention_0")(y, y)
        x = x + nn.Dropout(self.dropout)(y, deterministic)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, deterministic)
        return x + nn.Dropout(self.dropout)(y, deterministic)


class _ScannedBlock(Encoder1DBlock):
    """Encoder1DBlock with the (carry, _) -> (carry, _) signature nn.scan wants."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):  # noqa: D102
        return super().__call__(x, deterministic), None


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    scan: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout, dtype=self.dtype,
                  attention=self.attention)
        if self.scan:
            block = _ScannedBlock
            if self.remat:
                block = nn.remat(block, prevent_cse=False, static_argnums=(2,))
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=nn.broadcast, length=self.depth)
            x, _ = stack(name="encoderblock", **kw)(x, deterministic)
        else:
            block = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat else Encoder1DBlock
            for i in range(self.depth):
                x = block(name=f"encoderblock_{i}", **kw)(x, deterministic)
        return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens (SigLIP's pooling)."""
    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, _, width = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width), jnp.float32)
        probe = jnp.tile(probe, (batch, 1, 1)).astype(self.dtype)
        x = Attention(self.num_heads, self.dtype, name="MultiHeadDotProductAttention_0")(probe, x)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + MlpBlock(self.mlp_dim, dtype=self.dtype)(y)
        return x[:, 0]


def sincos_2d(height: int, width: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding [1, h*w, dim] (MoCo v3 / big_vision 'sincos2d')."""
    if dim % 4:
        raise ValueError(f"sincos2d needs a width divisible by 4, got {dim}")
    y, x = np.mgrid[:height, :width]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1 or 1))
    y = y.reshape(-1)[:, None] * omega[None]
    x = x.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


class ViT(nn.Module):
    """ViT image encoder. Returns (pooled [B, width], extras with 'tokens' [B, N, width]).

    `dtype` is the compute dtype (e.g. bfloat16); parameters stay float32.
    """
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 16
    posemb: str = "learn"          # 'learn' or 'sincos2d'
    pool: str = "map"
    dropout: float = 0.0
    scan: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"          # see ATTENTION

    @classmethod
    def from_variant(cls, variant: str, **kw) -> "ViT":
        size, patch = parse_variant(variant)
        return cls(**dataclasses.asdict(size), patch_size=patch, **kw)

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.attention == "cudnn" and self.dtype != jnp.bfloat16:
            raise ValueError("attention='cudnn' needs bfloat16 compute (model.compute_dtype='bfloat16')")
        deterministic = not train
        x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    name="embedding", dtype=self.dtype)(images.astype(self.dtype))
        batch, h, w, c = x.shape
        x = x.reshape(batch, h * w, c)
        x = x + self._position_embedding(h, w, c).astype(x.dtype)
        if self.pool == "tok":
            cls_token = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.tile(cls_token, (batch, 1, 1)).astype(x.dtype), x], axis=1)
        x = nn.Dropout(self.dropout)(x, deterministic)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.scan, self.remat,
                    self.dtype, self.attention, name="Transformer")(x, deterministic)
        tokens = x[:, 1:] if self.pool == "tok" else x
        if self.pool == "map":
            pooled = MAPHead(self.mlp_dim, self.num_heads, self.dtype)(x)
        elif self.pool == "gap":
            pooled = x.mean(axis=1)
        elif self.pool == "tok":
            pooled = x[:, 0]
        else:
            pooled = x
        return pooled, {"tokens": tokens}

    def _position_embedding(self, h: int, w: int, c: int):
        if self.posemb == "learn":
            return self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c),
                              jnp.float32)
        if self.posemb == "sincos2d":
            return jnp.asarray(sincos_2d(h, w, c))
        raise ValueError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")


def block_index(path: str, depth: int) -> int | None:
    """Which encoder block a parameter belongs to (0-based), for layer-wise LR decay.

    Returns -1 for parameters before the encoder (embedding, pos_embedding, cls) and `depth`
    for everything after it (encoder_norm, pooling head, task heads); None for scanned
    blocks (their leaves stack all depths; the caller handles the leading axis).
    """
    if re.search(r"(^|/)(embedding|pos_embedding|cls)(/|$)", path) and "Transformer" not in path:
        return -1
    match = re.search(r"Transformer/encoderblock_(\d+)/", path)
    if match:
        return int(match[1])
    if re.search(r"Transformer/encoderblock/", path):
        return None
    return depth

