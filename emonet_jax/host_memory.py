"""Keep the host memory XLA frees for its next step instead of giving it back to the OS.

    from emonet_jax import host_memory
    host_memory.reuse_freed_memory()    # first thing in main(), before JAX starts its threads
    host_memory.apply_flag()            # the same, unless --noreuse_freed_memory (main, bench, heads_train)
    host_memory.apply(args.reuse_freed_memory)   # argparse CLIs (embed, predict): host_memory.add_argument

Why: XLA:CPU mallocs each execution's temporary buffer (1.6 GB for a ViT-B/16 train step at
batch 8) on one of its worker threads and frees it when the step ends. glibc serves a block
that large from a fresh `mmap` and returns it with `munmap` (its threshold for keeping freed
blocks tops out at 32 MB, and a worker thread's arena cannot hold it at all), so every step
faulted in and zeroed 1.6 GB anew: ~390k page faults and ~0.8 s of system time per step on 2
cores. With freed memory kept, the steps after the first fault nothing and ran 8-14 % faster
(BENCHMARKS.md "Host memory"). PyTorch's step, whose tensors are many smaller blocks, gains
nothing from the same setting.

How: three `mallopt` settings. One arena for all threads (a worker thread's arena would still
`mmap` a block it cannot hold), no `mmap` for large blocks, and no trimming of the heap's free
top. The cost is that the process's resident memory stays at its peak instead of shrinking
after one, which a training or benchmark process reaches in its first steps anyway.

glibc on Linux only; elsewhere (macOS, musl) nothing changes. Settings made after JAX's
threads have allocated do not reach their arenas, hence the call before anything touches JAX.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import sys

from absl import flags, logging

flags.DEFINE_bool("reuse_freed_memory", True, "Keep the host memory XLA frees for the next step instead of "
                  "returning it to the OS (glibc only; emonet_jax/host_memory.py).")

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 means "never trim".
_NEVER = -1

_applied = False


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc, the only malloc these settings are for."""
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def reuse_freed_memory() -> str | None:
    """Makes this process's malloc keep freed memory for reuse (see the module docstring).

    Returns None once applied, or why it was not (not glibc, or a setting glibc refused)."""
    if not on_glibc():
        return f"not glibc on Linux ({sys.platform}, {platform.libc_ver()[0] or 'unknown libc'})"
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for name, param, value in (("M_ARENA_MAX", _M_ARENA_MAX, 1), ("M_MMAP_MAX", _M_MMAP_MAX, 0),
                               ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _NEVER)):
        if libc.mallopt(param, value) != 1:
            return f"glibc refused mallopt({name}, {value})"
    global _applied
    _applied = True
    return None


def is_reusing() -> bool:
    """Whether `reuse_freed_memory` has applied in this process (benchmarks record it)."""
    return _applied


def apply(wanted: bool) -> None:
    """`reuse_freed_memory()` if `wanted`, saying so when it cannot apply."""
    if wanted:
        why_not = reuse_freed_memory()
        if why_not:
            logging.info("freed host memory goes back to the OS: %s", why_not)


def apply_flag() -> None:
    """`apply` unless --noreuse_freed_memory (the absl CLIs: main, bench, heads_train)."""
    apply(flags.FLAGS.reuse_freed_memory)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """The same opt-out for the argparse CLIs (embed, predict), spelled as absl spells it;
    `apply(args.reuse_freed_memory)` after parsing."""
    parser.add_argument("--noreuse_freed_memory", dest="reuse_freed_memory", action="store_false",
                        help="return the host memory XLA frees to the OS after each step (emonet_jax/host_memory.py)")
