"""EmpathicInsight-Face heads: the batched model equals 40 separate MLPs, masks, learning, export
round trip and strictness, and the recipe end to end (embed -> pre-train -> fine-tune -> HQ)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import empathic_insight
from emonet_jax import embed, heads_train, taxonomy, tree
from emonet_jax.models import heads, mixed_precision

REPO = pathlib.Path(__file__).resolve().parents[1]
E = taxonomy.NUM_EMOTIONS


def init(model, dim, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros((1, dim)))["params"]


def write_fake_cache(cache_dir: pathlib.Path, arrays: dict, split="emonet_face_big/64:train", **meta) -> pathlib.Path:
    """A one-shard cache in embed.py's layout (meta.json + shard-00000-of-00001.npz)."""
    n, dim = arrays["embeddings"].shape
    cache_dir.mkdir(parents=True)
    fields = sorted(k for k in arrays if k != "embeddings")
    meta = {"format": embed.FORMAT, "backbone": "fake", "backbone_config": {}, "backbone_fingerprint": "sha256:0",
            "image_size": 32, "dim": dim, "dtype": "float32", "split": split, "data_dir": "", "num_rows": n,
            "shard_size": n, "num_shards": 1, "fields": fields, **meta}
    (cache_dir / "meta.json").write_text(json.dumps(meta))
    np.savez(cache_dir / embed.shard_name(0, 1), row=np.arange(n, dtype=np.int64),
             image_id=np.asarray([f"{i:05d}" for i in range(n)]), **arrays)
    return cache_dir


def linear_cache(n=512, dim=16, seed=0, masked=0.3):
    """Embeddings whose 40 targets are an affine function of them (clipped to 0-7); a share of
    the pairs is masked and their labels set to 100, which must not matter."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    weights = rng.standard_normal((dim, E)).astype(np.float32) * 0.5
    y = np.clip(3.5 + x @ weights, 0, 7).astype(np.float32)
    mask = rng.random((n, E)) > masked
    return {"embeddings": x, "mean_intensity": np.where(mask, y, 100).astype(np.float32),
            "soft_label_mask": mask}, y


def train_epochs(model, stage, data, epochs, seed=0, step=None):
    """The trainer's loop over `epochs` (its step, batches and state); `step` reuses a compiled one."""
    steps = epochs * heads_train.steps_per_epoch(len(data["x"]), stage.batch_size)
    tx, _ = heads_train.make_optimizer(stage, steps)
    state = jax.jit(lambda: heads_train.new_state(model, tx, data["x"].shape[1], seed))()
    step = step or heads_train.make_train_step(model, tx, stage.target, seed)
    device_data = heads_train.device_data(data)
    for epoch in range(epochs):
        for rows, valid in heads_train.epoch_batches(len(data["x"]), stage.batch_size, seed, 0, epoch):
            state, _ = step(state, device_data, rows, valid)
    return state


# --- the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [heads.VARIANTS["small"], (24, 16, 8), ()])
def test_batched_heads_equal_40_separate_mlps(hidden):
    dim = 48
    model = heads.Heads(hidden=hidden)
    params = init(model, dim)
    per_head = heads.per_head_layout(params)
    assert {p: v.shape for p, v in tree.flatten(per_head).items()} == heads.param_shapes(hidden, dim)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(heads.module_layout(per_head)),
                                                   jax.tree.leaves(params)))
    x = np.random.default_rng(1).standard_normal((7, dim)).astype(np.float32)
    batched = np.asarray(model.apply({"params": params}, x))
    one = jax.jit(heads.Head(hidden=hidden).apply)  # compiled once, applied to each head's slice
    separate = np.stack([np.asarray(one({"params": heads.head_params(params, e)}, x)) for e in range(E)], 1)
    assert batched.shape == (7, E)
    np.testing.assert_allclose(batched, separate, atol=1e-6, rtol=0)
    # Each head has its own initialisation.
    kernel = params["Dense_0"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])


def test_bfloat16_heads_stay_as_close_to_float32_as_rounding_allows():
    x = np.random.default_rng(2).standard_normal((9, 64)).astype(np.float32)
    model32, model16 = heads.Heads(hidden=(32, 16)), heads.Heads(hidden=(32, 16), compute_dtype="bfloat16")
    params = init(model32, 64)
    out32, out16 = (np.asarray(jax.jit(m.apply)({"params": params}, x)) for m in (model32, model16))
    assert 0 < np.abs(out32 - out16).max() < 0.02 * np.abs(out32).max()
    # The yardstick: float32 gradients at bfloat16-rounded parameters and inputs (with 9
    # examples a rounding flips enough ReLU gates to move the gradients by a few percent).
    rounded = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), t)  # noqa: E731
    grad = lambda m: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply({"params": p}, x)))))  # noqa: E731
    g32, g16 = tree.flatten(grad(model32)(params, x)), tree.flatten(grad(model16)(params, x))
    g_rounded = tree.flatten(grad(model32)(rounded(params), rounded(x)))
    for path in g32:  # bf16 backward with float32 accumulation and float32 gradients
        assert g16[path].dtype == np.float32, path
        error, yardstick = (np.linalg.norm(g - g32[path]) for g in (g16[path], g_rounded[path]))
        assert 0 < error < 1.5 * yardstick + 1e-3 * np.linalg.norm(g32[path]), (path, error, yardstick)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's YNNPACK fast path")
def test_the_bfloat16_train_step_keeps_its_products_on_the_cpu_fast_path():
    model = heads.Heads(hidden=heads.VARIANTS["small"], dropout=0.1, compute_dtype="bfloat16")
    stage = empathic_insight.get_config("small").pretrain
    tx, _ = heads_train.make_optimizer(stage, 10)
    state = jax.jit(lambda: heads_train.new_state(model, tx, 64, 0))()
    data = heads_train.device_data({"x": np.zeros((100, 64), np.float32), "target": np.zeros((100, E), np.float32),
                                    "mask": np.ones((100, E), np.float32)})
    rows, valid = heads_train.epoch_batches(100, 24, 0, 0, 0)[0]
    compiled = heads_train.make_train_step(model, tx, "intensity", 0).lower(state, data, rows, valid).compile()
    off = mixed_precision.dots_off_fast_path(compiled.as_text())
    # Only the last layer's products (one output per head, N = 1: its forward [40, 24, 1] and
    # its kernel gradient [40, 32, 1], stored [40, 32] once XLA drops the 1) run elsewhere, in float32.
    shapes = [line.split(": ")[1].split("{")[0] for line in off]
    assert shapes and all(s in (f"f32[{E},24,1]", f"f32[{E},32]", f"f32[{E},32,1]") for s in shapes), off


def test_dropout_masks_differ_between_heads():
    model = heads.Heads(hidden=(64,), dropout=0.5)
    params = init(model, 8)
    # Identical heads: any difference between their outputs comes from their dropout masks.
    params = heads.module_layout(jax.tree.map(lambda p: jnp.broadcast_to(p[:1], p.shape), heads.per_head_layout(params)))
    x = jnp.ones((4, 8))
    out = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})
    assert len(np.unique(np.asarray(out[0]).round(5))) > 1
    assert np.ptp(np.asarray(model.apply({"params": params}, x)[0])) < 1e-5


def test_hash_dropout_keeps_the_expected_share_and_the_mean():
    x = jnp.ones((40, 256, 128))
    out = np.asarray(heads.HashDropout(0.1, deterministic=False).apply({}, x, rngs={"dropout": jax.random.key(3)}))
    kept = out > 0
    assert abs(kept.mean() - 0.9) < 0.003 and np.allclose(out[kept], 1 / 0.9)
    again = heads.HashDropout(0.1, deterministic=False).apply({}, x, rngs={"dropout": jax.random.key(4)})
    assert 0.15 < float(np.mean((np.asarray(again) > 0) != kept)) < 0.2  # independent masks: 2 * 0.9 * 0.1
    # Neighbouring elements are not correlated (a weak counter hash would show it here).
    flat = kept.reshape(-1).astype(np.float64)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.01


# --- losses, masks and the update step -------------------------------------------------------

def test_a_masked_emotion_gives_its_head_zero_gradient():
    model = heads.Heads(hidden=(16,))
    params = init(model, 12)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 12)).astype(np.float32), rng.uniform(0, 7, (10, E)).astype(np.float32)
    mask = np.ones((10, E), np.float32)
    mask[:, 5] = 0        # emotion 5 never labelled
    mask[3, 9] = 0        # one pair of emotion 9 not labelled
    y[:, 5], y[3, 9] = np.nan, np.inf  # what an unlabelled pair holds must not matter

    @jax.jit
    def grads(x, y, mask):
        loss = lambda p: heads_train.heads_loss(model.apply({"params": p}, x), y, mask, "intensity")[0]  # noqa: E731
        return jax.grad(loss)(params)

    g = heads.per_head_layout(grads(x, y, mask))  # slice e of every array: head e
    for path, leaf in tree.flatten(g).items():
        assert np.all(np.asarray(leaf)[5] == 0), path
        assert np.any(np.asarray(leaf)[4] != 0), path
    # The unlabelled pair of emotion 9 counts for nothing: same gradient as without that row.
    keep = np.arange(10) != 3
    g_without = heads.per_head_layout(grads(x[keep], y[keep], mask[keep]))
    for path in tree.flatten(g):
        np.testing.assert_allclose(np.asarray(tree.flatten(g)[path])[9], np.asarray(tree.flatten(g_without)[path])[9],
                                   atol=1e-6, err_msg=path)


def test_presence_loss_accepts_any_intensity_of_a_present_emotion():
    scores = jnp.asarray([[-1.0, 0.0, 0.5, 1.0, 3.0, 6.5]])
    ones, zeros = jnp.ones_like(scores), jnp.zeros_like(scores)
    present = heads_train.pair_losses(scores, ones, "presence")[0]
    absent = heads_train.pair_losses(scores, zeros, "presence")[0]
    np.testing.assert_allclose(present, [4.0, 1.0, 0.25, 0, 0, 0])
    np.testing.assert_allclose(absent, [0, 0, 0.25, 1.0, 9.0, 42.25])
    # A split vote (share s) is minimised at score = s.
    grid = jnp.linspace(-1, 2, 301)[None]
    for share in (0.25, 0.5, 2 / 3):
        losses = heads_train.pair_losses(grid, jnp.full_like(grid, share), "presence")[0]
        assert float(grid[0, jnp.argmin(losses)]) == pytest.approx(share, abs=0.01)


@pytest.mark.parametrize("compute_dtype", heads.COMPUTE_DTYPES)
def test_the_step_learns_a_linear_cache_far_below_the_constant_predictor(tmp_path, compute_dtype):
    arrays, clean = linear_cache()
    cache_dir = write_fake_cache(tmp_path / "cache", arrays)
    data = heads_train.stage_arrays(embed.load_cache(cache_dir), "intensity", cache_dir)
    assert np.all(data["target"][data["mask"] == 0] == 0)
    stage = empathic_insight.get_config("small").pretrain
    stage.batch_size, stage.lr, stage.warmup_steps = 64, 3e-3, 10
    model = heads.Heads(hidden=(32, 16), compute_dtype=compute_dtype)
    state = train_epochs(model, stage, data, epochs=40)
    scores = np.asarray(model.apply({"params": state["params"]}, data["x"]))
    labelled = data["mask"] > 0
    model_mse = float(np.mean((scores - clean)[labelled] ** 2))
    constant_mse = float(np.mean((clean - clean.mean(0))[labelled] ** 2))
    assert model_mse < 0.1 * constant_mse, (model_mse, constant_mse)
    assert int(state["first_bad_step"]) == -1


def test_training_is_deterministic_given_the_seed():
    arrays, _ = linear_cache(n=100)
    data = {"x": arrays["embeddings"], "target": np.where(arrays["soft_label_mask"], arrays["mean_intensity"], 0),
            "mask": arrays["soft_label_mask"].astype(np.float32)}
    stage = empathic_insight.get_config("small").pretrain
    stage.batch_size = 32
    model = heads.Heads(hidden=(8,), dropout=0.2)
    tx, _ = heads_train.make_optimizer(stage, 2 * heads_train.steps_per_epoch(100, 32))
    step = heads_train.make_train_step(model, tx, stage.target, 0)
    a, b, c = (jax.device_get(train_epochs(model, stage, data, 2, seed=s, step=step if s == 0 else None)["params"])
               for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_a_non_finite_loss_stops_the_run_naming_the_step():
    arrays, _ = linear_cache(n=64)
    data = {"x": arrays["embeddings"], "target": np.where(arrays["soft_label_mask"], arrays["mean_intensity"], 0),
            "mask": arrays["soft_label_mask"].astype(np.float32)}
    data["target"][40, :], data["mask"][40, :] = np.inf, 1  # slipped through; rows 32..63 are the 2nd batch
    stage = empathic_insight.get_config("small").pretrain
    stage.batch_size = 32
    model = heads.Heads(hidden=(8,))
    tx, _ = heads_train.make_optimizer(stage, 4)
    state = heads_train.new_state(model, tx, 16, 0)
    step = heads_train.make_train_step(model, tx, "intensity", 0)
    device_data = heads_train.device_data(data)
    for rows in (np.arange(32), np.arange(32, 64), np.arange(32)):
        state, _ = step(state, device_data, rows.astype(np.int32), np.ones(32, np.float32))
    with pytest.raises(heads_train.train.NonFiniteLoss, match="step 2 "):
        heads_train.check_finite(state, 3)


def test_bad_labels_and_mixed_embeddings_fail_naming_the_cache_row_and_emotion(tmp_path):
    arrays, _ = linear_cache(n=20)
    arrays["mean_intensity"][7, 3] = np.nan
    arrays["soft_label_mask"][7, 3] = True
    cache_dir = write_fake_cache(tmp_path / "bad", arrays)
    with pytest.raises(heads_train.HeadsDataError, match=rf"{cache_dir}.*row 7 .*'00007'.*{taxonomy.NAMES[3]}"):
        heads_train.stage_arrays(embed.load_cache(cache_dir), "intensity", cache_dir)
    with pytest.raises(heads_train.HeadsDataError, match="binary_target"):
        heads_train.stage_arrays(embed.load_cache(cache_dir), "presence", cache_dir)

    config = empathic_insight.get_config("small")
    config.data.resolution = 64
    good, _ = linear_cache(n=20)
    config.pretrain.cache = str(write_fake_cache(tmp_path / "a", good))
    config.finetune.cache = str(write_fake_cache(tmp_path / "b", good, split="emonet_face_binary/64:train",
                                                 backbone_fingerprint="sha256:1"))
    caches = heads_train.Caches(config, tmp_path)
    caches.meta(config.pretrain.split, config.pretrain.cache)
    with pytest.raises(heads_train.HeadsDataError, match="backbone_fingerprint"):
        caches.meta(config.finetune.split, config.finetune.cache)


# --- export ---------------------------------------------------------------------------------

def card_for(hidden, dim, means=None):
    return heads.make_card(variant="small", hidden=hidden, dim=dim, dropout=0.1, input_norm="none",
                           cache_meta={"backbone": "b", "image_size": 32}, means_source="test",
                           means=np.linspace(0, 1, E) if means is None else means)


def test_export_round_trip_is_exact_and_predict_subtracts_the_means(tmp_path):
    hidden, dim = (16, 8), 12
    params = init(heads.Heads(hidden=hidden), dim)
    card = card_for(hidden, dim)
    heads.export(tmp_path, params, card)
    loaded, loaded_card = heads.load_export(tmp_path)
    assert loaded_card == card
    assert loaded_card["emotions"] == list(taxonomy.NAMES)
    flat, back = tree.flatten(jax.device_get(params)), tree.flatten(loaded)
    assert set(flat) == set(back)
    assert all(back[k].dtype == np.float32 and np.array_equal(flat[k], back[k]) for k in flat)
    x = np.random.default_rng(0).standard_normal((5, dim)).astype(np.float32)
    out = heads.predict(loaded, loaded_card, x)
    np.testing.assert_array_equal(out["raw"], np.asarray(heads.Heads(hidden=hidden).apply({"params": params}, x)))
    np.testing.assert_allclose(out["mean_subtracted"], out["raw"] - np.linspace(0, 1, E, dtype=np.float32), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        heads.predict(loaded, loaded_card, x[:, :5])


def tamper(export_dir: pathlib.Path, change):
    from safetensors import numpy as st
    path = export_dir / heads.WEIGHTS_FILE
    flat = st.load_file(str(path))
    change(flat)
    st.save_file(flat, str(path))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("Dense_1/bias"), r"missing: \['Dense_1/bias'\]"),
    (lambda f: f.update({"Dense_0/kernel": np.zeros((40, 12, 17), np.float32)}),
     r"wrong shape: \['Dense_0/kernel: \(40, 12, 17\) instead of \(40, 12, 16\)'\]"),
    (lambda f: f.update({"Dense_9/kernel": np.zeros((1,), np.float32)}), r"unexpected: \['Dense_9/kernel'\]"),
])
def test_a_tampered_export_fails_naming_the_tensor_and_the_file(tmp_path, change, message):
    heads.export(tmp_path, init(heads.Heads(hidden=(16, 8)), 12), card_for((16, 8), 12))
    tamper(tmp_path, change)
    with pytest.raises(heads.ExportError, match=message) as error:
        heads.load_export(tmp_path)
    assert str(tmp_path / heads.WEIGHTS_FILE) in str(error.value)


def test_an_export_in_another_emotion_order_is_refused(tmp_path):
    heads.export(tmp_path, init(heads.Heads(hidden=(8,)), 4), card_for((8,), 4))
    card = json.loads((tmp_path / heads.CARD_FILE).read_text())
    card["emotions"][0], card["emotions"][1] = card["emotions"][1], card["emotions"][0]
    (tmp_path / heads.CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(heads.ExportError, match="taxonomy order"):
        heads.load_export(tmp_path)


# --- the recipe end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def records(synthetic_records):
    return pathlib.Path(synthetic_records["data_dir"])


def recipe_overrides(records, **more):
    """The demo config on the conftest's tiny synthetic records (24 HQ, 40 Binary, 48 Big images)."""
    overrides = {"data.synthetic": False, "data.data_dir": records, "pretrain.epochs": 3, "finetune.epochs": 2,
                 "pretrain.batch_size": 16, "finetune.batch_size": 16, "pretrain.warmup_steps": 2,
                 "finetune.warmup_steps": 2, "log_every_steps": 2, "embed.batch_size": 16, "embed.threads": 1}
    return {**overrides, **more}


def recipe_config(records, **more):
    config = empathic_insight.get_config("small:demo")
    for key, value in recipe_overrides(records, **more).items():
        node = config
        *parents, name = key.split(".")
        for p in parents:
            node = node[p]
        node[name] = type(node[name])(value)
    return config


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, records):
    workdir = tmp_path_factory.mktemp("heads_cli")
    command = [sys.executable, "-m", "emonet_jax.heads_train", "--config=configs/empathic_insight.py:small:demo",
               f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in recipe_overrides(records).items())]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir, run


def test_the_recipe_end_to_end_through_the_cli(cli_run, records):
    workdir, run = cli_run
    # The caches were made from the records by the fixture tower, beside the records.
    for name in ("emonet_face_big_64_train", "emonet_face_binary_64_train", "emonet_face_hq_64_test"):
        assert embed.cache_meta(records / "embeddings" / name)["backbone"].endswith("siglip_tiny/vision")
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    big_rows = embed.cache_meta(records / "embeddings" / "emonet_face_big_64_train")["num_rows"]
    big_steps = 3 * heads_train.steps_per_epoch(big_rows, 16)
    assert train_steps[0] == 2 and max(train_steps) > big_steps  # logged through both stages
    assert any("val/pretrain_loss" in r for r in rows) and any("val/finetune_loss" in r for r in rows)
    evals = [r for r in rows if "eval/model_mean_kappa" in r]
    assert [r["step"] for r in evals] == [big_steps, max(train_steps)]
    # The HQ table: the heads as one more annotator beside the experts, the ViT trainer's files.
    table = json.loads((workdir / "eval" / "hq_agreement.json").read_text())
    annotators = table["annotators"]
    assert annotators["model"]["human"] is False and len(annotators["model"]["per_emotion_kappa"]) == E
    assert sum(a["human"] for a in annotators.values()) >= 4
    assert "| model |" in (workdir / "eval" / "hq_agreement.md").read_text()
    with np.load(workdir / "eval" / "hq_predictions.npz") as p:
        intensity, centred, ids = p["intensity"], p["mean_subtracted"], p["image_id"]
    hq = embed.load_cache(records / "embeddings" / "emonet_face_hq_64_test")
    assert list(ids) == list(hq["image_id"]) and intensity.shape == (len(ids), E)
    np.testing.assert_allclose(centred, intensity - intensity.mean(0), atol=1e-5)
    # The export: loads strictly, reproduces the HQ scores, carries the HQ means.
    params, card = heads.load_export(workdir / "export")
    out = heads.predict(params, card, hq["embeddings"])
    np.testing.assert_allclose(out["raw"], intensity, atol=1e-5)
    np.testing.assert_allclose(card["mean_subtraction"]["means"], intensity.mean(0), atol=1e-5)
    assert "hq_predictions.npz" in card["mean_subtraction"]["source"]
    assert card["architecture"]["hidden"] == list(heads.VARIANTS["small"]) and card["architecture"]["input_dim"] == 32
    assert card["preprocessing"]["image_size"] == 32 and card["preprocessing"]["value_range"] == [-1.0, 1.0]
    assert card["backbone"]["backbone_fingerprint"].startswith("sha256:")
    assert json.loads(run.stdout.split("HQ agreement table")[0])["export"] == str(workdir / "export")


def test_a_run_interrupted_after_an_epoch_resumes_to_the_same_heads(tmp_path, cli_run, records, monkeypatch):
    reference = heads.load_export(cli_run[0] / "export")[0]
    config = recipe_config(records)
    real_save = heads_train.checkpoint.Checkpoints.save
    saves = {"n": 0}

    def save_then_crash(self, step, state, data_state, force=False):
        real_save(self, step, state, data_state, force)
        saves["n"] += 1
        if saves["n"] == 4:  # after fine-tuning's first epoch
            self.wait()
            raise KeyboardInterrupt

    monkeypatch.setattr(heads_train.checkpoint.Checkpoints, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        heads_train.train_and_evaluate(config, tmp_path)
    monkeypatch.setattr(heads_train.checkpoint.Checkpoints, "save", real_save)
    assert not (tmp_path / "export").exists()
    result = heads_train.train_and_evaluate(config, tmp_path)
    assert set(result["eval"]) == {"finetune"}  # pre-training was not run again
    resumed = tree.flatten(result["params"])
    assert all(np.array_equal(v, resumed[k]) for k, v in tree.flatten(reference).items())
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == sorted(set(steps))  # nothing logged twice


def test_export_only_rewrites_the_same_export(tmp_path, cli_run, records):
    config = recipe_config(records, export_dir=str(tmp_path / "again"))
    out = heads_train.export_only(config, cli_run[0])
    params, card = heads.load_export(out)
    reference, reference_card = heads.load_export(cli_run[0] / "export")
    assert card == reference_card
    assert all(np.array_equal(v, tree.flatten(params)[k]) for k, v in tree.flatten(reference).items())
