"""Shared fixtures. Simulates 8 CPU devices so sharding code paths run on a laptop."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"real reference data not found at {REFERENCE} (shared/ beside the repo)")
    return REFERENCE


@pytest.fixture(scope="session")
def synthetic_records(tmp_path_factory) -> dict:
    """Tiny synthetic HQ / Binary / Big prepared at 64 px; returns prepare's summary."""
    from emonet_jax.data import prepare
    spec = prepare.SyntheticSpec(num_hq=24, num_binary=40, num_big=48, image_size=64, seed=3)
    return prepare.prepare_synthetic(tmp_path_factory.mktemp("records"), 64, spec)
