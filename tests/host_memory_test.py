"""host_memory.reuse_freed_memory: a jitted step whose temporary buffer is larger than glibc's
mmap threshold faults its pages in anew on every call, and not once freed memory is kept.

Each case runs in a subprocess: malloc's settings are process-wide and cannot be undone."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from emonet_jax import host_memory

REPO = pathlib.Path(__file__).resolve().parents[1]

# A cumulative sum of a 64 MB array: XLA:CPU gives it a temporary buffer of over 64 MB, twice
# glibc's largest mmap threshold (32 MB).
STEP = """
import json, resource, sys
from emonet_jax import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else "not asked"
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x)))
x = jnp.ones((16 * 2**20,), jnp.float32)
compiled = f.lower(x).compile()
compiled(x).block_until_ready()
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults,
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes // 4096}))
"""


def run_step(mode: str, calls: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP, mode, str(calls)], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.on_glibc(), reason="glibc's malloc only")
def test_kept_memory_is_not_faulted_in_again():
    default, reused = run_step("default", 5), run_step("reuse", 40)
    assert default["temp_pages"] >= 2 * 8192                       # the step's temporary buffer is >= 64 MB
    assert reused["applied"] is None
    # Without the settings every call touches fresh pages for the whole buffer. With them the
    # heap grows for a while (until freed blocks of each size sit where the next call's fit:
    # a few to ~30 calls here), then the memory one call frees is the next one's, resident.
    assert min(default["faults"]) >= default["temp_pages"] // 2, default
    assert sum(reused["faults"][-10:]) < reused["temp_pages"] // 20, reused


@pytest.mark.skipif(host_memory.on_glibc(), reason="not glibc here")
def test_elsewhere_it_says_why_not():
    assert "not glibc" in host_memory.reuse_freed_memory()


@pytest.mark.parametrize("cli", ["embed", "predict"])
def test_argparse_clis_keep_freed_memory_unless_told(cli, monkeypatch, tmp_path):
    from emonet_jax import embed, predict
    main = {"embed": lambda extra: embed.main([f"--backbone={tmp_path / 'none.npz'}", f"--images={tmp_path}",
                                               f"--out={tmp_path / 'e.npz'}", *extra]),
            "predict": lambda extra: predict.main([f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'p.jsonl'}",
                                                   *extra, str(tmp_path / 'x.png')])}[cli]
    calls = []
    monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: calls.append(cli))
    # No such weights, so each run ends in an error; the setting comes before loading them.
    with pytest.raises(SystemExit, match="error"):
        main([])
    assert calls == [cli]
    with pytest.raises(SystemExit, match="error"):
        main(["--noreuse_freed_memory"])
    assert calls == [cli]    # not called a second time
