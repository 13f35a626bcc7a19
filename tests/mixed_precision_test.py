"""models/mixed_precision: values and gradients against float64, every branch of the VJP, the
shapes that must avoid bfloat16, and (on CPU) that the compiled products stay on the fast path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from emonet_jax import tree
from emonet_jax.models import mixed_precision as mp

ON_CPU = jax.default_backend() == "cpu"


def reference(a, b, w):
    """float64 a @ b and the gradients of sum(w * (a @ b)) (batch axes leading)."""
    a64, b64, w64 = (np.asarray(t, np.float64) for t in (a, b, w))
    return a64 @ b64, w64 @ np.swapaxes(b64, -1, -2), np.swapaxes(a64, -1, -2) @ w64


def relative_error(got, want):
    return np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)


def random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# (a, b) shapes. In the VJP: da copies b when K*N <= M*N + M*K, else g and the result; db copies
# a when M*K <= M*N + K*N, else g and the result. These cover all four choices and a batch axis.
SHAPES = {"both copy operands": ((64, 96), (96, 80)),
          "da copies g": ((8, 128), (128, 256)),
          "db copies g": ((256, 128), (128, 8)),
          "batched": ((5, 16, 48), (5, 48, 24))}


@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_matmul_and_its_gradients_match_float64(shapes, dtype, tolerance):
    a, b = random(shapes[0], 0), random(shapes[1], 1)
    w = random(shapes[0][:-1] + shapes[1][-1:], 2)
    out = jax.jit(mp.matmul, static_argnums=2)(a, b, dtype)
    da, db = jax.jit(jax.grad(lambda a, b: jnp.sum(w * mp.matmul(a, b, dtype)), (0, 1)))(a, b)
    assert out.dtype == da.dtype == db.dtype == jnp.float32  # cotangents in the operands' dtype
    for got, want in zip((out, da, db), reference(a, b, w)):
        assert relative_error(got, want) < tolerance
    if dtype == jnp.bfloat16:  # the products really are bfloat16 (not float32 in disguise)
        exact = jax.jit(jax.grad(lambda a, b: jnp.sum(w * mp.matmul(a, b, jnp.float32))))(a, b)
        assert not np.array_equal(np.asarray(da), np.asarray(exact))


def test_bfloat16_operands_get_bfloat16_cotangents():
    a, b = jnp.asarray(random((16, 32), 0), jnp.bfloat16), random((32, 24), 1)
    da, db = jax.grad(lambda a, b: jnp.sum(mp.matmul(a, b)).astype(jnp.float32), (0, 1))(a, b)
    assert da.dtype == jnp.bfloat16 and db.dtype == jnp.float32


@pytest.mark.parametrize("shapes", [((40, 1, 32), (40, 32, 9)), ((7, 64), (64, 1)), ((4, 4), (4, 4))],
                         ids=["M=1", "N=1", "all below 8"])
def test_shapes_off_the_fast_path_are_computed_in_float32(shapes):
    # A bfloat16 dot of these shapes would reach Eigen, which fails ("BF16 x BF16 = F32").
    a, b = random(shapes[0], 0), random(shapes[1], 1)
    value, (da, db) = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(mp.matmul(a, b) ** 2), (0, 1)))(a, b)
    want = a.astype(np.float64) @ b
    np.testing.assert_allclose(float(value), np.sum(want ** 2), rtol=1e-5)
    np.testing.assert_allclose(da, 2 * want @ np.swapaxes(b, -1, -2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, 2 * np.swapaxes(a, -1, -2) @ want, rtol=1e-4, atol=1e-4)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(5, 6\)"):
        mp.matmul(jnp.ones((3, 4)), jnp.ones((5, 6)))
    with pytest.raises(ValueError, match="equal batch axes"):
        mp.matmul(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 5)))


def test_transpose_swaps_the_last_two_axes():
    x = random((3, 5, 7), 0)
    np.testing.assert_array_equal(jax.jit(mp.transpose)(x), np.swapaxes(x, 1, 2))
    np.testing.assert_array_equal(mp.transpose(x), np.swapaxes(x, 1, 2))


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's YNNPACK fast path")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_every_product_of_the_gradient_stays_on_the_cpu_fast_path(dtype):
    """If a jax upgrade changes how XLA:CPU lays out transposes, this fails (see the module docstring)."""
    def loss(a, b, c):  # a chain of products: every gradient needs transposed operands
        return jnp.sum(jnp.tanh(mp.matmul(jax.nn.relu(mp.matmul(a, b, dtype)), c, dtype)))

    shapes = [(8, 128), (128, 256), (256, 64)]  # M = 8 also takes the copy-g branch
    args = [random(s, i) for i, s in enumerate(shapes)]
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile().as_text()
    assert mp.dots_off_fast_path(compiled) == []
    # The check itself sees a product that is not on it: autodiff's own gradient of a @ b.
    plain = jax.jit(jax.grad(lambda a, b: jnp.sum(a @ b), (0, 1))).lower(*args[:2]).compile().as_text()
    assert mp.dots_off_fast_path(plain)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flax_layers_with_dot_general_match_their_defaults(dtype):
    """Dense, DenseGeneral over two axes, attention: same parameters, same values and gradients."""
    x = random((2, 12, 32), 0)
    layers = {
        "dense": lambda **kw: nn.Dense(24, dtype=dtype, **kw),
        "dense_general": lambda **kw: nn.DenseGeneral((4, 6), axis=(-2, -1), dtype=dtype, **kw),
        "attention": lambda **kw: nn.MultiHeadDotProductAttention(
            num_heads=4, dtype=dtype, **{f"{p}_{k}": v for k, v in kw.items() for p in ("qkv", "out")}),
    }
    for name, make in layers.items():
        inputs = x.reshape(2, 12, 8, 4) if name == "dense_general" else x
        default, ours = make(), make(dot_general=mp.dot_general)
        params = default.init(jax.random.key(0), inputs)
        assert jax.tree.structure(params) == jax.tree.structure(ours.init(jax.random.key(0), inputs))
        loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, inputs).astype(jnp.float32)))  # noqa: E731
        for m in (default, ours):
            assert m.apply(params, inputs).dtype == dtype, name
        want, got = (jax.jit(jax.grad(loss(m)))(params) for m in (default, ours))
        tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
        want, got = tree.flatten(want), tree.flatten(got)
        for path, leaf in want.items():
            if path == "params/key/bias":
                # Zero in exact arithmetic (softmax ignores a shift shared by all keys): both are
                # rounding noise, so compare them with the scale of the query bias's gradient.
                scale = np.linalg.norm(np.asarray(want["params/query/bias"], np.float64))
                assert max(np.linalg.norm(got[path]), np.linalg.norm(leaf)) < tolerance * scale, (name, path)
                continue
            assert relative_error(got[path], np.asarray(leaf, np.float64)) < tolerance, (name, path)


def test_dot_general_passes_other_forms_to_lax():
    a, b = random((3, 4, 5), 0), random((3, 5, 6), 1)
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(mp.dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's YNNPACK fast path")
@pytest.mark.parametrize("pool", ["gap", "map"])
def test_a_bfloat16_vit_keeps_its_products_on_the_cpu_fast_path(pool):
    from emonet_jax.models import vit
    model = vit.ViT(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8, pool=pool, dtype=jnp.bfloat16)
    images = jnp.ones((2, 32, 32, 3))
    params = model.init(jax.random.key(0), images)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, images)[0].astype(jnp.float32) ** 2)  # noqa: E731
    off = mp.dots_off_fast_path(jax.jit(jax.grad(loss)).lower(params).compile().as_text())
    # Only the MAP head's single-query attention may leave it ([batch=2, heads=4, 1 query, 16
    # keys] and its transpose): YNNPACK declines a batched product with an M or N of 1.
    single_query = [line for line in off if re.search(r"\[2,4,(1,16|16,1)\]", line)]
    assert off == single_query, off
    assert bool(off) == (pool == "map")


def attention_reference(q, k, v, g):
    """float64 softmax(q·kᵀ/√d)·v over [batch, tokens, heads, head_dim], and the gradients of
    sum(g * out) with respect to q, k and v."""
    q, k, v, g = (np.asarray(t, np.float64) for t in (q, k, v, g))
    scale = q.shape[-1] ** -0.5
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v)
    dp = np.einsum("bqhd,bkhd->bhqk", g, v)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
    return out, (np.einsum("bhqk,bkhd->bqhd", ds, k), np.einsum("bhqk,bqhd->bkhd", ds, q),
                 np.einsum("bhqk,bqhd->bkhd", p, g))


# (query, key/value) shapes [batch, tokens, heads, head_dim]: self-attention on the fast path,
# more keys than queries, and the MAP head's single query (Flax's function).
ATTENTION_SHAPES = {"self": ((2, 24, 3, 16), (2, 24, 3, 16)),
                    "cross": ((2, 12, 2, 8), (2, 20, 2, 8)),
                    "single query": ((2, 1, 3, 16), (2, 24, 3, 16))}


@pytest.mark.parametrize("shapes", ATTENTION_SHAPES.values(), ids=ATTENTION_SHAPES.keys())
@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_and_its_gradients_match_float64(shapes, dtype, tolerance):
    q_shape, kv_shape = shapes
    q, k, v = (2 * random(shape, seed) for seed, shape in enumerate((q_shape, kv_shape, kv_shape)))
    g = random(q_shape, 3)
    want, want_grads = attention_reference(q, k, v, g)
    q, k, v = (jnp.asarray(t, dtype) for t in (q, k, v))
    out, vjp = jax.vjp(mp.dot_product_attention, q, k, v)
    assert out.dtype == dtype and out.shape == q_shape
    assert relative_error(out, want) < tolerance
    for name, got, exact in zip("qkv", vjp(jnp.asarray(g, dtype)), want_grads):
        assert got.dtype == dtype
        assert relative_error(got, exact) < tolerance, name


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_attention_has_flax_values(dtype, tolerance):
    q, k, v = (jnp.asarray(random((2, 24, 3, 16), seed), dtype) for seed in range(3))
    flax_out = nn.dot_product_attention(q, k, v, dtype=dtype, force_fp32_for_softmax=True)
    assert relative_error(mp.dot_product_attention(q, k, v), np.asarray(flax_out, np.float64)) < tolerance


def test_attention_names_bad_operands():
    x = jnp.ones((2, 8, 3, 16))
    with pytest.raises(ValueError, match=r"query \[batch, q_tokens, heads, head_dim\].*\(2, 8, 3, 16\), \(2, 8, 4, 16\)"):
        mp.dot_product_attention(x, jnp.ones((2, 8, 4, 16)), jnp.ones((2, 8, 4, 16)))
    with pytest.raises(ValueError, match="one dtype, got float32, bfloat16, float32"):
        mp.dot_product_attention(x, x.astype(jnp.bfloat16), x)


@pytest.mark.parametrize("batch, devices, local_devices, cores, want", [
    (8, 1, 1, 2, 2),     # ViT-B/16 at batch 8 on 2 cores: halves
    (6, 1, 1, 4, 3),     # the largest divisor of the batch within the cores
    (7, 1, 1, 2, 1),     # a prime batch is not split unevenly
    (2, 1, 1, 16, 2),    # never more parts than examples
    (8, 1, 1, 1, 1),     # one core: one attention
    (16, 2, 1, 4, 4),    # each process's device takes its share of the batch
    (16, 8, 8, 2, 1),    # 8 simulated devices on 2 cores (the tests' setting)
    (6, 4, 4, 16, 1),    # a batch the devices do not divide
])
def test_attention_is_split_into_as_many_parts_as_cores_per_device(batch, devices, local_devices, cores, want):
    assert mp.chunks_for(batch, devices, local_devices, cores) == want


@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_in_parts_equals_attention_in_one_piece(chunks, dtype):
    """The parts are the same products on fewer examples, so values and gradients agree to
    rounding; interleaving (examples i, i + chunks, ... in part i) puts every example back."""
    q_shape = kv_shape = (6, 20, 3, 16)
    q, k, v, g = (jnp.asarray(2 * random(s, seed), dtype) for seed, s in enumerate((q_shape, kv_shape, kv_shape, q_shape)))
    whole_out, whole_vjp = jax.vjp(jax.jit(lambda q, k, v: mp._attention(q, k, v, 1)), q, k, v)
    parts_out, parts_vjp = jax.vjp(jax.jit(lambda q, k, v: mp._attention(q, k, v, chunks)), q, k, v)
    tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
    assert relative_error(parts_out, np.asarray(whole_out, np.float64)) < tolerance
    for name, got, want in zip("qkv", parts_vjp(g), whole_vjp(g)):
        assert got.dtype == dtype
        assert relative_error(got, np.asarray(want, np.float64)) < tolerance, name
    # An example's rows must come back to its own place: swap two examples and the error is large.
    swapped = np.asarray(parts_out)[[1, 0, 2, 3, 4, 5]]
    assert relative_error(swapped, np.asarray(whole_out, np.float64)) > 0.1


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's YNNPACK fast path")
def test_attention_in_parts_runs_every_product_on_the_fast_path(monkeypatch):
    def compiled(chunks):
        monkeypatch.setattr(mp, "attention_chunks", lambda batch: chunks)
        q = jnp.asarray(random((4, 24, 3, 16), 0), jnp.bfloat16)
        loss = lambda q: jnp.sum(mp.dot_product_attention(q, q, q).astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(q).compile().as_text()
    whole, parts = compiled(1), compiled(2)
    assert mp.dots_off_fast_path(parts) == []
    # Each part has its own products, on [2, 3, 24, ...] operands: independent ops XLA can run side by side.
    count = lambda text, batch: len(re.findall(rf"= f32\[{batch},3,24,\d+\]\S* dot\(", text))  # noqa: E731
    assert count(whole, 4) > 0 and count(parts, 2) == 2 * count(whole, 4) and count(parts, 4) == 0


# (our layer, Flax's, input shape): nn.Dense, and nn.DenseGeneral contracting two axes into two.
DENSE_LAYERS = {
    "dense": (lambda **kw: mp.Dense(40, **kw), lambda **kw: nn.Dense(40, **kw), (4, 50, 24)),
    "dense_general": (lambda **kw: mp.Dense((5, 8), axis=(-2, -1), **kw),
                      lambda **kw: nn.DenseGeneral((5, 8), axis=(-2, -1), **kw), (4, 50, 6, 4)),
}


@pytest.mark.parametrize("layer", DENSE_LAYERS.values(), ids=DENSE_LAYERS.keys())
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_is_flax_dense_with_a_float32_bias_gradient(layer, dtype):
    make_ours, make_flax, shape = layer
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    kw = dict(dtype=dtype, bias_init=nn.initializers.normal(0.1))
    ours, flax_dense = make_ours(**kw), make_flax(dot_general=mp.dot_general, **kw)
    params, flax_params = ours.init(jax.random.key(1), x), flax_dense.init(jax.random.key(1), x)
    # The same parameter tree and initial values for the same rng: checkpoints and imports load as before.
    assert tree.flatten(params).keys() == tree.flatten(flax_params).keys()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
        np.testing.assert_array_equal(a, b)
    out = ours.apply(params, x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, flax_dense.apply(params, x))

    def grads(module):
        return jax.grad(lambda p: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32))))(params)["params"]
    ours_grads, flax_grads = grads(ours), grads(flax_dense)
    np.testing.assert_array_equal(ours_grads["kernel"], flax_grads["kernel"])
    bias_ndim = params["params"]["bias"].ndim
    exact = jnp.sum(jnp.cos(out.astype(jnp.float32)), tuple(range(out.ndim - bias_ndim)))  # summed in float32
    rounding = 0 if dtype == jnp.float32 else 2.0 ** -8           # one bfloat16 rounding of the sum
    np.testing.assert_allclose(ours_grads["bias"], exact, rtol=rounding + 1e-5, atol=1e-5)


def test_dense_names_what_it_cannot_contract():
    with pytest.raises(ValueError, match=r"trailing input axes only; got axis=\(0,\) for input \(3, 4\)"):
        mp.Dense(5, axis=(0,)).init(jax.random.key(0), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"does not end with the bias's shape \(5,\)"):
        mp.add_bias(jnp.ones((3, 4)), jnp.ones(5))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's tree-reduction rewrite")
@pytest.mark.parametrize("layer", ["dense", "attention"])
def test_bfloat16_gradients_sum_their_biases_without_a_reduce_window(layer):
    """Flax's bfloat16 layers' gradients at these shapes have reduce-windows (their bias sums);
    ours have none."""
    from emonet_jax.models import vit
    x = jnp.ones((8, 196, 256), jnp.float32)
    if layer == "dense":
        ours, flax_layer, inputs = mp.Dense(256, dtype=jnp.bfloat16), nn.Dense(256, dtype=jnp.bfloat16), (x,)
    else:
        ours = vit.Attention(4, jnp.bfloat16)
        flax_layer = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16, force_fp32_for_softmax=True)
        inputs = (x, x)

    def compiled_gradient(module):
        params = module.init(jax.random.key(0), *inputs)
        grad = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, *inputs).astype(jnp.float32) ** 2)))
        return grad.lower(params).compile().as_text()
    assert "reduce-window" in compiled_gradient(flax_layer)
    assert "reduce-window" not in compiled_gradient(ours)
