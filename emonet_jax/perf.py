"""Compute benchmarks: the machine's peak matmul rate, the train step (and where its time goes), and
preparing a split.

    from emonet_jax import perf
    peak = perf.measure_peak_flops()                        # {'peak_flops_per_s': ..., ...}
    config = perf.step_config("B/16", image_size=224, batch_size=8)
    result = perf.bench_train_step(config, steps=5, peak=peak)
    result = perf.bench_attention("B/16", image_size=224, batch_size=8)  # one block's attention, ours vs Flax
    result = perf.bench_prepare(raw_dir, "hq", resolution=224, data_dir=empty_dir)   # parquet -> records
    profile = perf.profile_steps(compiled_step, state, [(batch,)] * 3)  # XLA:CPU's costliest ops
    floor = perf.heads_step_floor(256, 1152, 40 * 128, flops, tx, params)  # the heads step's floor, ms

`python -m emonet_jax.bench peak|attention|train_step|prepare` prints them as JSON (see bench.py).

The train step is the trainer's own (`train.build` + `train.make_train_step`: sharded, state
donated) on random images and labels. Its FLOPs are XLA's count for the global batch: the cost
analysis of the step as lowered, before SPMD partitioning (a compiled, partitioned module
counts one device's share plus the work every device repeats). Where that count is missing or
incomplete (GPU backends analyse compiled modules only, and those miss part of the cuBLAS
work; cuDNN attention is a custom call) the same step is lowered for one CPU device instead. XLA counts a while loop's body
once, so for a scanned tower (`scan=True`) the count comes from the same step with the blocks
unrolled, lowered but never compiled. With `remat=True` the count includes the recomputed
forward pass: it is the work done, not the model's 6·N·T.

The physical floor of a step is its FLOPs divided by the measured peak: the time the step
would take if every FLOP ran at the speed of one large matmul.
"""

from __future__ import annotations

import bisect
import copy
import functools
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from emonet_jax import train
from emonet_jax.data import builder, pipeline
from emonet_jax.labels import NUM_LEVELS
from emonet_jax.models import mixed_precision, vit

# Dense (no sparsity) peak FLOP/s from the vendors' datasheets, by the start of
# `device.device_kind`. JAX's float32 matmuls run as TF32 on these GPUs and as bfloat16 passes
# on TPUs at default precision, so 'float32' lists those rates.
DATASHEET_PEAK = (
    ("NVIDIA H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    ("NVIDIA H100", {"bfloat16": 989e12, "float32": 495e12}),     # SXM
    ("NVIDIA H200", {"bfloat16": 989e12, "float32": 495e12}),
    ("NVIDIA A100", {"bfloat16": 312e12, "float32": 156e12}),
    ("TPU v4", {"bfloat16": 275e12, "float32": 275e12}),
    ("TPU v5 lite", {"bfloat16": 197e12, "float32": 197e12}),
    ("TPU v5", {"bfloat16": 459e12, "float32": 459e12}),          # v5p
    ("TPU v6 lite", {"bfloat16": 918e12, "float32": 918e12}),
)


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The datasheet's dense peak of one device, or None for an unknown kind (and every CPU)."""
    for prefix, peaks in DATASHEET_PEAK:
        if device_kind.startswith(prefix):
            return peaks[dtype]
    return None


# --- peak ------------------------------------------------------------------------------------

def measure_peak_flops(n: int | None = None, dtype: str = "float32", repeats: int = 5,
                       iterations: int | None = None, device=None) -> dict:
    """FLOP/s of `iterations` chained n x n matmuls on one device, the best of `repeats` runs.

    On a CPU one device runs on all cores, so this is the machine's peak; on a GPU or TPU it is
    one chip's. Defaults: n = 2048 on CPU (about 0.1 s a matmul on 2 cores), 8192 elsewhere.
    On a CPU the products go through `mixed_precision.matmul`, the path the models' layers take:
    a plain bfloat16 `a @ x` misses XLA:CPU's AMX kernels (172 against 859 GFLOP/s at 2048 on
    2 Sapphire Rapids cores).
    """
    device = device or jax.devices()[0]
    cpu = device.platform == "cpu"
    n = n or (2048 if cpu else 8192)
    iterations = iterations or (2 if cpu else 20)
    # Entries of variance 1/n keep the chained product's scale about constant. (The cast comes
    # last: a numpy float64 scale would promote a bfloat16 array to float32.)
    a = jax.device_put((jax.random.normal(jax.random.key(0), (n, n)) / np.sqrt(n)).astype(dtype), device)

    def product(a, x):
        return mixed_precision.matmul(a, x, a.dtype).astype(a.dtype) if cpu else a @ x

    chain = jax.jit(lambda a: jax.lax.fori_loop(0, iterations, lambda _, x: product(a, x), a))
    best = _best_ms(lambda: chain(a), repeats, calls=1) / 1e3
    return {"peak_flops_per_s": 2 * n ** 3 * iterations / best, "matmul_n": n, "matmul_dtype": str(a.dtype),
            "matmul_iterations": iterations, "matmul_best_s": best, "device_kind": device.device_kind,
            "platform": device.platform}


# --- the heads step's floor --------------------------------------------------------------------

def heads_step_floor(batch: int, dim: int, first_width: int, step_flops: float | None, tx, params,
                     dtype: str = "bfloat16", repeats: int = 5, calls: int = 10) -> dict:
    """The floor of a step of the 40 heads on this device, `step_ms`: the milliseconds it cannot
    go below with XLA's products and this optimizer, however the rest of it were written. It
    tells whether `bench heads`' target is reachable on a given machine (BENCHMARKS.md "Heads").

    Three parts, each measured here alone (the best of `repeats` runs of `calls` calls):
    - the first layer's two products at the step's shapes and dtype (float32 accumulation),
      forward [batch, dim] x [dim, first_width] and kernel gradient [dim, batch] x
      [batch, first_width], which hold nearly all of a Small step's FLOPs;
    - the step's other FLOPs (`step_flops`, XLA's count, minus those two) at the rate the two
      products reached: a lower bound, as the other products are smaller and run slower
      (none where the backend gives no count, `step_flops=None`);
    - the optimizer `tx` updating `params` (parameters and state donated, as in the step).
    Dropout, ReLU, the loss, the casts and the small products' slowness count as free, so a
    real step is slower than this."""
    rng = np.random.default_rng(0)
    x_t = jax.numpy.asarray(rng.standard_normal((dim, batch)), dtype)
    x = jax.numpy.asarray(rng.standard_normal((batch, dim)), dtype)
    kernel = jax.numpy.asarray(rng.standard_normal((dim, first_width)), dtype)
    grad = jax.numpy.asarray(rng.standard_normal((batch, first_width)), dtype)
    product = jax.jit(lambda a, b: mixed_precision.matmul(a, b, dtype))
    forward_ms = _best_ms(lambda: product(x, kernel), repeats, calls)
    kernel_grad_ms = _best_ms(lambda: product(x_t, grad), repeats, calls)
    products_flops = 2 * (2 * batch * dim * first_width)
    other_flops = max((step_flops or 0.0) - products_flops, 0.0)
    other_ms = other_flops / products_flops * (forward_ms + kernel_grad_ms)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 1e-3), params)
    state = [jax.tree.map(jax.numpy.copy, params), tx.init(params)]

    def optimizer_step():
        state[:] = update(*state, grads)
        return state
    optimizer_ms = _best_ms(optimizer_step, repeats, calls)
    return {"first_layer_forward_ms": round(forward_ms, 3), "first_layer_kernel_grad_ms": round(kernel_grad_ms, 3),
            "products_flops_per_s": round(products_flops / ((forward_ms + kernel_grad_ms) / 1e3)),
            "other_flops": other_flops if step_flops is not None else None, "other_ms": round(other_ms, 3),
            "optimizer_ms": round(optimizer_ms, 3),
            "step_ms": round(forward_ms + kernel_grad_ms + other_ms + optimizer_ms, 3)}


def _best_ms(call: Callable[[], Any], repeats: int, calls: int) -> float:
    """Milliseconds per `call()` (which dispatches jitted work): the best of `repeats` runs of `calls` calls."""
    jax.block_until_ready(call())                          # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


# --- attention ---------------------------------------------------------------------------------

def bench_attention(variant: str, image_size: int, batch_size: int, dtype: str = "bfloat16", steps: int = 10) -> dict:
    """Milliseconds of one encoder block's attention (softmax(q·kᵀ/√d)·v on random q, k, v
    [batch, tokens, heads, head_dim] of the variant at `image_size`), forward and forward +
    backward, for `mixed_precision.dot_product_attention` (the blocks' own) and for
    `mixed_precision.flax_attention`, Flax's function with force_fp32_for_softmax (what they used
    before): the median of `steps` runs each, the two taking turns run by run, with the largest
    difference between their outputs and gradients."""
    size, patch = vit.parse_variant(variant)
    shape = (batch_size, (image_size // patch) ** 2, size.num_heads, size.width // size.num_heads)
    q, k, v, g = (jax.random.normal(jax.random.key(i), shape).astype(dtype) for i in range(4))
    implementations = {
        "ours": mixed_precision.dot_product_attention,
        "flax": mixed_precision.flax_attention,
    }
    programs = {}
    for name, attention in implementations.items():
        def loss(q, k, v, attention=attention):
            return jax.numpy.vdot(attention(q, k, v).astype(np.float32), g.astype(np.float32))
        programs[name, "forward"] = jax.jit(attention).lower(q, k, v).compile()
        programs[name, "forward_backward"] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    outputs = {key: jax.block_until_ready(program(q, k, v)) for key, program in programs.items()}
    seconds: dict[tuple, list] = {key: [] for key in programs}
    for _ in range(steps):
        for key, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(q, k, v))
            seconds[key].append(time.perf_counter() - start)
    result = {"variant": variant, "image_size": image_size, "batch": batch_size, "dtype": str(q.dtype),
              "shape": list(shape), "steps": steps, "device_kind": jax.devices()[0].device_kind}
    for (name, pass_), times in seconds.items():
        result[f"{name}_{pass_}_ms"] = float(np.median(times)) * 1e3
    for pass_ in ("forward", "forward_backward"):
        result[f"{pass_}_speedup"] = result[f"flax_{pass_}_ms"] / result[f"ours_{pass_}_ms"]
        ours, flax = (jax.tree.leaves(outputs[name, pass_]) for name in ("ours", "flax"))
        result[f"{pass_}_max_abs_difference"] = max(
            float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))) for a, b in zip(ours, flax))
    return result


# --- train step ------------------------------------------------------------------------------

def step_config(variant: str, image_size: int, batch_size: int, dtype: str = "float32", remat: bool = False,
                scan: bool = False, base=None, attention: str = "xla"):
    """configs/common.py's defaults (or `base`) with the benchmark's model, image size and batch."""
    from configs import common
    config = copy.deepcopy(base) if base is not None else common.base()
    config.model.variant = variant
    config.input.image_size = image_size
    config.batch_size = batch_size
    config.model.compute_dtype = dtype
    config.model.remat = remat
    config.model.scan = scan
    config.model.attention = attention
    return config


def random_batch(batch_size: int, image_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch with every field the input pipeline yields, random, every mask true (so
    each loss term is computed). Shapes and dtypes come from the records' features."""
    rng = np.random.default_rng(seed)
    spec = builder.features(image_size)
    batch = {"image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32)}
    for key in pipeline.LABEL_FIELDS:
        shape, dtype = (batch_size, *spec[key].shape), spec[key].np_dtype
        if dtype == np.bool_:
            batch[key] = np.ones(shape, bool)
        elif np.issubdtype(dtype, np.integer):
            batch[key] = rng.integers(0, NUM_LEVELS, shape).astype(dtype)
        else:
            batch[key] = rng.uniform(0, 1, shape).astype(dtype)
    batch["soft_label"] /= batch["soft_label"].sum(-1, keepdims=True)
    batch["binary_yes"] = np.minimum(batch["binary_yes"], batch["binary_votes"])
    return batch


def cost(stage) -> dict | None:
    """`cost_analysis()` of a jax Lowered or Compiled as one dict (older jax returned a list);
    None where the backend gives none (GPU backends analyse compiled modules only)."""
    analysis = stage.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) and analysis else analysis
    return analysis if analysis and "flops" in analysis else None


def step_flops(config, mesh, lowered, batch) -> tuple[float, str]:
    """FLOPs of one global step, and where the count comes from (the module docstring says why
    unscanned and unpartitioned): `xla_lowered`, XLA's count of the step as lowered for its
    devices, or `xla_lowered_on_cpu`, the same step lowered (never compiled) for one CPU device.
    The second is used where the first is missing or would miss work: a scanned tower, cuDNN
    attention (a custom call XLA cannot count), a backend with no analysis before compiling (GPU;
    its compiled modules count cuBLAS products partly: 60 % of the step on an H100)."""
    counted = copy.deepcopy(config)
    counted.model.scan, counted.model.attention = False, "xla"
    analysis = cost(lowered) if counted == config else None
    if analysis:
        return float(analysis["flops"]), "xla_lowered"
    cpu_mesh = train.make_mesh(counted, jax.devices("cpu")[:1])
    trainer = train.build(counted, cpu_mesh)
    state = jax.eval_shape(lambda: train.initial_state(trainer))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    analysis = cost(train.make_train_step(trainer).lower(state, abstract_batch))
    if not analysis:
        raise RuntimeError("XLA gives no cost analysis of the step lowered for the CPU")
    return float(analysis["flops"]), "xla_lowered_on_cpu"


def analytic_flops(num_params: int, config) -> float:
    """6 · parameters · tokens · images: the usual estimate of a transformer's training FLOPs."""
    _, patch = vit.parse_variant(config.model.variant)
    tokens = (config.input.image_size // patch) ** 2
    return 6.0 * num_params * tokens * config.batch_size


def bench_train_step(config, steps: int, warmup: int = 1, peak: dict | None = None, profile_top: int = 0) -> dict:
    """Compiles the trainer's step for `config`, runs `warmup` then `steps` timed steps (and,
    with `profile_top`, `steps` more under the profiler: `op_profile`'s top ops)."""
    mesh = train.make_mesh(config)
    trainer = train.build(config, mesh)
    state = train.initial_state(trainer)
    batch = pipeline.device_batch(random_batch(config.batch_size, config.input.image_size), trainer.batch_sharding)
    start = time.perf_counter()
    lowered = train.make_train_step(trainer).lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops, flops_source = step_flops(config, mesh, lowered, batch)
    for _ in range(warmup):
        state, metrics = jax.block_until_ready(compiled(state, batch))
    seconds, cpu_seconds = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = jax.block_until_ready(compiled(state, batch))   # the state is donated
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    loss = float(jax.device_get(metrics["loss"].compute()))
    if not np.isfinite(loss):
        raise FloatingPointError(f"the benchmarked step's loss is {loss}")
    median = float(np.median(seconds))
    devices = mesh.devices.size
    device = mesh.devices.flat[0]
    num_params = int(sum(x.size for x in jax.tree.leaves(state["params"])))
    result = {
        "variant": config.model.variant, "image_size": config.input.image_size, "batch": config.batch_size,
        "steps": steps, "warmup": warmup, "dtype": config.model.compute_dtype, "remat": config.model.remat,
        "scan": config.model.scan, "attention": config.model.attention, "params": num_params,
        "images_per_s": config.batch_size / median, "median_step_s": median,
        "p90_step_s": float(np.percentile(seconds, 90)), "step_s": seconds,
        "median_step_cpu_s": float(np.median(cpu_seconds)), "compile_s": compile_s,
        "flops_per_step": flops, "flops_source": flops_source, "analytic_6nt_flops_per_step": analytic_flops(num_params, config),
        "flops_per_s": flops / median, "loss": loss,
        "platform": device.platform, "device_kind": device.device_kind, "device_count": devices,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if peak:
        result.update(against_peak(result, peak, devices))
    if profile_top:
        result["profile"] = profile_steps(compiled, state, [(batch,)] * steps, profile_top, wait_each_step=True)
    return result


def against_peak(result: dict, peak: dict, devices: int) -> dict:
    """The step against the measured peak (and the datasheet's, for a known accelerator).

    Simulated CPU devices share the same cores, so a CPU machine's peak is one device's.
    """
    per_device = peak["peak_flops_per_s"]
    machine_peak = per_device if result["platform"] == "cpu" else per_device * devices
    out = {"peak_flops_per_s": per_device, "peak_matmul_n": peak["matmul_n"],
           "fraction_of_peak": result["flops_per_s"] / machine_peak,
           "floor_step_s": result["flops_per_step"] / machine_peak}
    sheet = datasheet_peak(result["device_kind"], result["dtype"])
    if sheet:
        out["datasheet_peak_flops_per_s"] = sheet
        out["fraction_of_datasheet_peak"] = result["flops_per_s"] / (sheet * devices)
    return out


# --- where a step's time goes ---------------------------------------------------------------

_HLO_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) [\w\-]+\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def profile_steps(compiled, state, step_args: Sequence[tuple], top: int = 20, wait_each_step: bool = False) -> dict:
    """`op_profile` of `state, _ = compiled(state, *args)` for each `args` in `step_args`, the
    state threaded from step to step (a train step that donates it). `wait_each_step`: wait
    for each step before dispatching the next, as the timed steps of `bench_train_step` do, so
    that the profile runs the steps as they were timed."""
    def run():
        nonlocal state
        for args in step_args:
            state, _ = compiled(state, *args)
            if wait_each_step:
                jax.block_until_ready(state)
        jax.block_until_ready(state)
    return op_profile(run, compiled.as_text(), len(step_args), top)


def op_profile(run: Callable[[], Any], compiled_text: str, steps: int, top: int = 20) -> dict:
    """Where `steps` steps of a compiled XLA:CPU module go, op by op, from a `jax.profiler` trace.

    `run()` runs the `steps` steps and waits for them; `compiled_text` is the module's
    `compiled.as_text()`. The trace's events are matched to the module's instructions by name
    (fusions, library calls such as YNNPACK's `ynn_fusion`, copies), so runtime events are left
    out and so is every event of a backend whose trace names kernels rather than instructions
    (GPUs: use their own profilers). Instructions are grouped by XLA's name without its number
    and by the JAX operation they come from (the `op_name` metadata, block numbers folded to
    `encoderblock_*`); `ms_per_step` is a group's summed duration per step, `share` its part
    of all matched time and `shape` the output of its longest instruction. Ops overlap (XLA
    runs independent ones on the cores at once), so the matched time per step
    (`op_ms_per_step`) can exceed the wall time (`wall_ms_per_step`).

    Where the cores idle (`worker_activity`): `busy_workers_ms_per_step` maps k to the ms per
    step during which exactly k of XLA:CPU's worker threads were busy, and each op group's
    `alone_ms_per_step` is the part of its time during which every other worker was idle: an
    op that keeps the other cores waiting (for example a product XLA:CPU's library runs on one
    thread). Both are absent when the trace has no worker threads."""
    shapes, op_names = {}, {}
    for line in compiled_text.splitlines():
        match = _HLO_OP.match(line)
        if match:
            shapes[match.group(1)] = match.group(2)
            op = _OP_NAME.search(line)
            op_names[match.group(1)] = re.sub(r"encoderblock_\d+", "encoderblock_*", op.group(1)) if op else ""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        try:
            run()
        finally:
            wall = time.perf_counter() - start
            jax.profiler.stop_trace()
        traces = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {trace_dir}")
        with gzip.open(traces[-1]) as f:
            events = json.load(f)["traceEvents"]
    activity = worker_activity(events)
    groups: dict[tuple[str, str], dict] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in shapes:
            continue
        key = (re.sub(r"\.\d+$", "", name), op_names[name])
        group = groups.setdefault(key, {"op": key[0], "jax_op": key[1], "us": 0.0, "alone_us": 0.0, "count": 0,
                                        "longest": -1.0})
        group["us"] += event["dur"]
        group["count"] += 1
        if activity is not None:
            group["alone_us"] += activity.alone(event)
        if event["dur"] > group["longest"]:
            group["longest"], group["shape"] = event["dur"], shapes[name]
    total = sum(g["us"] for g in groups.values())
    ranked = sorted(groups.values(), key=lambda g: -g["us"])[:top]
    ms = lambda us: round(us / steps / 1e3, 3)  # noqa: E731
    result = {"steps": steps, "wall_ms_per_step": round(wall / steps * 1e3, 3), "op_ms_per_step": ms(total),
              "top": [{"op": g["op"], "jax_op": g["jax_op"], "shape": g["shape"], "ms_per_step": ms(g["us"]),
                       "per_step": g["count"] / steps, "share": round(g["us"] / total, 4) if total else 0.0}
                      for g in ranked]}
    if activity is not None:
        result["workers"] = len(activity.busy)
        result["busy_workers_ms_per_step"] = {str(k): ms(us) for k, us in sorted(activity.histogram().items())}
        for row, group in zip(result["top"], ranked):
            row["alone_ms_per_step"] = ms(group["alone_us"])
    return result


# XLA:CPU runs a module's ops on the threads of its intra-op pool, named after Eigen's pool.
_WORKER_THREAD = "tf_XLAEigen"
# Instants that mark a worker taking up (StartRegion) and leaving (StopRegion) its share of an
# op that another worker launched and split over the pool.
_REGION_START, _REGION_STOP = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"


class WorkerActivity:
    """When each of XLA:CPU's worker threads was busy in a trace, as merged [start, end] µs
    intervals by thread id: inside any event of that thread (an op it launched, the runtime's
    executor) or between a StartRegion and the next StopRegion (its share of an op another
    worker launched). A worker is idle outside them."""

    def __init__(self, busy: dict[int, list[list[float]]]):
        self.busy = busy
        self._others = {tid: _merged([i for other, spans in busy.items() if other != tid for i in spans])
                        for tid in busy}
        self._everyone = _merged([i for spans in busy.values() for i in spans])

    def alone(self, event: dict) -> float:
        """µs of a complete event during which every worker but its own thread was idle."""
        others = self._others.get(event.get("tid"), self._everyone)
        start, end = event["ts"], event["ts"] + event["dur"]
        return event["dur"] - _overlap(others, start, end)

    def histogram(self) -> dict[int, float]:
        """µs during which exactly k workers were busy, for k = 0 .. workers, from the first
        busy moment of any worker to the last."""
        edges = sorted([(s, 1) for spans in self.busy.values() for s, _ in spans] +
                       [(f, -1) for spans in self.busy.values() for _, f in spans])
        counts = {k: 0.0 for k in range(len(self.busy) + 1)}
        busy_now, last = 0, edges[0][0] if edges else 0.0
        for time_us, change in edges:
            counts[busy_now] += time_us - last
            busy_now, last = busy_now + change, time_us
        return counts


def worker_activity(events: Sequence[dict]) -> WorkerActivity | None:
    """The busy intervals of XLA:CPU's worker threads in `jax.profiler` trace events (the
    `traceEvents` of a *.trace.json.gz), or None when the trace names no worker thread."""
    workers = {e["tid"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
               and str(e.get("args", {}).get("name", "")).startswith(_WORKER_THREAD)}
    if not workers:
        return None
    spans: dict[int, list[list[float]]] = {tid: [] for tid in workers}
    region_start: dict[int, float] = {}
    for event in sorted((e for e in events if e.get("ph") == "X" and e.get("tid") in workers),
                        key=lambda e: e["ts"]):
        tid, name = event["tid"], event.get("name", "")
        if name == _REGION_START:
            region_start.setdefault(tid, event["ts"])
        elif name == _REGION_STOP:
            if tid in region_start:
                spans[tid].append([region_start.pop(tid), event["ts"]])
        elif event.get("dur", 0) > 0:
            spans[tid].append([event["ts"], event["ts"] + event["dur"]])
    return WorkerActivity({tid: _merged(intervals) for tid, intervals in spans.items()})


def _merged(intervals: list[list[float]]) -> list[list[float]]:
    """Overlapping or touching [start, end] intervals joined, sorted by start."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _overlap(merged: list[list[float]], start: float, end: float) -> float:
    """How much of [start, end] the sorted, disjoint `merged` intervals cover."""
    i = max(bisect.bisect_right(merged, [start, float("inf")]) - 1, 0)
    covered = 0.0
    while i < len(merged) and merged[i][0] < end:
        covered += max(0.0, min(merged[i][1], end) - max(merged[i][0], start))
        i += 1
    return covered


# --- prepare ---------------------------------------------------------------------------------

# Runs in a fresh interpreter importing only what the prepare CLI imports and prints one JSON
# line. Peak RSS is VmHWM, the high-water mark of this process's memory since exec: Linux
# carries ru_maxrss over from the parent the child was forked from (here the benchmark, with
# jax loaded), so ru_maxrss is only the fallback where /proc is missing.
_PREPARE_CHILD = """
import json, resource, sys, time
from emonet_jax.data import prepare

def peak_rss_kb():
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

kind, data_dir, resolution, raw = sys.argv[1:]
rss_before = peak_rss_kb()
start = time.perf_counter()
built = prepare.build(kind, data_dir, int(resolution), manual_dir=raw)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_kb_before_build": rss_before, "peak_rss_kb": peak_rss_kb(),
                  **prepare.describe(built)}))
"""


def bench_prepare(raw_dir, kind: str, resolution: int, data_dir) -> dict:
    """Builds `kind`'s records at `resolution` from the parquet shards in `raw_dir` into the
    empty `data_dir`, in a subprocess; returns images/s and that process's peak RSS."""
    if any(os.scandir(data_dir)):
        raise ValueError(f"{data_dir} is not empty: a build there could be a no-op on old records")
    command = [sys.executable, "-c", _PREPARE_CHILD, kind, str(data_dir), str(resolution), str(raw_dir)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    images = sum(child["splits"].values())
    return {"dataset": child["name"], "images": images, "build_s": child["seconds"],
            "images_per_s": images / child["seconds"],
            "peak_rss_mb": child["peak_rss_kb"] / 1024,
            "peak_rss_mb_after_imports": child["peak_rss_kb_before_build"] / 1024,
            "bad_rows": child["bad_rows"]}
