"""predict: published-format JSONL from a training run and from exported heads, equal to the
models applied directly; unreadable files, top-k order, resume, refusals, and the transfer
evaluation reading the file back."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from _helpers import REPO, train_run
from PIL import Image

from emonet_jax import embed, inference, predict, taxonomy
from emonet_jax.data import pipeline
from emonet_jax.evaluate import transfer
from emonet_jax.models import heads

E = taxonomy.NUM_EMOTIONS
TOWER = REPO / "tests" / "fixtures" / "siglip_tiny" / "vision"
OTHER_TOWER = REPO / "tests" / "fixtures" / "siglip_tiny" / "siglip2_vision"
CLASSES = ["Happy", "Sad", "Surprised", "Anger", "Fear"]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory, synthetic_records):
    """FERD-named HQ faces (one in a sub-folder), a text file and a truncated PNG; returns
    (folder, the files predict should list in order, the unreadable ones)."""
    root = tmp_path_factory.mktemp("faces")
    source = pipeline.open_split("emonet_face_hq/64", "test", synthetic_records["data_dir"])
    (root / "more").mkdir()
    for i, cls in enumerate(CLASSES):
        Image.fromarray(source[i]["image"]).save(root / ("more" if i == 4 else ".") / f"{i:04d}_{cls}.png")
    (root / "0005_Happy.png").write_bytes((root / "0000_Happy.png").read_bytes()[:60])   # truncated
    (root / "notes.txt").write_text("not an image")
    files = [root / n for n in ("0000_Happy.png", "0001_Sad.png", "0002_Surprised.png", "0003_Anger.png",
                                "0005_Happy.png", "more/0004_Fear.png", "notes.txt")]
    return root, files, {files[4], files[6]}


def read_lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def matrix(lines, field):
    return np.array([[line["results"][h][field] for h in taxonomy.HEAD_NAMES] for line in lines])


def check_published_fields(lines, means):
    """raw / mean_subtracted / softmax as the published files hold them, and top_k in their order."""
    raw, centred, probs = matrix(lines, "raw"), matrix(lines, "mean_subtracted"), matrix(lines, "softmax")
    np.testing.assert_allclose(centred, raw - means[None], atol=1e-6)
    np.testing.assert_allclose(probs, transfer.softmax(centred, axis=1), atol=1e-9)
    for line, p in zip(lines, probs):
        assert list(line["intensity"]) == list(taxonomy.NAMES)
        best = np.argsort(-p, kind="stable")[:len(line["top_k"])]
        assert [t["emotion"] for t in line["top_k"]] == [taxonomy.NAMES[e] for e in best]
        assert [t["head"] for t in line["top_k"]] == [taxonomy.HEAD_NAMES[e] for e in best]
        assert all(a["softmax"] >= b["softmax"] for a, b in zip(line["top_k"], line["top_k"][1:]))


# --- a training run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory, synthetic_records):
    workdir = tmp_path_factory.mktemp("run")
    train_run(workdir, synthetic_records["data_dir"], total_steps=2)   # a checkpoint and the HQ evaluation
    assert (workdir / "eval" / "hq_predictions.npz").is_file()
    return workdir


@pytest.fixture(scope="module")
def workdir_output(tmp_path_factory, workdir, images_dir):
    root, _, _ = images_dir
    out = tmp_path_factory.mktemp("out") / "preds.jsonl"
    code = predict.main([f"--workdir={workdir}", f"--out={out}", "--batch=3", "--threads=1", str(root)])
    return out, code


def test_workdir_lines_equal_the_run_applied_directly(workdir, workdir_output, images_dir, capsys):
    out, code = workdir_output
    _, files, unreadable = images_dir
    assert code == 0
    lines = read_lines(out)
    assert [line["image_path"] for line in lines] == [str(f) for f in files]
    assert not pathlib.Path(str(out) + ".partial").exists() and not pathlib.Path(str(out) + ".partial.json").exists()
    errors = [line for line in lines if "error" in line]
    assert {line["image_path"] for line in errors} == {str(f) for f in unreadable}
    assert all(set(line) == {"image_path", "error"} and "cannot read image" in line["error"] for line in errors)

    good = [line for line in lines if "error" not in line]
    assert all(set(line) == {"image_path", "results", "intensity", "presence", "top_k"} for line in good)
    run = inference.Run.load(workdir)
    images, kept, _ = inference.read_images([line["image_path"] for line in good], run.image_size)
    assert len(kept) == len(good) == 5
    expected = run.predict(images)
    np.testing.assert_allclose(matrix(good, "raw"), expected["intensity"], atol=1e-5)
    np.testing.assert_allclose([list(line["intensity"].values()) for line in good], expected["intensity"], atol=1e-5)
    np.testing.assert_allclose([list(line["presence"].values()) for line in good], expected["presence"], atol=1e-5)
    means, _ = inference.reference_means(workdir)
    check_published_fields(good, means)


def test_the_transfer_evaluation_reads_the_file(workdir_output, tmp_path):
    out, _ = workdir_output
    result = transfer.evaluate_scores_file(out, "ferd")
    assert result["n"] == 5
    assert result["per_class_n"]["happy"] == 1 and result["per_class_n"]["fear"] == 1
    assert result["skipped"]["missing_results"]["count"] == 2   # the two error lines
    assert transfer.main([f"--scores={out}", "--dataset=ferd", f"--out={tmp_path}"]) == 0


def test_a_run_without_hq_means_is_refused_before_reading_images(tmp_path, workdir, images_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(SystemExit, match=r"hq_predictions.npz not found: run the trainer's evaluation"):
        predict.main([f"--workdir={bare}", f"--out={tmp_path / 'p.jsonl'}", str(images_dir[0])])
    assert not list(tmp_path.glob("p.jsonl*"))


# --- exported heads ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """Random heads over the fixture tower's embeddings, exported with a card naming that tower."""
    embedder = embed.Embedder(TOWER, batch_size=8)
    params = heads.Heads(hidden=(16, 8)).init(jax.random.key(0), np.zeros((1, embedder.dim)))["params"]
    card = heads.make_card(variant="small", hidden=(16, 8), dim=embedder.dim, dropout=0.0, input_norm="none",
                           cache_meta=embedder.describe(), means=np.linspace(-0.5, 0.5, E), means_source="test means")
    out = tmp_path_factory.mktemp("export")
    heads.export(out, jax.device_get(params), card)
    return out, embedder


def test_heads_lines_equal_heads_predict_on_the_embeddings(tmp_path, export, images_dir, capsys):
    export_dir, embedder = export
    root, files, unreadable = images_dir
    out = tmp_path / "preds.jsonl"
    assert predict.main([f"--heads={export_dir}", f"--out={out}", "--batch=4", "--threads=1", "--top_k=5",
                         str(root / "more"), str(root)]) == 0
    assert "2 error lines" in capsys.readouterr().err
    lines = read_lines(out)
    # The sub-folder's file comes first (first PATH) and is not repeated by the second.
    assert [line["image_path"] for line in lines] == [str(files[5])] + [str(f) for f in files if f != files[5]]
    good = [line for line in lines if "error" not in line]
    assert len(good) == 5 and all("presence" not in line and len(line["top_k"]) == 5 for line in good)
    params, card = heads.load_export(export_dir)
    images, _, _ = inference.read_images([line["image_path"] for line in good], embedder.image_size)
    expected = heads.predict(params, card, embedder.embed(images))
    np.testing.assert_allclose(matrix(good, "raw"), expected["raw"], atol=1e-5)
    np.testing.assert_allclose(matrix(good, "mean_subtracted"), expected["mean_subtracted"], atol=1e-5)
    np.testing.assert_allclose([list(line["intensity"].values()) for line in good],
                               np.clip(expected["raw"], 0, 7), atol=1e-5)
    check_published_fields(good, np.asarray(card["mean_subtraction"]["means"]))
    assert transfer.evaluate_scores_file(out, "ferd")["n"] == 5


def test_heads_refuse_a_backbone_with_other_weights(tmp_path, export, images_dir):
    export_dir, _ = export
    with pytest.raises(SystemExit, match=r"parameter fingerprint sha256:\w+, but the heads .* were trained on"):
        predict.main([f"--heads={export_dir}", f"--backbone={OTHER_TOWER}", f"--out={tmp_path / 'p.jsonl'}",
                      str(images_dir[0])])
    moved = tmp_path / "moved"
    moved.mkdir()
    card = json.loads((export_dir / heads.CARD_FILE).read_text())
    card["backbone"]["backbone"] = str(tmp_path / "gone")
    (moved / heads.CARD_FILE).write_text(json.dumps(card))
    (moved / heads.WEIGHTS_FILE).write_bytes((export_dir / heads.WEIGHTS_FILE).read_bytes())
    with pytest.raises(SystemExit, match=r"backbone .*gone \(from the card .*\) not found: pass --backbone"):
        predict.main([f"--heads={moved}", f"--out={tmp_path / 'p.jsonl'}", str(images_dir[0])])
    # The right weights under another path are accepted.
    assert predict.main([f"--heads={moved}", f"--backbone={TOWER}", f"--out={tmp_path / 'p.jsonl'}",
                         str(images_dir[0])]) == 0


def test_an_interrupted_run_continues_to_the_same_file(tmp_path, workdir, images_dir, monkeypatch, capsys):
    model = predict.WorkdirModel.load(workdir, batch_size=2)   # one model (one compile) for every run below
    inputs = [images_dir[0]]
    predict.predict_files(model, inputs, tmp_path / "whole.jsonl", threads=1)
    out = tmp_path / "resumed.jsonl"
    append = predict.PartialOutput.append
    calls = []

    def append_then_interrupt(self, lines):
        calls.append(len(lines))
        append(self, lines)
        if len(calls) == 2:
            with open(self.lines_path, "a") as f:
                f.write('{"image_path": "torn')       # a line cut by the kill
            raise KeyboardInterrupt

    monkeypatch.setattr(predict.PartialOutput, "append", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_files(model, inputs, out, threads=1)
    assert not out.exists()
    assert pathlib.Path(str(out) + ".partial").read_text().count("\n") == 4   # 2 batches of 2, then the torn line
    monkeypatch.setattr(predict.PartialOutput, "append", append)
    # Another job (here another top_k) is refused rather than mixed into the partial file.
    with pytest.raises(predict.PredictError, match=r"another job \(differs in: top_k\)"):
        predict.predict_files(model, inputs, out, top_k=2, threads=1)
    summary = predict.predict_files(model, inputs, out, threads=1)
    assert "4 of 7 inputs already done" in capsys.readouterr().err
    assert summary == {"out": str(out), "inputs": 7, "resumed_after": 4, "predicted": 5, "errors": 2}
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
    # A finished file is replaced only on request.
    with pytest.raises(predict.PredictError, match="exists; pass --overwrite"):
        predict.predict_files(model, inputs, out, threads=1)
    predict.predict_files(model, inputs, out, overwrite=True, top_k=1, threads=1)
    assert all(len(line.get("top_k", [0])) == 1 for line in read_lines(out))


def test_interrupting_the_cli_says_how_to_continue(tmp_path, workdir, images_dir, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(predict, "load", lambda **kwargs: predict.WorkdirModel(None, np.zeros(E), "test"))
    monkeypatch.setattr(predict.WorkdirModel, "image_size", 32)
    monkeypatch.setattr(predict, "predict_files", interrupt)
    with pytest.raises(SystemExit, match=r"p.jsonl.partial; re-run the same command to continue"):
        predict.main([f"--workdir={workdir}", f"--out={tmp_path / 'p.jsonl'}", str(images_dir[0])])


def test_no_readable_image_exits_1_and_the_cli_runs_as_a_module(tmp_path, export, images_dir):
    export_dir, _ = export
    _, files, _ = images_dir
    command = [sys.executable, "-m", "emonet_jax.predict", f"--heads={export_dir}", f"--out={tmp_path / 'p.jsonl'}",
               str(files[6]), str(tmp_path / "missing.jpg")]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 1, run.stderr[-2000:]
    assert "no image could be predicted" in run.stderr
    lines = read_lines(tmp_path / "p.jsonl")
    assert [line["image_path"] for line in lines] == [str(files[6]), str(tmp_path / "missing.jpg")]
    assert "No such file" in lines[1]["error"]


# --- lines ----------------------------------------------------------------------------------------

def test_top_k_ranks_by_softmax_or_intensity_and_ties_keep_the_taxonomy_order():
    raw = np.zeros((2, E))
    raw[0, [5, 2, 30]] = 3.0         # a tie: taxonomy order 2, 5, 30
    raw[0, 7] = 4.0
    raw[1, 0] = np.nan
    means = np.zeros(E)
    means[7] = 2.0                   # intensity ranks 7 first, the mean-subtracted score last of the four
    scores = {"raw": raw, "intensity": raw}
    by_softmax, error = predict.records(["a.png", "b.png"], scores, means, top_k=4)
    assert [t["head"] for t in by_softmax["top_k"]] == [taxonomy.HEAD_NAMES[e] for e in (2, 5, 30, 7)]
    assert error == {"image_path": "b.png", "error": "the model gave non-finite scores"}
    by_intensity = predict.records(["a.png"], scores, means, top_k=4, rank_by="intensity")[0]
    assert [t["head"] for t in by_intensity["top_k"]] == [taxonomy.HEAD_NAMES[e] for e in (7, 2, 5, 30)]
    assert by_intensity["top_k"][0]["intensity"] == 4.0 and by_intensity["top_k"][0]["mean_subtracted"] == 2.0
