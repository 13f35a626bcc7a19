"""`tfds build tfds_builders/emonet_face_hq` works as a user would run it."""

import pathlib
import subprocess
import sys

from emonet_jax.data import pipeline, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_tfds_build_cli_writes_array_record(tmp_path):
    raw = tmp_path / "raw"
    synthetic.write_split(raw, "hq", 6, seed=1, size=64, schema="card")
    data_dir = tmp_path / "tfds"
    # `tfds` is the console script of tensorflow_datasets.scripts.cli.main.
    cmd = [sys.executable, "-m", "tensorflow_datasets.scripts.cli.main", "build",
           "tfds_builders/emonet_face_hq", "--config=64", f"--manual_dir={raw}", f"--data_dir={data_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    built = data_dir / "emonet_face_hq" / "64" / "1.0.0"
    assert list(built.glob("emonet_face_hq-test.array_record-*"))
    source = pipeline.open_split("emonet_face_hq/64", "test", data_dir)
    assert len(source) == 6
    assert source[0]["image"].shape == (64, 64, 3)
