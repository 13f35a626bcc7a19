"""Parameter trees addressed by 'a/b/c' paths (what checkpoints, rules and errors name)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax


def _key(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_str(path) -> str:
    return "/".join(_key(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf}; the inverse of `unflatten`."""
    return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def param_paths(tree: Any) -> list[str]:
    return sorted(flatten(tree))


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """tree_map where `fn` also gets the leaf's 'a/b/c' path."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """Regexes matched against whole 'a/b/c' paths; a bad one fails now, naming it."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"{what}: bad regex {pattern!r}: {e}") from None
    return compiled


def matches_any(path: str, patterns: Sequence[re.Pattern]) -> bool:
    return any(p.fullmatch(path) for p in patterns)
