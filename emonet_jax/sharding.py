"""The device mesh and how parameters and batches are laid out on it.

The mesh has two axes, `data` and `fsdp`. Batches are split over both (every device sees
different images); parameters matched by an 'fsdp' rule are split along their largest
dimension that the fsdp axis divides, and gathered by XLA when used (ZeRO-3 style);
everything else is replicated. With fsdp = 1 this is plain data parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emonet_jax import tree

AXES = ("data", "fsdp")
BATCH_AXES = AXES
STRATEGIES = ("fsdp", "replicate")


def make_mesh(axis_sizes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh from (('data', -1), ('fsdp', 1)); one size may be -1 (the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(name for name, _ in axis_sizes)
    if names != AXES:
        raise ValueError(f"config.mesh must name the axes {AXES} in that order, got {names}")
    sizes = [int(size) for _, size in axis_sizes]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {tuple(axis_sizes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh {tuple(axis_sizes)}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"config.mesh {tuple(axis_sizes)} needs {math.prod(sizes)} devices, found {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_rules(rules: Sequence[tuple[str, str]]) -> list:
    """[(compiled regex, strategy)]; fails at config time on an unknown strategy or bad regex."""
    checked = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or rule[1] not in STRATEGIES:
            raise ValueError(f"config.sharding_rules[{i}] = {tuple(rule)!r}: expected (regex, one of {STRATEGIES})")
        checked.append((tree.compile_patterns([rule[0]], f"config.sharding_rules[{i}]")[0], rule[1]))
    return checked


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
    """Split the largest dimension fsdp_size divides; replicate if none does."""
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
    """A NamedSharding per parameter: the first rule whose regex matches its 'a/b/c' path wins."""
    checked = check_rules(rules)
    fsdp_size = mesh.shape["fsdp"]

    def shard(path: str, leaf) -> NamedSharding:
        for pattern, strategy in checked:
            if pattern.fullmatch(path):
                if strategy == "fsdp" and fsdp_size > 1:
                    return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size))
                return replicated(mesh)
        return replicated(mesh)

    return tree.map_with_path(shard, abstract_params)
