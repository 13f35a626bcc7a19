"""The ViT's parameter names (big_vision / SigLIP layout), variants, pooling and heads."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emonet_jax import tree
from emonet_jax.models import emonet, vit

BLOCK = ("LayerNorm_0/{bias,scale}", "LayerNorm_1/{bias,scale}", "MlpBlock_0/Dense_0/{bias,kernel}",
         "MlpBlock_0/Dense_1/{bias,kernel}", *(f"MultiHeadDotProductAttention_0/{n}/{{bias,kernel}}"
                                                for n in ("key", "out", "query", "value")))


def expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    return [p for alt in match[1].split(",") for p in expand(pattern[:match.start()] + alt + pattern[match.end():])]


def shapes(model, size=32):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return {p: x.shape for p, x in tree.flatten(variables["params"]).items()}


def test_unscanned_names_match_big_vision():
    got = shapes(vit.ViT.from_variant("mu/8", pool="map"))
    expected = {"embedding/kernel", "embedding/bias", "pos_embedding", "Transformer/encoder_norm/bias",
                "Transformer/encoder_norm/scale", "MAPHead_0/probe",
                *(p for b in ("LayerNorm_0/{bias,scale}", "MlpBlock_0/Dense_0/{bias,kernel}",
                              "MlpBlock_0/Dense_1/{bias,kernel}",
                              *(f"MultiHeadDotProductAttention_0/{n}/{{bias,kernel}}"
                                for n in ("key", "out", "query", "value"))) for p in expand("MAPHead_0/" + b)),
                *(p for i in range(2) for b in BLOCK for p in expand(f"Transformer/encoderblock_{i}/{b}"))}
    assert set(got) == expected
    assert got["embedding/kernel"] == (8, 8, 3, 32)
    assert got["pos_embedding"] == (1, 16, 32)
    assert got["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"] == (32, 2, 16)
    assert got["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"] == (2, 16, 32)


def test_scanned_layout_stacks_blocks_on_a_leading_axis():
    plain = shapes(vit.ViT.from_variant("mu/8"))
    scanned = shapes(vit.ViT.from_variant("mu/8", scan=True, remat=True))
    for path, shape in plain.items():
        m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", path)
        if m:
            assert scanned[f"Transformer/encoderblock/{m[2]}"] == (2, *shape)
        else:
            assert scanned[path] == shape
    assert not any("encoderblock_" in p for p in scanned)


def test_scan_and_loop_compute_the_same_function():
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain = vit.ViT.from_variant("mu/8")
    scanned = vit.ViT.from_variant("mu/8", scan=True, remat=True)
    params = plain.init(jax.random.key(0), images)["params"]
    flat = tree.flatten(params)
    stacked = {}
    for path, x in flat.items():
        m = re.match(r"Transformer/encoderblock_(\d+)/(.*)", path)
        if m:
            stacked.setdefault(f"Transformer/encoderblock/{m[2]}", []).append(x)
        else:
            stacked[path] = x
    stacked = {p: jnp.stack(v) if isinstance(v, list) else v for p, v in stacked.items()}
    a, _ = plain.apply({"params": params}, images)
    b, _ = scanned.apply({"params": tree.unflatten(stacked)}, images)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("pool,extra", [("gap", set()), ("tok", {"cls"}), ("map", {"MAPHead_0/probe"})])
def test_pooling_options(pool, extra):
    model = vit.ViT.from_variant("mu/8", pool=pool)
    got = shapes(model)
    assert extra <= set(got)
    assert ("cls" in got) == (pool == "tok")
    assert any(p.startswith("MAPHead_0") for p in got) == (pool == "map")
    images = jnp.ones((3, 32, 32, 3))
    pooled, extras = model.apply(model.init(jax.random.key(0), images), images)
    assert pooled.shape == (3, 32) and extras["tokens"].shape == (3, 16, 32)


@pytest.mark.parametrize("variant,width,depth,mlp,heads,patch", [
    ("Ti/16", 192, 12, 768, 3, 16), ("S/16", 384, 12, 1536, 6, 16), ("B/16", 768, 12, 3072, 12, 16),
    ("L/14", 1024, 24, 4096, 16, 14), ("So400m/14", 1152, 27, 4304, 16, 14)])
def test_named_variants(variant, width, depth, mlp, heads, patch):
    model = vit.ViT.from_variant(variant, scan=True)
    got = shapes(model, size=patch * 4)
    assert got["embedding/kernel"] == (patch, patch, 3, width)
    assert got["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (depth, width, mlp)
    assert got["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (
        depth, width, heads, width // heads)
    assert got["pos_embedding"] == (1, 16, width)


def test_so400m_has_about_400m_parameters():
    got = shapes(vit.ViT.from_variant("So400m/14", scan=True), size=14 * 27)
    total = sum(int(np.prod(s)) for s in got.values())
    assert 395e6 < total < 435e6, total


def test_bad_variant_names_the_sizes():
    with pytest.raises(ValueError, match="So400m"):
        vit.parse_variant("XXL/16")
    with pytest.raises(ValueError, match="SIZE/PATCH"):
        vit.parse_variant("B16")


def test_emotion_model_outputs_and_head_names():
    model = emonet.EmotionModel(img=vit.ViT.from_variant("mu/8"), head_hidden=(16,))
    images = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)
    names = tree.param_paths(variables["params"])
    assert {"emotion_head/kernel", "extra_head/kernel", "head_hidden_0/kernel"} <= set(names)
    assert all(p.startswith(("img/", "emotion_head/", "extra_head/", "head_hidden_0/")) for p in names)
    out = model.apply(variables, images)
    assert out["logits"].shape == (2, 40, 8) and out["extra"].shape == (2, 4) and out["embedding"].shape == (2, 32)
    # Zero-initialised heads: uniform over the 8 levels, expected intensity 3.5, presence 7/8.
    np.testing.assert_allclose(emonet.expected_intensity(out["logits"]), 3.5, atol=1e-6)
    np.testing.assert_allclose(emonet.presence_probability(out["logits"]), 7 / 8, atol=1e-6)


def test_pool_none_heads_read_every_token_at_its_position():
    # With pool='none' the head's kernel has one row per (token, channel).
    model = emonet.EmotionModel(img=vit.ViT.from_variant("mu/8", pool="none"), extra_head=False)
    images = jnp.zeros((2, 32, 32, 3))
    params = model.init(jax.random.key(0), images)["params"]
    assert params["emotion_head"]["kernel"].shape == (16 * 32, 40 * 8)
    out = model.apply({"params": params}, images)
    assert out["logits"].shape == (2, 40, 8) and out["embedding"].shape == (2, 16, 32)


def test_readouts_of_a_known_distribution():
    p = np.array([0.5, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.25])
    logits = jnp.log(jnp.asarray(p) + 1e-30)[None]
    np.testing.assert_allclose(emonet.expected_intensity(logits), [0.25 * 2 + 0.25 * 7], rtol=1e-6)
    np.testing.assert_allclose(emonet.presence_probability(logits), [0.5], rtol=1e-6)
    log_present, log_absent = emonet.presence_log_probs(jnp.asarray([[100.0, -100, 0, 0, 0, 0, 0, 0]]))
    assert np.isfinite(log_present).all() and np.isfinite(log_absent).all()


def test_sincos_position_embedding():
    model = vit.ViT.from_variant("mu/8", posemb="sincos2d")
    assert "pos_embedding" not in shapes(model)
    emb = vit.sincos_2d(4, 4, 32)
    assert emb.shape == (1, 16, 32) and len({tuple(r) for r in np.round(emb[0], 6)}) == 16


def test_bfloat16_compute_keeps_float32_parameters():
    model = emonet.EmotionModel(img=vit.ViT.from_variant("mu/8", dtype=jnp.bfloat16))
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    assert {x.dtype for x in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    pooled, _ = model.img.apply({"params": variables["params"]["img"]}, images)
    assert pooled.dtype == jnp.bfloat16
    out = model.apply(variables, images)
    assert out["logits"].dtype == jnp.float32 and np.isfinite(out["logits"]).all()
    full = emonet.EmotionModel(img=vit.ViT.from_variant("mu/8")).apply(variables, images)
    np.testing.assert_allclose(out["embedding"].astype(np.float32), full["embedding"], atol=0.1)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("queries", [5, 1], ids=["self", "probe"])
def test_attention_is_flax_attention(dtype, tolerance, queries):
    """vit.Attention has nn.MultiHeadDotProductAttention's parameters, initial values, results
    and gradients (self-attention as in the blocks, and a single query as in the MAP head)."""
    import flax.linen as nn
    inputs_kv = jax.random.normal(jax.random.key(0), (2, 5, 32))
    inputs_q = inputs_kv if queries == 5 else jax.random.normal(jax.random.key(1), (2, 1, 32))
    ours = vit.Attention(num_heads=4, dtype=dtype)
    flax_attention = nn.MultiHeadDotProductAttention(num_heads=4, dtype=dtype, force_fp32_for_softmax=True,
                                                     kernel_init=nn.initializers.xavier_uniform())
    params = ours.init(jax.random.key(2), inputs_q, inputs_kv)
    flax_params = flax_attention.init(jax.random.key(2), inputs_q, inputs_kv)
    assert tree.flatten(params).keys() == tree.flatten(flax_params).keys()
    for path, leaf in tree.flatten(flax_params).items():
        np.testing.assert_array_equal(tree.flatten(params)[path], leaf, err_msg=path)
    want = flax_attention.apply(params, inputs_q, inputs_kv)
    got = ours.apply(params, inputs_q, inputs_kv)
    assert got.dtype == want.dtype == dtype

    def relative(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)
    assert relative(got, want) < tolerance
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, inputs_q, inputs_kv).astype(jnp.float32)))  # noqa: E731
    want_grads, got_grads = (tree.flatten(jax.grad(loss(m))(params)) for m in (flax_attention, ours))
    # Measured against the largest gradient: the key bias's is zero in exact arithmetic (softmax
    # ignores a shift shared by all keys), so both layers give rounding noise there.
    scale = max(np.abs(leaf).max() for leaf in want_grads.values())
    for path, leaf in want_grads.items():
        assert np.abs(np.asarray(got_grads[path], np.float64) - leaf).max() <= tolerance * scale, path


@pytest.mark.parametrize("tokens", [9, 10])
def test_even_length_attention_equals_flax_attention(tokens):
    """The padding that lets cuDNN take an odd token count changes neither values nor gradients
    (run here with XLA's implementation of the same call; cuDNN itself needs a GPU)."""
    import flax.linen as nn
    q, k, v = (jax.random.normal(jax.random.key(i), (2, tokens, 3, 8)) for i in range(3))
    np.testing.assert_allclose(vit.even_length_attention(q, k, v, "xla"), nn.dot_product_attention(q, k, v),
                               atol=1e-6)
    loss = lambda f: lambda q: (f(q, k, v) ** 2).sum()
    np.testing.assert_allclose(jax.grad(loss(lambda *a: vit.even_length_attention(*a, "xla")))(q),
                               jax.grad(loss(nn.dot_product_attention))(q), atol=1e-5)


def test_attention_option_errors_name_the_choices():
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"attention must be one of \('xla', 'cudnn'\), got 'flash'"):
        vit.ViT.from_variant("mu/8", attention="flash").init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="needs bfloat16 compute"):
        vit.ViT.from_variant("mu/8", attention="cudnn").init(jax.random.key(0), images)
