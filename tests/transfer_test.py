"""FERD / AffectNet transfer scoring: hand-computed cases, parsing, bad lines, the CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from emonet_jax import taxonomy
from emonet_jax.evaluate import transfer

E = taxonomy.NUM_EMOTIONS
EXTRAS = {"model_valence_best": 0.3, "model_arousal_best": -1.0,
          "model_dominance_best": 2.0, "model_emotional_vulnerability_best": 0.1}


def line(truth: dict, raised: dict | None = None, extras=True, **overrides) -> str:
    """A published-format line: every emotion head at mean_subtracted 0 except `raised`."""
    results = {h: {"raw": 1.0, "mean_subtracted": 0.0, "softmax": 1 / E} for h in taxonomy.HEAD_NAMES}
    for head, value in (raised or {}).items():
        results[head]["mean_subtracted"] = value
    if extras:
        results.update({h: {"raw": v, "mean_subtracted": v, "softmax": None} for h, v in EXTRAS.items()})
    results.update(overrides)
    return json.dumps({**truth, "results": results})


def write(tmp_path, lines, name="scores.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


# With 40 mapped heads the cutoff is 1.5/40 = 0.0375. One head at ln(a), 39 at 0, has
# probability a/(a+39): a=2 -> 2/41 = 0.0488 (above), a=1.5 -> 1.5/40.5 = 0.0370 (below).
LN2, LN15, LN4 = math.log(2), math.log(1.5), math.log(4)


def test_ferd_hand_computed(tmp_path):
    lines = [
        # happy via elation (FERD: happy) at 2/41 > 0.0375: right
        line({"image_path": "ferd_images/0000_Happy.jpg"}, {"model_elation_best": LN2}),
        # the same head at 1.5/40.5 < 0.0375: wrong
        line({"image_path": "ferd_images/0001_Happy.jpg"}, {"model_elation_best": LN15}),
        # FERD maps the fear head to surprise; two heads at ln 2 each have 2/42 > 0.0375: right
        line({"image_path": "ferd_images/0002_Surprised.jpg"},
             {"model_fear_best": LN2, "model_elation_best": LN2}),
        # fear's heads (distress, helplessness, astonishment, doubt) stay at 1/43: wrong
        line({"image_path": "ferd_images/0003_Fear.jpg"}, {"model_fear_best": LN4}),
        # distress maps to fear in FERD: right
        line({"image_path": "ferd_images/0004_Fear.jpg"}, {"model_distress_best": LN2}),
    ]
    result = transfer.evaluate_scores_file(write(tmp_path, lines), "ferd")
    acc = result["per_class_accuracy"]
    assert (acc["happy"], acc["surprise"], acc["fear"]) == (0.5, 1.0, 0.5)
    assert all(acc[c] is None for c in ("anger", "contempt", "disgust", "neutral", "sad"))
    assert result["mean_per_class_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert result["overall_accuracy"] == pytest.approx(3 / 5)
    assert result["n"] == 5 and result["n_correct"] == 3 and result["cutoff"] == 1.5 / 40
    assert result["n_classes_in_mean"] == 3
    assert result["skipped"] == {}
    # The four extra dimensions are ignored, and counted.
    assert result["ignored_extra_heads"] == {h: 5 for h in sorted(EXTRAS)}


def test_affectnet_hand_computed_with_label_ids(tmp_path):
    lines = [
        line({"label": 3}, {"model_fear_best": LN2}),                 # fear: AffectNet maps fear -> fear
        line({"label": 7}, {"model_astonishment_surprise_best": LN2}),  # surprise
        line({"label": 1}, {"model_teasing_best": LN15}),             # contempt, below the cutoff
        line({"label": 9}, {"model_fear_best": LN2}),                 # not one of the 8 ids
        line({"label": 4}, {"model_thankfulness_gratitude_best": LN2}),  # neutral in AffectNet: wrong for happy
    ]
    result = transfer.evaluate_scores_file(write(tmp_path, lines), "affectnet")
    acc = result["per_class_accuracy"]
    assert (acc["fear"], acc["surprise"], acc["contempt"], acc["happy"]) == (1.0, 1.0, 0.0, 0.0)
    assert result["mean_per_class_accuracy"] == pytest.approx(0.5)
    assert result["overall_accuracy"] == pytest.approx(2 / 4)
    assert result["skipped"]["unknown_class"]["lines"] == [4]
    assert "label 9" in result["skipped"]["unknown_class"]["details"][0]


def test_protocol_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    mapping = transfer.load_mapping("affectnet")
    scores = rng.normal(0, 1.5, size=(200, E))
    truth = rng.choice(transfer.CLASSES, size=200)
    got = transfer.correct(scores, truth, mapping)
    for i in range(200):
        p = np.exp(scores[i]) / np.exp(scores[i]).sum()
        expected = any(p[e] > 1.5 / 40 for e in range(E) if mapping.head_class[e] == truth[i])
        assert got[i] == expected
    assert 0 < got.mean() < 1


@pytest.mark.parametrize("name, cls", [
    ("ferd_images/0000_Happy.jpg", "happy"),
    ("0001_Surprised.jpg", "surprise"),
    ("0002_surprise.png", "surprise"),
    ("dir_x/a_b_SAD.JPG", "sad"),
    ("C:\\ferd\\0007_Contempt.jpg", "contempt"),
    ("0008_Neutral", "neutral"),
    ("noclass.jpg", None),
    ("0009_Calm.jpg", None),
])
def test_ferd_file_name_rule(name, cls):
    assert transfer.ferd_class(name) == cls


def test_affectnet_label_ids_and_class_names():
    mapping = transfer.load_mapping("affectnet")
    assert [mapping.affectnet_labels[i] for i in range(8)] == list(transfer.CLASSES)
    assert transfer.label_class("6", "affectnet", mapping) == "sad"
    assert transfer.label_class(0, "affectnet", mapping) == "anger"
    assert transfer.label_class("8", "affectnet", mapping) is None
    assert transfer.label_class("Surprised", "ferd", mapping) == "surprise"
    assert transfer.label_class("3", "ferd", mapping) is None      # FERD has no ids


def test_malformed_lines_are_reported_with_numbers(tmp_path):
    good = line({"image_path": "0000_Happy.jpg"}, {"model_elation_best": LN2})
    lines = [
        good,
        "{not json",
        json.dumps({"image_path": "0002_Sad.jpg"}),                              # no results
        line({"image_path": "0003_Sad.jpg"}, model_sadness_best={"raw": 1.0}),   # no mean_subtracted
        json.dumps({"image_path": "0004_Sad.jpg", "results": {"model_sadness_best": {"mean_subtracted": 1.0}}}),
        line({"image_path": "0005_Calm.jpg"}),                                   # unknown class
        line({}),                                                                # no image_path
        line({"image_path": "0000_Happy.jpg"}),                                  # duplicate
        "",
    ]
    path = write(tmp_path, lines)
    result = transfer.evaluate_scores_file(path, "ferd")
    lines_of = {r: v["lines"] for r, v in result["skipped"].items()}
    assert lines_of == {"bad_json": [2], "missing_results": [3], "bad_score": [4], "missing_heads": [5],
                        "unknown_class": [6], "missing_ground_truth": [7], "duplicate_image": [8],
                        "blank_line": [9]}
    assert result["n"] == 1 and result["overall_accuracy"] == 1.0 and result["n_lines"] == 9
    assert "'model_sadness_best' has no finite 'mean_subtracted'" in result["skipped"]["bad_score"]["details"][0]
    # --strict: the first bad line is an error naming it.
    with pytest.raises(transfer.TransferError, match=r"scores.jsonl:2: not JSON"):
        transfer.evaluate_scores_file(path, "ferd", strict=True)


def test_unknown_head_is_an_error_naming_line_and_key(tmp_path):
    lines = [line({"image_path": "0000_Happy.jpg"}),
             line({"image_path": "0001_Happy.jpg"}, model_joy_best={"mean_subtracted": 1.0})]
    with pytest.raises(transfer.TransferError, match=r"scores.jsonl:2: unknown head 'model_joy_best'"):
        transfer.evaluate_scores_file(write(tmp_path, lines), "ferd")


def test_class_without_mapped_head_is_reported_not_counted(tmp_path):
    ref = json.loads(transfer.MAPPINGS_FILE.read_text())
    ferd = {h: ("anger" if c == "contempt" else c) for h, c in ref["ferd"].items()}
    ferd["model_relief_best"] = None                                  # unmapped: out of the softmax
    mapping_file = tmp_path / "map.json"
    mapping_file.write_text(json.dumps({"ferd": ferd}))
    lines = [line({"image_path": "0_Contempt.jpg"}, {"model_contempt_best": 5.0}),
             line({"image_path": "1_Anger.jpg"}, {"model_contempt_best": LN2})]
    result = transfer.evaluate_scores_file(write(tmp_path, lines), "ferd", mapping_file)
    assert result["classes_without_mapped_head"] == ["contempt"]
    assert result["skipped"]["class_without_mapped_head"]["lines"] == [1]
    assert result["per_class_accuracy"]["contempt"] is None
    assert result["n_mapped_heads"] == 39 and result["unmapped_heads"] == ["model_relief_best"]
    # 39 heads: 2/(2+38) = 0.05 > 1.5/39 = 0.0385, and the contempt head now counts for anger.
    assert result["per_class_accuracy"]["anger"] == 1.0
    assert "No head maps to: contempt" in transfer.markdown_table(result)


def test_mapping_file_errors_name_the_key(tmp_path):
    ref = json.loads(transfer.MAPPINGS_FILE.read_text())
    bad = dict(ref["ferd"], model_anger_best="rage")
    (tmp_path / "a.json").write_text(json.dumps({"ferd": bad}))
    with pytest.raises(transfer.TransferError, match="key 'model_anger_best' maps to 'rage'"):
        transfer.load_mapping("ferd", tmp_path / "a.json")
    partial = {k: v for k, v in ref["ferd"].items() if k != "model_pain_best"}
    (tmp_path / "b.json").write_text(json.dumps(partial))             # a bare head map
    with pytest.raises(transfer.TransferError, match=r"heads \['model_pain_best'\] are missing"):
        transfer.load_mapping("ferd", tmp_path / "b.json")
    with pytest.raises(transfer.TransferError, match="no 'affectnet' head map"):
        transfer.load_mapping("affectnet", tmp_path / "a.json")


def test_packaged_mapping_equals_the_reference_file(reference_dir):
    ours = transfer.MAPPINGS_FILE.read_bytes()
    assert ours == (reference_dir / "transfer_mappings.json").read_bytes()
    data = json.loads(ours)
    for dataset in transfer.DATASETS:
        assert sorted(data[dataset]) == sorted(taxonomy.HEAD_NAMES)    # the taxonomy's head names
        assert transfer.load_mapping(dataset).classes_without_head() == []
    assert data["ferd"] != data["affectnet"]


def test_write_scores_jsonl_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(3, E))
    means = rng.normal(size=E)
    out = transfer.write_scores_jsonl(["a/0_Happy.png", "a/1_Sad.png", "a/2_Fear.png"], raw, means,
                                      tmp_path / "s.jsonl", labels=[4, 6, 3])
    records = [json.loads(t) for t in out.read_text().splitlines()]
    assert [r["label"] for r in records] == [4, 6, 3]
    first = records[0]["results"]
    assert list(first) == list(taxonomy.HEAD_NAMES)
    centred = np.array([first[h]["mean_subtracted"] for h in taxonomy.HEAD_NAMES])
    np.testing.assert_allclose(centred, raw[0] - means)
    probs = np.array([first[h]["softmax"] for h in taxonomy.HEAD_NAMES])
    np.testing.assert_allclose(probs, np.exp(centred) / np.exp(centred).sum())
    table = transfer.read_scores_jsonl(out, "ferd", transfer.load_mapping("ferd"))
    np.testing.assert_allclose(table.mean_subtracted, raw - means)
    assert table.truth == ["happy", "sad", "fear"]
    with pytest.raises(ValueError, match=r"reference_means \[40\]"):
        transfer.write_scores_jsonl(["x"], raw[:1], means[:5], tmp_path / "t.jsonl")


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_image_folder_layouts(tmp_path):
    mapping = transfer.load_mapping("affectnet")
    ferd = tmp_path / "ferd"
    for name in ("0000_Happy.jpg", "0001_Surprised.png", "0002_Calm.jpg", "notes.txt"):
        _touch(ferd / name)
    found = transfer.read_labeled_images(ferd, "ferd", mapping)
    assert found.classes == ["happy", "surprise"] and len(found.skipped) == 1

    folders = tmp_path / "folders"
    for rel in ("Surprised/a.jpg", "3/b.jpg", "3/c.PNG", "Junk/d.jpg", "stray.jpg"):
        _touch(folders / rel)
    found = transfer.read_labeled_images(folders, "affectnet", mapping)
    assert sorted(zip(found.classes, [p.rsplit("/", 1)[1] for p in found.paths])) == [
        ("fear", "b.jpg"), ("fear", "c.PNG"), ("surprise", "a.jpg")]
    assert len(found.skipped) == 2       # Junk/d.jpg and the stray image

    _touch(tmp_path / "imgs" / "x.jpg")
    _touch(tmp_path / "imgs" / "y.jpg")
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label\nimgs/x.jpg,4\nimgs/y.jpg,contempt\nimgs/z.jpg,4\nimgs/x.jpg,11\n")
    found = transfer.read_labeled_images(csv_file, "affectnet", mapping)
    assert found.classes == ["happy", "contempt"]
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in found.skipped] == ["4", "5"]
    (tmp_path / "bad.csv").write_text("file,class\n")
    with pytest.raises(transfer.TransferError, match="lack 'path' and 'label'"):
        transfer.read_labeled_images(tmp_path / "bad.csv", "affectnet", mapping)


def test_cli_end_to_end_writes_json_and_markdown(tmp_path, capsys):
    scores = write(tmp_path, [line({"image_path": "0000_Happy.jpg"}, {"model_elation_best": LN2}),
                              "oops",
                              line({"image_path": "0001_Anger.jpg"})])
    out = tmp_path / "out"
    assert transfer.main([f"--scores={scores}", "--dataset=ferd", f"--out={out}"]) == 0
    result = json.loads((out / "transfer.json").read_text())
    assert {"dataset", "n", "per_class_accuracy", "mean_per_class_accuracy", "overall_accuracy",
            "skipped"} <= set(result)
    assert result["per_class_accuracy"]["happy"] == 1.0 and result["per_class_accuracy"]["anger"] == 0.0
    assert result["skipped"]["bad_json"]["lines"] == [2]
    md = (out / "transfer.md").read_text()
    assert md.splitlines()[0].startswith("| Dataset | n | Anger | Contempt |")
    assert "| FERD | 2 | 0.0000 | – |" in md and "**0.5000**" in md
    assert "bad json: 1" in md
    with pytest.raises(SystemExit, match="scores.jsonl:2"):
        transfer.main([f"--scores={scores}", "--dataset=ferd", f"--out={out}", "--strict"])


def test_cli_runs_as_a_module(tmp_path):
    scores = write(tmp_path, [line({"label": 4}, {"model_elation_best": LN2})])
    proc = subprocess.run([sys.executable, "-m", "emonet_jax.evaluate.transfer", f"--scores={scores}",
                           "--dataset=affectnet", f"--out={tmp_path / 'o'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "transfer.md").is_file()


def test_cli_images_without_a_model_says_what_is_missing(tmp_path):
    _touch(tmp_path / "ferd" / "0000_Happy.jpg")
    args = [f"--images={tmp_path / 'ferd'}", "--dataset=ferd", f"--out={tmp_path / 'o'}"]
    with pytest.raises(SystemExit, match="--images needs --workdir"):
        transfer.main(args)
    with pytest.raises(SystemExit, match=r"config.json not found: is .* a training workdir"):
        transfer.main(args + [f"--workdir={tmp_path / 'w'}"])
    assert not (tmp_path / "o").exists()
