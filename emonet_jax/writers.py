"""Metric writers: TensorBoard (through clu) plus a plain WORKDIR/metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
from typing import Any

from absl import logging
from clu import metric_writers
from clu.metric_writers import interface


class JsonlWriter(interface.MetricWriter):
    """One JSON object per `write_scalars` call: {"step": s, "train/loss": ..., ...}.

    Non-finite values are written as null (JSON has no NaN). Only scalars are kept; the
    other summary kinds go to TensorBoard alone.
    """

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._file = self.path.open("a")

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        row = {"step": int(step)}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else None
        with self._naming_the_file():
            self._file.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        with self._naming_the_file():
            self._file.flush()

    @contextlib.contextmanager
    def _naming_the_file(self):
        # A full disk raises "[Errno 28] No space left on device" without saying which file.
        try:
            yield
        except OSError as e:
            raise OSError(e.errno, f"cannot write {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        self._file.close()

    def write_summaries(self, step, values, metadata=None): pass  # noqa: E704
    def write_images(self, step, images): pass  # noqa: E704
    def write_videos(self, step, videos): pass  # noqa: E704
    def write_audios(self, step, audios, *, sample_rate): pass  # noqa: E704
    def write_texts(self, step, texts): pass  # noqa: E704
    def write_histograms(self, step, arrays, num_buckets=None): pass  # noqa: E704
    def write_hparams(self, hparams): pass  # noqa: E704


def drop_after(path, step: int) -> int:
    """Removes lines logged after `step` (a resumed run logs those steps again) and a last line
    cut short (a run killed, or a disk full, while writing it); returns how many."""
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines()
    complete = lines if text.endswith("\n") else lines[:-1]
    if len(complete) < len(lines):
        logging.warning("%s: dropping its unfinished last line %r", path, lines[-1][:100])
    kept = [line for line in complete if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def create(workdir, is_writer: bool) -> metric_writers.MetricWriter:
    """TensorBoard + logging + metrics.jsonl on the writing process; logging only elsewhere."""
    workdir = pathlib.Path(workdir)
    if not is_writer:
        return metric_writers.create_default_writer(None, just_logging=True)
    return metric_writers.MultiWriter([
        metric_writers.create_default_writer(str(workdir / "tensorboard"), asynchronous=False),
        JsonlWriter(workdir / "metrics.jsonl")])
