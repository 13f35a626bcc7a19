"""The update step, sharding, optimizer options, checkpoints and exact resume.

Faults (kills, corrupt checkpoints, bad input, config typos) are in faults_test.py.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _helpers import REPO, first_batch, max_difference, setup, tiny_config, train_run
from _helpers import main_command  # noqa: F401  (multihost_test imports it from here)

from emonet_jax import checkpoint, optim, sharding, train, tree
from emonet_jax.data import pipeline
from emonet_jax.models import emonet


def one_step(data_dir, num_devices=8, steps=1, **overrides):
    trainer, step, state = setup(num_devices, **overrides)
    local = first_batch(trainer.config, data_dir)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, pipeline.device_batch(local, trainer.batch_sharding))
        losses.append(float(metrics["loss"].compute()))
    return jax.device_get(state), losses


@pytest.fixture(scope="module")
def data_dir(synthetic_records):
    return synthetic_records["data_dir"]


def test_the_step_lowers_the_loss_on_a_fixed_batch(data_dir):
    _, losses = one_step(data_dir, steps=25, total_steps=40, **{"optimizer.lr": 3e-3, "optimizer.warmup_steps": 1})
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("mesh", [(("data", -1), ("fsdp", 1)), (("data", 4), ("fsdp", 2)), (("data", 1), ("fsdp", 8))])
def test_eight_devices_match_one_device(data_dir, mesh):
    assert jax.device_count() == 8
    eight, loss8 = one_step(data_dir, steps=2, mesh=mesh)
    one, loss1 = one_step(data_dir, num_devices=1, steps=2)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert max_difference(eight["params"], one["params"]) < 1e-5


def test_fsdp_rules_shard_the_largest_divisible_dimension():
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
    params = {"img": {"embedding": {"kernel": jax.ShapeDtypeStruct((8, 8, 3, 32), jnp.float32),
                                    "bias": jax.ShapeDtypeStruct((30,), jnp.float32)}},
              "emotion_head": {"kernel": jax.ShapeDtypeStruct((32, 320), jnp.float32)}}
    got = tree.flatten(sharding.param_shardings(params, mesh, ((r"emotion_head/.*", "replicate"), (".*", "fsdp"))))
    assert got["img/embedding/kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert got["img/embedding/bias"].spec == jax.sharding.PartitionSpec()  # 30 % 4 != 0
    assert got["emotion_head/kernel"].spec == jax.sharding.PartitionSpec()
    with pytest.raises(ValueError, match="sharding_rules\\[0\\]"):
        sharding.check_rules(((".*", "shard_everything"),))
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.make_mesh((("data", 3), ("fsdp", 4)))


def test_gradient_accumulation_matches_the_one_shot_step(data_dir):
    accumulated, _ = one_step(data_dir, grad_accum_steps=2)
    one_shot, _ = one_step(data_dir)
    assert max_difference(accumulated["params"], one_shot["params"]) < 1e-5


def test_frozen_parameters_do_not_move(data_dir):
    before, _ = one_step(data_dir, steps=0)
    after, _ = one_step(data_dir, steps=2, **{"optimizer.freeze": ("img/.*",)})
    start = tree.flatten(before["params"])
    moved = {p for p, v in tree.flatten(after["params"]).items() if not np.array_equal(v, start[p])}
    assert not any(p.startswith("img/") for p in moved), moved
    assert {"emotion_head/kernel", "emotion_head/bias"} <= moved


def test_frozen_parameters_get_exactly_zero_gradients():
    # stop_gradient, not a discarded gradient: XLA can then drop the frozen tower's backward.
    config = tiny_config(**{"optimizer.freeze": ("img/.*",)}).optimizer
    params = {"img": {"w": jnp.full((2,), 3.0)}, "emotion_head": {"kernel": jnp.full((2,), 5.0)}}
    grads = jax.grad(lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(optim.stop_frozen_gradients(config, p))))(params)
    np.testing.assert_array_equal(grads["img"]["w"], [0.0, 0.0])
    np.testing.assert_array_equal(grads["emotion_head"]["kernel"], [10.0, 10.0])


def test_a_frozen_towers_backward_is_not_compiled():
    def gradient_flops(freeze):
        config = tiny_config(**{"optimizer.freeze": freeze})
        model = emonet.build(config)
        images = jnp.zeros((16, 32, 32, 3))
        params = model.init(jax.random.key(0), images)["params"]

        def loss(p):
            p = optim.stop_frozen_gradients(config.optimizer, p)
            return jnp.sum(model.apply({"params": p}, images)["logits"] ** 2)
        return jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()["flops"]

    # Measured: 42.1 MFLOP with the whole model trained, 15.4 M with img/ frozen (its forward).
    assert gradient_flops(("img/.*",)) < 0.5 * gradient_flops(())


def test_layer_decay_scales_blocks_by_depth():
    depth, d = 4, 0.5
    assert optim.layer_factor("img/embedding/kernel", (3,), depth, d) == d ** 5
    assert optim.layer_factor("img/Transformer/encoderblock_0/LayerNorm_0/scale", (3,), depth, d) == d ** 4
    assert optim.layer_factor("img/Transformer/encoderblock_3/LayerNorm_0/scale", (3,), depth, d) == d ** 1
    assert optim.layer_factor("img/MAPHead_0/probe", (1, 1, 3), depth, d) == 1
    assert optim.layer_factor("emotion_head/kernel", (3, 3), depth, d) == 1
    scanned = optim.layer_factor("img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel", (4, 3, 3), depth, d)
    np.testing.assert_allclose(scanned.reshape(-1), [d ** 4, d ** 3, d ** 2, d ** 1])


@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clipped", "within"])
def test_clip_by_global_norm_is_optaxs(max_norm):
    grads = {"a": jnp.arange(6.0).reshape(2, 3) / 7, "b": {"c": -jnp.ones(4) / 3}}
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))   # checkpoints load
    got, _ = ours.update(grads, ours.init(grads))
    want, _ = theirs.update(grads, theirs.init(grads))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-7, atol=0)
    # A norm computed beforehand (train's step passes its own) gives the same updates, bit for bit.
    given, _ = ours.update(grads, ours.init(grads), global_norm=optax.tree.norm(grads))
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(got)))
    if max_norm > 1:                                        # under the bound: untouched, bit for bit
        assert all(bool(jnp.all(g == x)) for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(grads)))
    else:
        assert float(optax.tree.norm(got)) == pytest.approx(max_norm, rel=1e-6)


def test_the_optimizer_takes_the_steps_norm_of_all_gradients_frozen_ones_included():
    """train's step passes its norm over every gradient to the clipping; frozen parameters'
    gradients are zeros, so it is the norm the clipping would compute over the trained ones."""
    config = tiny_config().optimizer
    config.grad_clip_norm, config.freeze = 1e-3, ("img/.*",)
    params = {"img": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.full((4, 2), 0.5), "b": jnp.ones(2)}}
    grads = {"img": {"w": jnp.zeros((3, 4))}, "head": {"w": jnp.arange(8.0).reshape(4, 2), "b": -jnp.ones(2)}}
    tx, _ = optim.make(config, params, total_steps=10, depth=2)
    state = tx.init(params)
    want, _ = tx.update(grads, state, params)
    got, _ = tx.update(grads, state, params, global_norm=optax.tree.norm(grads))
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_checkpoint_round_trip(tmp_path, data_dir):
    trainer, step, state = setup()
    state, _ = step(state, pipeline.device_batch(first_batch(trainer.config, data_dir), trainer.batch_sharding))
    ckpt = checkpoint.Checkpoints(tmp_path)
    ckpt.save(1, state, {"src": {"next_index": 7}})
    ckpt.wait()
    restored, data_state = ckpt.restore(1, train.abstract_state(trainer, setup()[2]))
    ckpt.close()
    assert data_state == {"src": {"next_index": 7}}
    assert max_difference(jax.device_get(restored), jax.device_get(state)) == 0
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding == want.sharding


# --- the whole trainer: resume, preemption, the command line -------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train_run(workdir, data_dir)
    return workdir, result


def test_a_run_writes_metrics_checkpoints_and_the_hq_table(uninterrupted):
    workdir, result = uninterrupted
    assert result["step"] == 6 and not result["preempted"]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(np.isfinite(r["train/loss"]) and r["lr"] >= 0 for r in train_rows)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    table = json.loads((workdir / "eval" / "hq_agreement.json").read_text())
    annotators = table["annotators"]
    assert annotators["model"]["human"] is False
    experts = [n for n, a in annotators.items() if a["human"]]
    assert len(experts) >= 4
    assert len(annotators["model"]["per_emotion_kappa"]) == 40
    assert "| model |" in (workdir / "eval" / "hq_agreement.md").read_text()
    assert result["eval"]["summary"]["median_expert_mean_kappa"] == pytest.approx(
        float(np.median([annotators[n]["mean_kappa"] for n in experts])))


def test_transfer_scores_an_image_folder_with_a_trained_run(tmp_path, uninterrupted, data_dir):
    from PIL import Image

    from emonet_jax.evaluate import transfer
    workdir, _ = uninterrupted
    source = pipeline.open_split("emonet_face_hq/64", "test", data_dir)
    ferd = tmp_path / "ferd"
    ferd.mkdir()
    for i, cls in enumerate(["Happy", "Sad", "Surprised", "Anger"]):
        Image.fromarray(source[i]["image"]).save(ferd / f"{i:04d}_{cls}.png")
    (ferd / "0004_Happy.jpg").write_bytes(b"not an image")
    code = transfer.main([f"--images={ferd}", "--dataset=ferd", f"--out={tmp_path / 'out'}",
                          f"--workdir={workdir}"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert result["n"] == 4
    lines = [json.loads(x) for x in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and len(lines[0]["results"]) == 40
    raw = np.array([[r["raw"] for r in line["results"].values()] for line in lines])
    centred = np.array([[r["mean_subtracted"] for r in line["results"].values()] for line in lines])
    hq_means = np.load(workdir / "eval" / "hq_predictions.npz")["intensity"].mean(0)
    np.testing.assert_allclose(raw - centred, np.broadcast_to(hq_means, raw.shape), atol=1e-5)
    assert ((raw >= 0) & (raw <= 7)).all()


def test_model_pretrained_starts_the_tower_from_a_siglip_checkpoint():
    from emonet_jax.models import pretrained
    fixture = REPO / "tests" / "fixtures" / "siglip_tiny" / "vision"
    config = tiny_config(**{"model.pretrained": str(fixture)})
    trainer = train.build(config, train.make_mesh(config))
    state = jax.device_get(train.initial_state(trainer))
    tower = pretrained.load(fixture)
    got = tree.flatten(state["params"]["img"])
    assert max_difference([got[p] for p in sorted(got)], [tree.flatten(tower.params)[p] for p in sorted(got)]) == 0
    with pytest.raises(ValueError, match="not both"):
        train.initial_state(train.build(tiny_config(**{"model.pretrained": str(fixture), "init_from": "x"}),
                                        train.make_mesh(config)))


def test_the_agreement_cli_on_the_runs_csv_gives_the_trainers_numbers(tmp_path, uninterrupted, data_dir):
    from emonet_jax.evaluate import agreement, model_eval
    workdir, result = uninterrupted
    source = pipeline.open_split("emonet_face_hq/64", "test", data_dir)
    ids, names, table = model_eval.read_expert_ratings(source)
    agreement.write_hq_csv(model_eval.hq_rows(ids, table, names, [True] * len(names)), tmp_path / "hq.csv")
    agreement.main([f"--ratings={tmp_path / 'hq.csv'}", f"--extra={workdir / 'eval' / 'hq_model.csv'}",
                    f"--out={tmp_path / 'out'}", "--no-figures", "--bootstrap=10"])
    cli = json.loads((tmp_path / "out" / "agreement.json").read_text())["annotators"]
    trainer = result["eval"]["annotators"]
    for name in [*names, "model"]:
        assert cli[name]["mean_kappa"] == pytest.approx(trainer[name]["mean_kappa"], abs=1e-9), name


def test_binary_cli_scores_the_held_out_split_with_a_trained_run(tmp_path, uninterrupted, data_dir):
    from emonet_jax.evaluate import binary
    workdir, _ = uninterrupted
    assert binary.main([f"--workdir={workdir}", f"--data_dir={data_dir}", "--resolution=64",
                        f"--out={tmp_path}"]) == 0
    result = json.loads((tmp_path / "binary.json").read_text())
    source = pipeline.open_split("emonet_face_binary/64", "validation", data_dir)
    assert result["n_images"] + result["n_images_without_votes"] == len(source)
    assert set(result["per_emotion"]) == set(train.emonet.taxonomy.NAMES)
    assert "| " in (tmp_path / "binary.md").read_text()


def test_reproduce_script_regenerates_the_tables_it_has_inputs_for(tmp_path, uninterrupted, data_dir):
    from emonet_jax.evaluate import agreement, model_eval
    workdir, _ = uninterrupted
    ids, names, table = model_eval.read_expert_ratings(pipeline.open_split("emonet_face_hq/64", "test", data_dir))
    agreement.write_hq_csv(model_eval.hq_rows(ids, table, names, [True] * len(names)), tmp_path / "hq.csv")
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "out"), HQ_CSV=str(tmp_path / "hq.csv"),
               WORKDIR=str(workdir), DATA_DIR=str(data_dir), RESOLUTION="64")
    run = subprocess.run(["bash", "experiments/reproduce.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for path in ("hq/agreement.json", "hq/agreement.tex", "binary/binary.json"):
        assert (tmp_path / "out" / path).is_file(), path
    assert "model" in json.loads((tmp_path / "out" / "hq" / "agreement.json").read_text())["annotators"]
    assert "skipped FERD table (published outputs): FERD_JSONL not set" in run.stderr
