"""The compute benchmarks (`bench pipeline|peak|train_step|prepare|image_bytes|heads`, emonet_jax/perf.py) at tiny sizes."""

import importlib.util
import io
import json
import pathlib
import resource
import subprocess

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from emonet_jax import bench, perf, train
from emonet_jax.data import builder, pipeline, sources
from emonet_jax.models import vit

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_SCRIPT = REPO / "benchmarks" / "torch_vit_step.py"
TORCH_PYTHON = REPO / ".venv-torch" / "bin" / "python"
# The keys the PyTorch baseline shares with `bench train_step`.
SHARED_KEYS = {"variant", "image_size", "batch", "steps", "warmup", "dtype", "params", "images_per_s",
               "median_step_s", "p90_step_s", "step_s", "median_step_cpu_s", "loss"}


@pytest.fixture(autouse=True)
def parsed_flags():
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def test_peak_is_the_flops_of_the_chained_matmuls_over_the_best_time():
    peak = perf.measure_peak_flops(n=128, repeats=2, iterations=3)
    assert peak["peak_flops_per_s"] == pytest.approx(2 * 128 ** 3 * 3 / peak["matmul_best_s"])
    assert peak["platform"] == "cpu" and peak["matmul_n"] == 128 and peak["matmul_dtype"] == "float32"
    assert perf.measure_peak_flops(n=64, dtype="bfloat16", repeats=1, iterations=1)["matmul_dtype"] == "bfloat16"


def test_step_flops_are_the_analytic_6nt_also_for_a_scanned_tower():
    """XLA counts a scanned tower's loop body once; step_flops counts every block."""
    config = perf.step_config("Ti/16", image_size=64, batch_size=8, scan=True)
    config.model.pool = "gap"          # every parameter sees every token, as 6·N·T assumes
    mesh = train.make_mesh(config)
    trainer = train.build(config, mesh)
    state = jax.eval_shape(lambda: train.initial_state(trainer))
    batch = perf.random_batch(config.batch_size, config.input.image_size)
    lowered = train.make_train_step(trainer).lower(state, batch)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    analytic = perf.analytic_flops(num_params, config)
    assert perf.cost(lowered)["flops"] < analytic / 4                     # the loop body counted once
    flops, source = perf.step_flops(config, mesh, lowered, batch)
    assert flops == pytest.approx(analytic, rel=0.2) and source == "xla_lowered_on_cpu"


def test_step_flops_are_counted_on_the_cpu_where_the_lowered_step_has_no_analysis():
    """GPU backends give no cost analysis before compiling: the step is lowered for the CPU."""
    config = perf.step_config("mu/8", image_size=32, batch_size=8)
    mesh = train.make_mesh(config)
    trainer = train.build(config, mesh)
    state = jax.eval_shape(lambda: train.initial_state(trainer))
    batch = perf.random_batch(config.batch_size, config.input.image_size)
    lowered = train.make_train_step(trainer).lower(state, batch)

    class NoAnalysis:                   # a Lowered as a GPU backend gives it
        def cost_analysis(self):
            return None

    assert perf.step_flops(config, mesh, NoAnalysis(), batch) == (perf.cost(lowered)["flops"], "xla_lowered_on_cpu")
    # cuDNN attention (a custom call) is counted as the same step with XLA's attention.
    fused = perf.step_config("mu/8", image_size=32, batch_size=8, dtype="bfloat16", attention="cudnn")
    plain = perf.step_config("mu/8", image_size=32, batch_size=8, dtype="bfloat16")
    plain_lowered = train.make_train_step(train.build(plain, mesh)).lower(state, batch)
    assert perf.step_flops(fused, mesh, NoAnalysis(), batch) == (perf.cost(plain_lowered)["flops"],
                                                                   "xla_lowered_on_cpu")


def test_train_step_reports_speed_flops_and_the_floor():
    with flagsaver.as_parsed(variant="mu/8", res="32", batch="8", steps="3", peak_n="256"):
        result = bench.bench_train_step()
    json.dumps(result)                                                    # one JSON object
    assert result["benchmark"] == "train_step" and result["variant"] == "mu/8" and result["image_size"] == 32
    assert result["device_count"] == jax.device_count() and len(result["step_s"]) == 3
    assert result["images_per_s"] == pytest.approx(8 / result["median_step_s"])
    assert min(result["step_s"]) <= result["median_step_s"] <= result["p90_step_s"] <= max(result["step_s"])
    assert result["compile_s"] > 0 and np.isfinite(result["loss"])
    assert result["flops_per_step"] > 0 and result["flops_source"] == "xla_lowered"
    assert result["flops_per_s"] == pytest.approx(result["flops_per_step"] / result["median_step_s"])
    # Nothing runs faster than the peak matmul: the floor is below the step, the fraction below 1.
    assert result["floor_step_s"] < result["median_step_s"]
    assert 0 < result["fraction_of_peak"] < 1
    assert "datasheet_peak_flops_per_s" not in result                    # unknown for a CPU


def test_attention_times_ours_and_flaxs_and_compares_their_values():
    with flagsaver.as_parsed(variant="mu/8", res="32", batch="2", steps="2"):
        result = bench.bench_attention()
    json.dumps(result)
    assert result["benchmark"] == "attention" and result["shape"] == [2, 16, 2, 16] and result["dtype"] == "bfloat16"
    for pass_ in ("forward", "forward_backward"):
        assert result[f"{pass_}_speedup"] == pytest.approx(result[f"flax_{pass_}_ms"] / result[f"ours_{pass_}_ms"])
        assert 0 <= result[f"{pass_}_max_abs_difference"] < 0.05          # bfloat16 rounding apart


def test_pipeline_reports_the_rate_of_records_originals_and_rows_held_in_memory(tmp_path):
    with flagsaver.as_parsed(images="4", image_size="64", batch="2", steps="3", threads="1", cache=str(tmp_path)):
        result = bench.bench_pipeline()
    assert result["images"] == 4 and result["batch"] == 2 and result["steps"] == 3
    rates = [result[k] for k in ("records_images_per_s", "original_png_images_per_s", "in_memory_images_per_s")]
    assert all(r > 0 for r in rates)
    assert result["speedup"] == pytest.approx(rates[0] / rates[1], rel=0.01)


def test_pipeline_workers_go_to_the_records_pipeline_only(tmp_path, monkeypatch):
    asked = []
    train_dataset = pipeline.train_dataset

    def recording(source, **kwargs):   # records what each pipeline asks for, runs it in-process
        asked.append(kwargs["num_workers"])
        return train_dataset(source, **{**kwargs, "num_workers": 0})

    monkeypatch.setattr(pipeline, "train_dataset", recording)
    with flagsaver.as_parsed(images="4", image_size="64", batch="2", steps="2", threads="1", workers="3",
                             cache=str(tmp_path)):
        result = bench.bench_pipeline()
    assert asked == [3, 0] and result["workers"] == 3     # records, then the rows held in memory
    assert result["speedup"] is None                      # records in 3 processes against originals in 1


def test_prepare_reports_images_per_second_and_the_builds_peak_rss(tmp_path):
    with flagsaver.as_parsed(images="6", image_size="64", cache=str(tmp_path)):
        result = bench.bench_prepare()
    assert result["dataset"] == "emonet_face_hq/64" and result["images"] == 6 and result["bad_rows"] == 0
    assert result["images_per_s"] == pytest.approx(6 / result["build_s"])
    assert result["peak_rss_mb"] >= result["peak_rss_mb_after_imports"] > 0
    # The build's own memory, not this process's (which a forked child's ru_maxrss would report).
    assert result["peak_rss_mb_after_imports"] < resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]          # the built records were scratch


def test_prepare_reports_the_bytes_of_the_records_and_of_the_originals(tmp_path):
    with flagsaver.as_parsed(images="4", image_size="64", cache=str(tmp_path)):
        result = bench.bench_prepare()
        originals = bench.png_originals(sorted(bench.synthetic_originals("hq", 4).glob("*.parquet")))
    assert result["original_png_bytes_per_image"] == pytest.approx(np.mean([len(png) for png in originals]))
    jpeg = bench.encoded_sizes(originals)["64"]["jpeg_bytes"]
    # Each record is its JPEG plus the compressed label fields (< 2 KiB); array_record writes its
    # file in 64 KiB blocks (two for a few records), and TFDS a few JSON files (< 16 KiB) beside it.
    assert 4 * jpeg < result["records_bytes"] < 4 * (jpeg + 2048) + 2 * 65536 + 16384
    assert result["records_bytes"] == pytest.approx(4 * result["records_bytes_per_image"])


def test_image_bytes_grow_with_resolution_noise_and_photographic_detail(tmp_path):
    with flagsaver.as_parsed(images="2", noise="16", cache=str(tmp_path)):
        result = bench.bench_image_bytes()
    synthetic, noisy, photo = result["synthetic"], result["synthetic_noise"], result["photo_upsampled"]
    sizes = [str(r) for r in builder.RESOLUTIONS]
    for kind in (synthetic, noisy, photo):
        jpeg = [kind[r]["jpeg_bytes"] for r in sizes]
        assert jpeg == sorted(jpeg) and all(kind[r]["encode_ms"] > 0 for r in sizes)
    assert noisy["png_bytes"] > 4 * synthetic["png_bytes"] and photo["png_bytes"] > synthetic["png_bytes"]
    assert photo["224"]["jpeg_bytes"] == len(sources.encode_image(bench.photo_original(), 224))
    assert photo["224"]["jpeg_bytes"] > 1.5 * synthetic["224"]["jpeg_bytes"]


def test_zero_noise_keeps_every_pixel(tmp_path):
    png = bench.photo_original(64)
    again = bench.with_noise(png, 0.0, np.random.default_rng(0))
    decode = lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode(again), decode(png))
    assert decode(png).shape == (64, 64, 3)


def test_prepare_refuses_a_data_dir_that_holds_records(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(ValueError, match="not empty"):
        perf.bench_prepare(tmp_path, "hq", 64, tmp_path)


def test_datasheet_peak_by_device_kind():
    assert perf.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16") > perf.datasheet_peak("NVIDIA H100 PCIe",
                                                                                          "bfloat16")
    assert perf.datasheet_peak("cpu", "float32") is None


def load_torch_script():
    spec = importlib.util.spec_from_file_location("torch_vit_step", TORCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)                 # imports torch only in main()
    return module


def test_torch_baseline_uses_our_vit_dimensions():
    script = load_torch_script()
    demo_and_test_sizes = ("mu", "xs")
    assert script.SIZES == {name: (s.width, s.depth, s.mlp_dim, s.num_heads) for name, s in vit.SIZES.items()
                            if name not in demo_and_test_sizes}


@pytest.mark.skipif(not TORCH_PYTHON.exists(), reason="no .venv-torch (make torch-venv)")
def test_torch_baseline_prints_our_keys():
    command = [str(TORCH_PYTHON), str(TORCH_SCRIPT), "--variant=Ti/16", "--res=32", "--batch=2", "--steps=2",
               "--warmup=0"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    assert SHARED_KEYS <= set(result) and result["batch"] == 2 and len(result["step_s"]) == 2
    assert result["images_per_s"] == pytest.approx(2 / result["median_step_s"])


def test_heads_alternates_with_the_reference_and_reports_the_fastest_of_each(tmp_path):
    # A stand-in for the torch Python: prints a reference result whose time grows each run.
    count = tmp_path / "count"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho x >> {count}\nn=$(wc -l < {count})\n"
                    'echo "{\\"seconds\\": $((10 * n)), \\"cpu_seconds\\": $((20 * n))}"\n')
    fake.chmod(0o755)
    with flagsaver.as_parsed(examples="512", epochs="1", batch="256", heads_repeats="2", reference=str(fake)):
        result = bench.bench_heads()
    assert count.read_text().count("x") == 2 and result["steps"] == 2
    assert len(result["seconds_each"]) == 2 and result["seconds"] == min(result["seconds_each"])
    assert result["reference"]["seconds_each"] == [10, 20] and result["reference"]["seconds"] == 10
    assert result["speedup"] == pytest.approx(10 / result["seconds"], rel=0.01)
    assert result["speedup_each"] == [pytest.approx(t / s, rel=0.01) for t, s in zip((10, 20), result["seconds_each"])]
    assert np.isfinite(result["final_batch_loss"])
    # flops_per_s uses the unrounded time; "seconds" is rounded to 1 ms.
    assert result["flops_per_step"] > 0
    assert result["flops_per_s"] == pytest.approx(result["flops_per_step"] * 2 / result["seconds"], rel=0.15)


def test_heads_floor_adds_up_its_parts_and_caps_the_speedup(tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho \'{"seconds": 30.0, "cpu_seconds": 60.0}\'\n')
    fake.chmod(0o755)
    with flagsaver.as_parsed(examples="512", epochs="1", batch="256", heads_floor="true", reference=str(fake),
                             compute_dtype="bfloat16"):
        result = bench.bench_heads()
    floor = result["floor"]
    parts = ("first_layer_forward_ms", "first_layer_kernel_grad_ms", "other_ms", "optimizer_ms")
    assert all(floor[k] > 0 for k in parts), floor
    assert floor["step_ms"] == pytest.approx(sum(floor[k] for k in parts), abs=0.01)
    assert floor["seconds"] == pytest.approx(floor["step_ms"] * result["steps"] / 1e3, abs=0.002)
    # The first layer's two products are [256, 1152] x [1152, 40 * 128] and its transposed twin.
    products = 2 * 2 * 256 * 1152 * 40 * 128
    assert floor["other_flops"] == result["flops_per_step"] - products > 0
    assert floor["products_flops_per_s"] == pytest.approx(
        products / (floor["first_layer_forward_ms"] + floor["first_layer_kernel_grad_ms"]) * 1e3, rel=0.01)
    assert floor["other_ms"] == pytest.approx(floor["other_flops"] / floor["products_flops_per_s"] * 1e3, rel=0.01)
    assert result["speedup_cap"] == pytest.approx(30.0 / floor["seconds"], rel=0.01)
    assert result["speedup_cap_each"] == [result["speedup_cap"]]


def test_heads_floor_times_the_optimizer_it_is_given():
    """A costlier optimizer (AdamW over 10x the parameters) gives a larger optimizer part."""
    import optax
    times = []
    for size in (100_000, 1_000_000):
        floor = perf.heads_step_floor(8, 16, 16, None, optax.adamw(1e-3), {"w": jax.numpy.zeros((size,))},
                                      "float32", repeats=3, calls=5)
        assert floor["other_flops"] is None and floor["other_ms"] == 0
        times.append(floor["optimizer_ms"])
    assert times[1] > 2 * times[0], times


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="matches XLA:CPU's trace events to its instructions")
def test_op_profile_names_the_costliest_ops_of_a_step():
    big, small = jax.numpy.ones((512, 512)), jax.numpy.ones((8, 8))
    step = jax.jit(lambda a, b: (a @ a @ a, jax.numpy.tanh(b) * 2)).lower(big, small).compile()

    def run():
        for _ in range(4):
            out = step(big, small)
        jax.block_until_ready(out)
    profile = perf.op_profile(run, step.as_text(), steps=4, top=2)
    json.dumps(profile)
    assert profile["steps"] == 4 and profile["wall_ms_per_step"] > 0 and len(profile["top"]) == 2
    first = profile["top"][0]
    # The two 512^3 products dominate; they are named after the JAX op they come from.
    assert "dot_general" in first["jax_op"] and first["shape"].startswith("f32[512,512]")
    assert first["per_step"] >= 1 and first["ms_per_step"] >= profile["top"][1]["ms_per_step"]
    assert 0.5 < first["share"] <= 1
    assert profile["op_ms_per_step"] >= first["ms_per_step"]
    # XLA:CPU's workers: how long k of them were busy fits in the wall time, and an op's time
    # with the others idle is part of its time.
    assert profile["workers"] >= 1 and set(profile["busy_workers_ms_per_step"]) == {
        str(k) for k in range(profile["workers"] + 1)}
    assert 0 < sum(profile["busy_workers_ms_per_step"].values()) <= profile["wall_ms_per_step"] * 1.01
    assert all(0 <= row["alone_ms_per_step"] <= row["ms_per_step"] + 1e-3 for row in profile["top"])


def _thread_name(tid, name):
    return {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}


def _span(tid, name, start, duration=0.0):
    return {"ph": "X", "name": name, "pid": 1, "tid": tid, "ts": start, "dur": duration}


def test_worker_activity_finds_when_the_other_workers_idle():
    # Worker 1 runs op "a" over [0, 100) and "b" over [150, 200); worker 2 takes its share of
    # "a" (a thread-pool region) over [20, 60) and runs its own "c" over [90, 140). The Python
    # thread is no worker; a region never stopped is left out.
    a, b, c = _span(1, "a", 0, 100), _span(1, "b", 150, 50), _span(2, "c", 90, 50)
    events = [_thread_name(1, "tf_XLAEigen/1"), _thread_name(2, "tf_XLAEigen/2"), _thread_name(3, "python"),
              a, b, c, _span(2, perf._REGION_START, 20), _span(2, perf._REGION_STOP, 60),
              _span(2, perf._REGION_START, 300), _span(3, "PjitFunction", 0, 400)]
    activity = perf.worker_activity(events)
    assert activity.busy == {1: [[0, 100], [150, 200]], 2: [[20, 60], [90, 140]]}
    # Both busy over [20, 60) and [90, 100); none over [140, 150); one over the other 140 µs.
    assert activity.histogram() == {0: 10.0, 1: 140.0, 2: 50.0}
    assert activity.alone(a) == 50.0 and activity.alone(b) == 50.0 and activity.alone(c) == 40.0
    assert perf.worker_activity([_thread_name(3, "python"), _span(3, "PjitFunction", 0, 400)]) is None


def test_heads_profile_reports_the_steps_ops():
    with flagsaver.as_parsed(examples="512", epochs="1", batch="256", profile_top="3"):
        result = bench.bench_heads()
    profile = result["profile"]
    assert profile["steps"] == 2 and len(profile["top"]) == 3
    assert any("Dense_0/dot_general" in op["jax_op"] for op in profile["top"]), profile


def test_train_step_profile_reports_the_steps_ops():
    with flagsaver.as_parsed(variant="mu/8", res="32", batch="8", steps="2", peak_n="256", profile_top="4"):
        result = bench.bench_train_step()
    profile = result["profile"]
    assert profile["steps"] == 2 and len(profile["top"]) == 4
    assert all(op["ms_per_step"] > 0 and op["shape"] for op in profile["top"]), profile
