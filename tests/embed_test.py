"""embed: pooled embeddings of an image folder and of a prepared split (the sharded cache),
equal to applying the tower directly; resume, refusal of another job's cache, the CLI."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from emonet_jax import embed
from emonet_jax.data import pipeline
from emonet_jax.models import pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "siglip_tiny"
BACKBONE = FIXTURES / "vision"
OTHER_BACKBONE = FIXTURES / "siglip2_vision"  # same shapes, other weights
SPLIT = "emonet_face_binary/64:train"
TOL = 1e-5


@pytest.fixture(scope="module")
def tower() -> pretrained.Tower:
    return pretrained.load(BACKBONE)


@pytest.fixture(scope="module")
def embedder(tower) -> embed.Embedder:
    return embed.Embedder(tower, batch_size=8)


@functools.partial(jax.jit, static_argnums=0)
def apply(module, params, x):
    return module.apply({"params": params}, x)


def direct(tower: pretrained.Tower, images) -> np.ndarray:
    """The reference: the tower applied to SigLIP-preprocessed images (whole image resized,
    bilinear, [-1, 1]) in one call, no batching or sharding."""
    size = tower.image_size[0]
    x = np.stack([pipeline.to_unit_range(pipeline.resize(im, size)) for im in images])
    pooled, _ = apply(tower.module(), tower.params, x)
    return np.asarray(pooled)


def read_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def mtimes(cache_dir: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(cache_dir.glob("shard-*.npz"))}


# --- a folder of images, through the command line -----------------------------------------------

def write_folder(root: pathlib.Path) -> tuple[list[str], list[str]]:
    """Images of several sizes and modes in nested folders, plus two files that are not images.
    Returns (readable relative paths, unreadable ones), each sorted."""
    rng = np.random.default_rng(0)
    (root / "b" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), np.uint8), "RGBA").save(root / "b" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (24, 20), np.uint8), "L").save(root / "b" / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(root / "b" / "deeper" / "c.png")
    Image.fromarray(rng.integers(0, 256, (33, 33, 3), np.uint8)).save(root / "z.jpeg")
    (root / "notes.txt").write_text("not an image\n")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return (["a.png", "b/deeper/c.png", "b/gray.jpg", "b/rgba.png", "z.jpeg"], ["b/broken.png", "notes.txt"])


def test_folder_cli_embeds_readable_images_and_reports_the_rest(tmp_path, tower):
    images_dir, out = tmp_path / "images", tmp_path / "out" / "emb.npz"
    readable, unreadable = write_folder(images_dir)
    result = subprocess.run(
        [sys.executable, "-m", "emonet_jax.embed", f"--backbone={BACKBONE}", f"--images={images_dir}",
         f"--out={out}", "--batch=4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5 images embedded, 2 skipped" in result.stdout
    for name in unreadable:
        assert f"skipped {images_dir / name}: cannot read image" in result.stderr
    with np.load(out, allow_pickle=False) as npz:
        got = dict(npz)
    assert got["paths"].tolist() == readable and got["skipped"].tolist() == unreadable
    assert got["paths"].dtype.kind == "U" and got["embeddings"].dtype == np.float32
    reference = direct(tower, [read_rgb(images_dir / p) for p in readable])
    np.testing.assert_allclose(got["embeddings"], reference, atol=TOL, rtol=0)
    assert int(got["image_size"]) == 32
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.npz"]  # no temporary file left


def test_folder_without_any_image_is_an_error(tmp_path, embedder):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    with pytest.raises(embed.EmbedError, match="none of the 1 files is a readable image"):
        embed.embed_folder(embedder, tmp_path / "in", tmp_path / "out.npz", threads=1)
    assert not (tmp_path / "out.npz").exists()


# --- the Python API -----------------------------------------------------------------------------

def test_embedder_resizes_pads_and_matches_the_tower(tower, embedder):
    images = np.load(FIXTURES / "images.npz")["48"]               # 4 images, not at the tower's 32 px
    images = np.concatenate([images, images[::-1], images[:3]])   # 11: one full batch of 8 and a padded one
    assert embedder.batch_size == 8 and embedder.image_size == 32 and embedder.dim == 32
    np.testing.assert_allclose(embedder.embed(images), direct(tower, images), atol=TOL, rtol=0)
    assert embedder.embed(images[:0]).shape == (0, 32)
    with pytest.raises(embed.EmbedError, match="expected uint8 images"):
        embedder.embed(images.astype(np.float32))


def test_batch_size_is_rounded_up_to_the_devices(tower):
    assert embed.Embedder(tower, batch_size=3).batch_size == len(jax.devices())


def test_resolution_comes_from_the_huggingface_config_when_it_fits_the_grid(tmp_path):
    """A 36 px config with an 8 px patch (like So400m/14 at 384 px) has a 4x4 grid: fed 36 px images."""
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(BACKBONE / "model.safetensors")
    (folder / "config.json").write_text((BACKBONE / "config.json").read_text().replace(
        '"image_size": 32', '"image_size": 36'))
    tower = pretrained.load(folder)
    assert tower.image_size == (32, 32) and embed.checkpoint_resolution(tower) == 36


def _hf_folder(tmp_path, preprocessor: dict | None) -> pathlib.Path:
    """The fixture tower as a Hugging Face folder, with this preprocessor_config.json (or none)."""
    folder = tmp_path / "hf"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        (folder / name).symlink_to(BACKBONE / name)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


SIGLIP_PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "resample": 3,
                       "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                       "size": {"height": 32, "width": 32}}


def test_the_resize_filter_is_the_preprocessor_configs(tmp_path, tower):
    """SigLIP's preprocessor_config.json says resample 3 (PIL bicubic): embed resizes with it,
    which is not what a bilinear resize gives; without the file, bilinear."""
    images = np.load(FIXTURES / "images.npz")["48"]
    bicubic = embed.Embedder(_hf_folder(tmp_path, SIGLIP_PREPROCESSOR), batch_size=8)
    assert bicubic.resample == "bicubic" and bicubic.describe()["resample"] == "bicubic"
    x = np.stack([pipeline.to_unit_range(np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)))
                  for im in images])
    want = np.asarray(apply(tower.module(), tower.params, x)[0])
    got = bicubic.embed(images)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.abs(got - direct(tower, images)).max() > 100 * TOL  # the filter matters
    assert embed.Embedder(BACKBONE, batch_size=8).resample == "bilinear"  # the fixture has no such file
    assert embed.Embedder(_hf_folder(tmp_path / "o", SIGLIP_PREPROCESSOR), batch_size=8,
                          resample="bilinear").resample == "bilinear"


@pytest.mark.parametrize("change, message", [
    ({"image_mean": [0.485, 0.456, 0.406]}, r"image_mean \[0.485, 0.456, 0.406\] is not SigLIP's"),
    ({"resample": 7}, "resample 7 is not one of PIL's filters"),
])
def test_a_preprocessor_config_embed_cannot_follow_is_an_error(tmp_path, change, message):
    folder = _hf_folder(tmp_path, {**SIGLIP_PREPROCESSOR, **change})
    with pytest.raises(embed.EmbedError, match=f"{folder / 'preprocessor_config.json'}: {message}"):
        embed.Embedder(folder, batch_size=8)


# --- a split into the sharded cache -------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(synthetic_records):
    return synthetic_records["data_dir"]


@pytest.fixture(scope="module")
def source(data_dir):
    return pipeline.open_split(*SPLIT.split(":"), data_dir)


def test_split_cache_holds_every_row_with_its_labels(tmp_path, data_dir, source, tower, embedder):
    cache = tmp_path / "cache"
    result = embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16, threads=2)
    n = len(source)
    shards = -(-n // 16)
    assert n > 32 and result["shards_written"] == list(range(shards))
    meta = embed.cache_meta(cache)
    assert meta["num_rows"] == n and meta["num_shards"] == shards and meta["dim"] == 32
    assert meta["split"] == SPLIT and meta["image_size"] == 32 and meta["backbone_config"] == tower.config
    assert meta["fields"] == sorted(pipeline.LABEL_FIELDS)  # every numeric feature of the builder
    assert sorted(p.name for p in cache.iterdir()) == ["meta.json"] + [
        f"shard-{i:05d}-of-{shards:05d}.npz" for i in range(shards)]

    got = embed.load_cache(cache)
    records = [source[i] for i in range(n)]
    np.testing.assert_array_equal(got["row"], np.arange(n))
    assert got["row"].dtype == np.int64 and got["image_id"].dtype.kind == "U"
    assert got["image_id"].tolist() == [pipeline.as_text(r["image_id"]) for r in records]
    for field in meta["fields"]:
        expected = np.stack([r[field] for r in records])
        assert got[field].dtype == expected.dtype, field
        np.testing.assert_array_equal(got[field], expected, err_msg=field)
    assert got["soft_label"].shape == (n, 40, 8)
    reference = direct(tower, [r["image"] for r in records])
    np.testing.assert_allclose(got["embeddings"], reference, atol=TOL, rtol=0)


def test_resume_rewrites_only_the_missing_shard(tmp_path, data_dir, embedder):
    cache = tmp_path / "cache"
    embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16, threads=2)
    before = embed.load_cache(cache)
    times = mtimes(cache)
    missing = sorted(times)[1]
    (cache / missing).unlink()
    with pytest.raises(embed.EmbedError, match=f"1 of {len(times)} shards missing: {missing}"):
        embed.load_cache(cache)

    # through the command line, as a user resumes
    assert embed.main([f"--backbone={BACKBONE}", f"--split={SPLIT}", f"--data_dir={data_dir}", f"--out={cache}",
                       "--shard_size=16", "--batch=8", "--threads=2"]) == 0
    after = mtimes(cache)
    assert set(after) == set(times)
    assert {k for k in times if after[k] != times[k]} == {missing}
    for key, value in embed.load_cache(cache).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)

    # nothing left to do: nothing written
    assert embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16)["shards_written"] == []
    assert mtimes(cache) == after

    # a cache written before meta.json recorded the resize filter was resized bilinearly: it matches
    meta = json.loads((cache / "meta.json").read_text())
    assert meta.pop("resample") == "bilinear"
    (cache / "meta.json").write_text(json.dumps(meta))
    assert embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16)["shards_written"] == []


def test_a_corrupt_shard_is_named_and_rewritten(tmp_path, data_dir, embedder):
    cache = tmp_path / "cache"
    embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16, threads=2)
    before = embed.load_cache(cache)
    last = sorted(mtimes(cache))[-1]
    (cache / last).write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(embed.EmbedError, match=f"{last}: corrupt shard"):
        embed.load_cache(cache)
    assert embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16)["shards_written"] == [
        len(mtimes(cache)) - 1]
    np.testing.assert_array_equal(embed.load_cache(cache)["embeddings"], before["embeddings"])


def test_another_backbone_split_or_shard_size_is_refused(tmp_path, data_dir, embedder):
    cache = tmp_path / "cache"
    embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=16, threads=2)
    times, meta = mtimes(cache), (cache / "meta.json").read_text()
    other = embed.Embedder(OTHER_BACKBONE, batch_size=8)
    with pytest.raises(embed.EmbedError, match="refusing to mix(.|\n)*backbone_fingerprint"):
        embed.embed_split(other, SPLIT, data_dir, cache, shard_size=16)
    with pytest.raises(embed.EmbedError, match="refusing to mix(.|\n)*split: cache 'emonet_face_binary/64:train'"):
        embed.embed_split(embedder, "emonet_face_binary/64:validation", data_dir, cache, shard_size=16)
    with pytest.raises(embed.EmbedError, match="refusing to mix(.|\n)*shard_size: cache 16, this run 8"):
        embed.embed_split(embedder, SPLIT, data_dir, cache, shard_size=8)
    assert mtimes(cache) == times and (cache / "meta.json").read_text() == meta


def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def savez_then_interrupted(f, **arrays):
        f.write(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed._save_npz(tmp_path / "shard.npz", {"row": np.arange(3)})
    assert os.listdir(tmp_path) == []


def test_bad_split_names_are_explained():
    assert embed.parse_split("emonet_face_hq/224:test") == ("emonet_face_hq/224", "test")
    with pytest.raises(embed.EmbedError, match="expected NAME/RESOLUTION:SPLIT"):
        embed.parse_split("emonet_face_hq/224")
