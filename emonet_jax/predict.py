"""Per-image emotion predictions in the published JSONL format, from a training run or exported heads.

    # A ViT training run (WORKDIR/config.json, its latest checkpoint, eval/hq_predictions.npz)
    python -m emonet_jax.predict --workdir=workdirs/hq --out=preds.jsonl photos/ extra.jpg
    # EmpathicInsight-Face heads (heads.export) on the SigLIP backbone their card names
    python -m emonet_jax.predict --heads=workdirs/heads/export [--backbone=PATH] --out=preds.jsonl photos/

    model = predict.load(workdir="workdirs/hq")           # or load(heads_dir=DIR, backbone=PATH)
    scores = model.scores(uint8_images)                   # {'raw', 'intensity'[, 'presence']}: [N, 40]
    records = predict.records(paths, scores, model.means, top_k=3)

PATHS are image files and folders (walked recursively, sorted by relative path; every file in a
folder is tried as an image, as `embed --images` does). One line per input, in input order:

    {"image_path": "photos/0000_Happy.jpg",
     "results": {"model_amusement_best": {"raw": r, "mean_subtracted": m, "softmax": s}, ... 40 heads},
     "intensity": {"Amusement": 0-7, ... 40 emotions},
     "presence": {"Amusement": P(present), ...},             # --workdir only
     "top_k": [{"emotion": "Amusement", "head": "model_amusement_best", "intensity": x,
                "mean_subtracted": m, "softmax": s}, ...]}

`results` is the published files' layout (`evaluate.transfer.published_results`, so
`python -m emonet_jax.evaluate.transfer --scores=preds.jsonl` reads the file as it reads the
authors' `ferd.jsonl`): `raw` is the model's 0-7 score, `mean_subtracted` is raw minus the
model's per-head mean over the HQ benchmark, and `softmax` is the softmax over the 40
mean-subtracted scores of the image, which is what the published files hold (checked on the
authors' FERD file). The extra heads of the published files (valence, arousal, dominance,
vulnerability) are not written: neither model here predicts them per emotion head.

* `--workdir`: raw = intensity = the expected intensity Σ k·p_k of the run's 8-way heads;
  presence = P(intensity ≥ 1). The subtracted means are the run's means over its HQ
  predictions (`inference.reference_means`). A run without `eval/hq_predictions.npz` is
  refused before any image is read: without the means, `mean_subtracted` and `softmax` are
  undefined, and a raw-only file would be skipped line by line by the transfer evaluation.
* `--heads`: raw = the heads' regression output (not clipped), intensity = raw clipped to
  [0, 7], no presence; the means are the card's. The backbone is the card's
  (`backbone.backbone`) or `--backbone`; it is refused unless its parameter fingerprint and
  ViT settings are the card's, so heads never read embeddings of another tower.
* `top_k` ranks the emotions by `--rank_by`: `softmax` (default: the mean-subtracted score, the
  published files' and the transfer protocol's ranking, which discounts emotions every face
  shows a little of, e.g. Concentration) or `intensity` (the raw 0-7 rating). Ties keep the
  taxonomy order.

An unreadable file (missing, not an image, truncated) or an image whose scores are not finite
gets `{"image_path": ..., "error": "..."}` and the rest go on; the counts are printed on stderr
at the end, with a tqdm progress bar while it runs. Exit status 0 if at least one image was
predicted, 1 otherwise.

Output safety: lines go to OUT.partial as they are computed (flushed every batch), with the job's
description in OUT.partial.json; only a finished run renames OUT.partial to OUT. Re-running the
same command after an interruption continues the partial file where it stopped (its lines are
kept; a torn last line is dropped and redone), and a partial file from another job (other
model, inputs, top_k or ranking) is refused rather than mixed. An existing OUT is replaced only
with --overwrite, and only when the new file is complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from emonet_jax import embed, host_memory, inference, taxonomy
from emonet_jax.evaluate import transfer
from emonet_jax.models import heads

RANKINGS = ("softmax", "intensity")
JOB_FORMAT = 1


class PredictError(ValueError):
    """Bad input or a model that cannot be used; the message names the file."""


# --- the two kinds of model ---------------------------------------------------------------------

@dataclasses.dataclass
class WorkdirModel:
    """A ViT training run: uint8 images -> expected intensity and presence of the 40 emotions."""
    run: inference.Run
    means: np.ndarray           # [40]: the run's mean intensity over HQ
    means_source: str
    batch_size: int = 64        # images per step

    @classmethod
    def load(cls, workdir, batch_size: int = 64) -> "WorkdirModel":
        means, source = inference.reference_means(workdir)  # first: it fails fast, before the checkpoint
        return cls(inference.Run.load(workdir), means, source, batch_size)

    @property
    def image_size(self) -> int:
        return self.run.image_size

    resample = "bilinear"  # the trainer's input pipeline (pipeline.resize)

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.run.predict(images, self.batch_size)
        return {"raw": out["intensity"], "intensity": out["intensity"], "presence": out["presence"]}

    def score_stream(self, batches: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[dict, Any]]:
        for images, payload in batches:
            yield (self.scores(images) if len(images) else _no_scores(presence=True)), payload

    def describe(self) -> dict[str, Any]:
        return {"kind": "workdir", "workdir": str(self.run.workdir.resolve()),
                "params_fingerprint": embed.params_fingerprint(self.run.params),
                "means": [float(m) for m in self.means], "means_source": self.means_source}


@dataclasses.dataclass
class HeadsModel:
    """Exported EmpathicInsight-Face heads on their SigLIP backbone: uint8 images -> 0-7 scores."""
    params: Any
    card: dict[str, Any]
    embedder: embed.Embedder
    export_dir: pathlib.Path

    @classmethod
    def load(cls, export_dir, backbone=None, batch_size: int = 64) -> "HeadsModel":
        export_dir = pathlib.Path(export_dir).expanduser()
        params, card = heads.load_export(export_dir)
        named = card.get("backbone") or {}
        path = backbone or named.get("backbone")
        if not path:
            raise PredictError(f"{export_dir / heads.CARD_FILE} names no backbone: pass --backbone=PATH")
        if not pathlib.Path(path).expanduser().exists():
            named_by = "--backbone" if backbone else f"the card {export_dir / heads.CARD_FILE}"
            raise PredictError(f"backbone {path} (from {named_by}) not found: pass --backbone=PATH to the "
                               f"weights the heads were trained on (fingerprint {named.get('backbone_fingerprint')})")
        embedder = embed.Embedder(path, batch_size, image_size=card["preprocessing"].get("image_size"),
                                  dtype=named.get("dtype") or "float32",
                                  resample=card["preprocessing"].get("resize", embed.DEFAULT_RESAMPLE))
        check_backbone(embedder, card, export_dir)
        return cls(params, card, embedder, export_dir)

    @property
    def image_size(self) -> int:
        return self.embedder.image_size

    @property
    def resample(self) -> str:
        return self.embedder.resample

    @property
    def batch_size(self) -> int:  # rounded up to a multiple of the device count
        return self.embedder.batch_size

    @property
    def means(self) -> np.ndarray:
        return np.asarray(self.card["mean_subtraction"]["means"], np.float64)

    @property
    def means_source(self) -> str:
        return str(self.card["mean_subtraction"].get("source"))

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._from_embeddings(self.embedder.embed(images))

    def score_stream(self, batches: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[dict, Any]]:
        # The embedder dispatches batch k+1 before reading batch k back; the heads are cheap.
        for embeddings, payload in self.embedder.embed_stream(batches):
            yield (self._from_embeddings(embeddings) if len(embeddings) else _no_scores(presence=False)), payload

    def _from_embeddings(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        raw = heads.predict(self.params, self.card, embeddings, batch_size=self.embedder.batch_size)["raw"]
        return {"raw": raw, "intensity": np.clip(raw, 0.0, 7.0)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "heads", "export": str(self.export_dir.resolve()),
                "heads_fingerprint": embed.params_fingerprint(self.params),
                "backbone": self.embedder.describe()["backbone"], "backbone_fingerprint": self.embedder.fingerprint,
                "means": [float(m) for m in self.means], "means_source": self.means_source}


def _no_scores(presence: bool) -> dict[str, np.ndarray]:
    empty = np.zeros((0, taxonomy.NUM_EMOTIONS), np.float32)
    return {"raw": empty, "intensity": empty, **({"presence": empty} if presence else {})}


def check_backbone(embedder: embed.Embedder, card: dict[str, Any], export_dir) -> None:
    """Refuses a backbone whose weights or ViT settings are not the ones the heads were trained on."""
    named = card.get("backbone") or {}
    where = pathlib.Path(export_dir) / heads.CARD_FILE
    expected = named.get("backbone_fingerprint")
    if not expected:
        raise PredictError(f"{where} has no backbone fingerprint, so the backbone cannot be checked")
    if embedder.fingerprint != expected:
        raise PredictError(f"backbone {embedder.tower.path} has parameter fingerprint {embedder.fingerprint}, but the "
                           f"heads in {export_dir} were trained on {named.get('backbone')} ({expected}): other weights "
                           "give other embeddings; pass --backbone=PATH to the card's weights")
    config = named.get("backbone_config")
    if config is not None and json.loads(json.dumps(embedder.tower.config)) != config:
        raise PredictError(f"backbone {embedder.tower.path}: ViT settings {embedder.tower.config} differ from {where}'s "
                           f"{config}")
    if card["architecture"]["input_dim"] != embedder.dim:
        raise PredictError(f"backbone {embedder.tower.path} gives {embedder.dim}-d embeddings, the heads in "
                           f"{export_dir} read {card['architecture']['input_dim']}")


def load(*, workdir=None, heads_dir=None, backbone=None, batch_size: int = 64) -> WorkdirModel | HeadsModel:
    """A training run (`workdir`) or exported heads (`heads_dir`, optionally `backbone`)."""
    if (workdir is None) == (heads_dir is None):
        raise PredictError("give exactly one of a training workdir and a heads export")
    if workdir is not None:
        if backbone is not None:
            raise PredictError("--backbone goes with --heads (a training run has its own image tower)")
        return WorkdirModel.load(workdir, batch_size)
    return HeadsModel.load(heads_dir, backbone, batch_size)


# --- lines ---------------------------------------------------------------------------------------

def records(paths: Sequence, scores: dict[str, np.ndarray], means: np.ndarray, top_k: int = 3,
            rank_by: str = "softmax") -> list[dict[str, Any]]:
    """One output line (a dict) per image; an image with a non-finite score gets an error line."""
    if rank_by not in RANKINGS:
        raise PredictError(f"rank_by {rank_by!r}: expected one of {RANKINGS}")
    finite = np.isfinite(scores["raw"]).all(axis=1) & np.isfinite(scores["intensity"]).all(axis=1)
    results = transfer.published_results(np.where(finite[:, None], scores["raw"], 0.0), means)
    lines = []
    for i, path in enumerate(paths):
        if not finite[i]:
            lines.append({"image_path": str(path), "error": "the model gave non-finite scores"})
            continue
        line = {"image_path": str(path), "results": results[i],
                "intensity": dict(zip(taxonomy.NAMES, map(float, scores["intensity"][i])))}
        if "presence" in scores:
            line["presence"] = dict(zip(taxonomy.NAMES, map(float, scores["presence"][i])))
        line["top_k"] = top_emotions(results[i], scores["intensity"][i], top_k, rank_by)
        lines.append(line)
    return lines


def top_emotions(results: dict[str, dict], intensity: np.ndarray, k: int, rank_by: str) -> list[dict[str, Any]]:
    """The k highest-ranked emotions, best first; ties keep the taxonomy order."""
    rank = [results[h]["softmax"] for h in taxonomy.HEAD_NAMES] if rank_by == "softmax" else intensity
    order = np.argsort(-np.asarray(rank, np.float64), kind="stable")[:k]
    return [{"emotion": taxonomy.NAMES[e], "head": taxonomy.HEAD_NAMES[e], "intensity": float(intensity[e]),
             "mean_subtracted": results[taxonomy.HEAD_NAMES[e]]["mean_subtracted"],
             "softmax": results[taxonomy.HEAD_NAMES[e]]["softmax"]} for e in order]


def error_line(path, message: str) -> dict[str, str]:
    return {"image_path": str(path), "error": message}


# --- inputs --------------------------------------------------------------------------------------

def list_inputs(paths: Sequence) -> tuple[list[pathlib.Path], list[str]]:
    """(files in order, notes): files as given, folders walked (embed.list_files); a file reached
    twice is kept the first time (the notes say so), as the transfer evaluation refuses duplicates."""
    files, notes, seen = [], [], {}
    for arg in paths:
        root = pathlib.Path(arg).expanduser()
        found = embed.list_files(root) if root.is_dir() else [root]
        if root.is_dir() and not found:
            notes.append(f"{root}: folder holds no file")
        for path in found:
            key = os.path.realpath(path)
            if key in seen:
                notes.append(f"{path}: same file as {seen[key]}, predicted once")
                continue
            seen[key] = path
            files.append(path)
    return files, notes


# --- the output file, resumable ------------------------------------------------------------------

@dataclasses.dataclass
class PartialOutput:
    """OUT.partial (lines so far) and OUT.partial.json (the job), renamed to OUT when finished."""
    out: pathlib.Path

    @property
    def lines_path(self) -> pathlib.Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def job_path(self) -> pathlib.Path:
        return self.out.with_name(self.out.name + ".partial.json")

    def start(self, job: dict[str, Any], files: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
        """The lines an interrupted run of the same job wrote, for files[:len(lines)] ([] for a new job)."""
        job = json.loads(json.dumps(job))  # as it reads back from the job file
        if not self.lines_path.exists():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.job_path.write_text(json.dumps(job, indent=1) + "\n")  # first: lines never lack their job
            self.lines_path.write_text("")
            return []
        old = json.loads(self.job_path.read_text()) if self.job_path.is_file() else None
        if old != job:
            differ = sorted(k for k in job if (old or {}).get(k) != job[k]) if old else ["(no job file)"]
            raise PredictError(f"{self.lines_path} holds lines of another job (differs in: {', '.join(differ)}); "
                               "refusing to mix them. Use another --out, or delete that file to start over.")
        return self._keep_whole_lines(files)

    def _keep_whole_lines(self, files: Sequence[pathlib.Path]) -> list[dict[str, Any]]:
        text = self.lines_path.read_text(encoding="utf-8")
        whole = text[:text.rfind("\n") + 1]  # a line torn by the interruption is redone
        lines = [json.loads(line) for line in whole.splitlines()]
        for n, line in enumerate(lines):
            if n >= len(files) or line.get("image_path") != str(files[n]):
                raise PredictError(f"{self.lines_path}:{n + 1} is not the line of the job's input {n + 1}; "
                                   "delete that file to start over")
        if len(whole) != len(text):
            self.lines_path.write_text(whole, encoding="utf-8")
        return lines

    def append(self, lines: Iterable[dict[str, Any]]) -> None:
        with open(self.lines_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(line, allow_nan=False) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        os.replace(self.lines_path, self.out)
        self.job_path.unlink(missing_ok=True)


def job_description(model, files: Sequence[pathlib.Path], top_k: int, rank_by: str) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(map(str, files)).encode()).hexdigest()[:16]
    return {"format": JOB_FORMAT, "model": model.describe(), "num_inputs": len(files),
            "inputs_sha256": digest, "top_k": top_k, "rank_by": rank_by}


# --- the whole job -------------------------------------------------------------------------------

def predict_files(model, inputs: Sequence, out, *, top_k: int = 3, rank_by: str = "softmax",
                  overwrite: bool = False, threads: int = 8) -> dict[str, Any]:
    """Writes one line per input file to `out` (see the module docstring); returns the counts:
    {'out', 'inputs', 'resumed_after', 'predicted', 'errors'} (the last two over the whole file)."""
    out = pathlib.Path(out).expanduser()
    if top_k < 0:
        raise PredictError(f"--top_k must be >= 0, got {top_k}")
    if out.exists() and not overwrite:
        raise PredictError(f"{out} exists; pass --overwrite to replace it (it is replaced only once the new file "
                           "is complete)")
    files, notes = list_inputs(inputs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not files:
        raise PredictError(f"no input file in {list(map(str, inputs))}")
    output = PartialOutput(out)
    previous = output.start(job_description(model, files, top_k, rank_by), files)
    if previous:
        print(f"continuing {output.lines_path}: {len(previous)} of {len(files)} inputs already done", file=sys.stderr)
    todo = files[len(previous):]

    def read(indices):
        indices = [int(i) for i in indices]
        images, kept, errors = inference.read_images([todo[i] for i in indices], model.image_size, model.resample)
        return images, ([indices[k] for k in kept], indices, errors)

    errors = sum("error" in line for line in previous)
    with embed.progress_bar(len(files), len(previous), desc="predict") as bar:
        for scores, (kept, indices, messages) in model.score_stream(
                embed.batch_loader(len(todo), model.batch_size, read, threads)):
            lines = _batch_lines(todo, kept, indices, messages, scores, model.means, top_k, rank_by)
            output.append(lines)
            for line in lines:
                if "error" in line:
                    errors += 1
                    tqdm.write(f"error: {line['image_path']}: {line['error']}", file=sys.stderr)
            bar.update(len(lines))
    output.finish()
    return {"out": str(out), "inputs": len(files), "resumed_after": len(previous),
            "predicted": len(files) - errors, "errors": errors}


def _batch_lines(todo, kept, indices, messages, scores, means, top_k, rank_by) -> list[dict[str, Any]]:
    """The batch's lines in input order: predictions for the read images, errors for the others."""
    predicted = dict(zip(kept, records([todo[i] for i in kept], scores, means, top_k, rank_by)))
    failed = iter(messages)  # read_images reports the unread files in order, one message each
    return [predicted[i] if i in predicted else error_line(todo[i], _strip_path(next(failed), todo[i]))
            for i in indices]


def _strip_path(message: str, path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


# --- command line --------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emonet_jax.predict", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per-image predictions of the 40 emotions in the published JSONL format "
                    "(image_path, results: {model_<slug>_best: {raw, mean_subtracted, softmax}}) plus 0-7 "
                    "intensities, presence probabilities (training runs) and the top-k emotions.")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="a training run (config.json, checkpoints/, eval/hq_predictions.npz)")
    model.add_argument("--heads", help="exported EmpathicInsight-Face heads (heads.safetensors + card.json)")
    p.add_argument("--backbone", help="with --heads: the SigLIP weights (default: the card's path; the "
                                      "fingerprint must match the card's)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--top_k", type=int, default=3, help="emotions listed in each line's top_k")
    p.add_argument("--rank_by", default="softmax", choices=RANKINGS,
                   help="top_k order: softmax (= mean-subtracted score) or intensity (raw 0-7)")
    p.add_argument("--batch", type=int, default=64, help="images per step")
    p.add_argument("--threads", type=int, default=8, help="threads reading and resizing images")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new one is complete)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (walked recursively)")
    host_memory.add_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.backbone is not None and args.heads is None:
        raise SystemExit("error: --backbone goes with --heads (a training run has its own image tower)")
    host_memory.apply(args.reuse_freed_memory)   # before the tower's first step
    try:
        model = load(workdir=args.workdir, heads_dir=args.heads, backbone=args.backbone, batch_size=args.batch)
        print(f"model: {args.workdir or args.heads} ({model.image_size} px); means subtracted: {model.means_source}",
              file=sys.stderr)
        summary = predict_files(model, args.paths, args.out, top_k=args.top_k, rank_by=args.rank_by,
                                overwrite=args.overwrite, threads=args.threads)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: the lines written so far are kept in {args.out}.partial; "
                         "re-run the same command to continue") from None
    except (ValueError, OSError) as e:  # PredictError, heads.ExportError, embed.EmbedError, bad weights
        raise SystemExit(f"error: {e}") from None
    resumed = f", continuing after {summary['resumed_after']}" if summary["resumed_after"] else ""
    print(f"wrote {summary['out']}: {summary['inputs']} inputs{resumed}; {summary['predicted']} predicted, "
          f"{summary['errors']} error lines", file=sys.stderr)
    if summary["predicted"] == 0:
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
