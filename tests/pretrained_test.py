"""Pretrained SigLIP / SigLIP2 towers: parity with transformers' outputs (stored fixtures, no torch
needed), big_vision .npz layouts, strictness, position-embedding resizing, EmotionModel init."""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emonet_jax import tree
from emonet_jax.models import emonet, pretrained
from emonet_jax.models.vit import ViT

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "siglip_tiny"
HF_FOLDERS = ("vision", "full", "siglip2_vision")
TOL = 1e-4  # relative: max |ours - transformers| / max |transformers|


def images(size: int = 32) -> np.ndarray:
    u8 = np.load(FIXTURES / "images.npz")[str(size)]
    return (u8.astype(np.float32) / np.float32(127.5) - np.float32(1)).astype(np.float32)


def expected(folder: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / folder / "expected.npz") as npz:
        return dict(npz)


def relative_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@functools.partial(jax.jit, static_argnums=0)
def apply(module, params, x):
    return module.apply({"params": params}, x)


def run(tower: pretrained.Tower, size: int = 32):
    return apply(tower.module(), tower.params, images(size))


def flat(params) -> dict[str, np.ndarray]:
    return {p: np.asarray(v) for p, v in tree.flatten(params).items()}


@pytest.fixture(scope="module")
def hf_tower() -> pretrained.Tower:
    return pretrained.load(FIXTURES / "vision")


# --- parity with transformers -------------------------------------------------------------------

@pytest.mark.parametrize("folder", HF_FOLDERS)
def test_huggingface_parity(folder):
    tower = pretrained.load(FIXTURES / folder)
    assert tower.config == dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, posemb="learn",
                                pool="map", scan=False)
    assert tower.image_size == (32, 32) and tower.source == "huggingface"
    pooled, extra = run(tower)
    ref = expected(folder)
    assert relative_error(pooled, ref["pooler_output"]) < TOL
    assert relative_error(extra["tokens"], ref["last_hidden_state"]) < TOL


@pytest.mark.parametrize("size", [24, 48])
def test_resized_position_embedding_matches_naflex(size):
    """Siglip2 NaFlex resizes its position grid per image (bilinear, antialiased): so does load()."""
    tower = pretrained.load(FIXTURES / "siglip2_vision", image_size=size)
    assert tower.image_size == (size, size)
    assert tower.params["pos_embedding"].shape == (1, (size // 8) ** 2, 32)
    pooled, _ = run(tower, size)
    assert relative_error(pooled, expected("siglip2_vision")[f"pooler_output_{size}"]) < TOL


def test_huggingface_checkpoint_file_and_prefixes(hf_tower):
    """The .safetensors file itself also works; the full model's text tower is ignored."""
    by_file = pretrained.load(FIXTURES / "vision" / "model.safetensors")
    assert flat(by_file.params).keys() == flat(hf_tower.params).keys()
    full = pretrained.load(FIXTURES / "full")
    assert not any("text" in p for p in flat(full.params))


# --- big_vision .npz ----------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["params/img", "img", ""])
@pytest.mark.parametrize("scan", [False, True])
def test_big_vision_npz_roundtrip_and_parity(tmp_path, hf_tower, prefix, scan):
    path = tmp_path / "siglip.npz"
    pretrained.save_big_vision(path, hf_tower.params, prefix=prefix, scan=scan)
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.keys())
    head = prefix + "/" if prefix else ""
    assert f"{head}embedding/kernel" in keys
    assert (f"{head}Transformer/encoderblock/LayerNorm_0/scale" in keys) == scan
    assert (f"{head}Transformer/encoderblock_1/LayerNorm_0/scale" in keys) == (not scan)
    tower = pretrained.load(path)
    assert tower.source == "big_vision"
    assert tower.config == hf_tower.config
    got, want = flat(tower.params), flat(hf_tower.params)
    assert got.keys() == want.keys()
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=p)
    pooled, _ = run(tower)
    assert relative_error(pooled, expected("vision")["pooler_output"]) < TOL


def test_big_vision_two_tower_checkpoint_ignores_the_text_tower(tmp_path, hf_tower):
    path = tmp_path / "two_towers.npz"
    arrays = {f"params/img/{p}": v for p, v in flat(hf_tower.params).items()}
    arrays.update({"params/txt/Embed_0/embedding": np.zeros((5, 4), np.float32), "params/t": np.ones(1),
                   "params/b": np.zeros(1)})
    np.savez(path, **arrays)
    assert flat(pretrained.load(path).params).keys() == flat(hf_tower.params).keys()


def test_scanned_layout_computes_the_same(hf_tower):
    scanned = pretrained.load(FIXTURES / "vision", scan=True)
    assert scanned.config["scan"] and scanned.module().scan
    params = flat(scanned.params)
    assert params["Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 32)
    assert not any("encoderblock_" in p for p in params)
    unscanned = flat(hf_tower.params)
    for p, v in pretrained.to_unscanned(params).items():
        np.testing.assert_array_equal(v, unscanned[p], err_msg=p)
    # the scanned module's own init has exactly these names and shapes
    init = jax.eval_shape(lambda: scanned.module().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert {p: x.shape for p, x in tree.flatten(init).items()} == {p: v.shape for p, v in params.items()}
    pooled, _ = run(scanned)
    assert relative_error(pooled, expected("vision")["pooler_output"]) < TOL


# --- strictness ---------------------------------------------------------------------------------

def test_missing_and_unexpected_are_listed_together(tmp_path, hf_tower):
    arrays = flat(hf_tower.params)
    del arrays["Transformer/encoderblock_1/LayerNorm_0/scale"]
    del arrays["MAPHead_0/LayerNorm_0/bias"]
    arrays["Transformer/encoderblock_0/Surprise/kernel"] = np.zeros(3, np.float32)
    arrays["head/kernel"] = np.zeros((32, 10), np.float32)
    path = tmp_path / "broken.npz"
    np.savez(path, **{f"params/img/{p}": v for p, v in arrays.items()})
    with pytest.raises(ValueError) as e:
        pretrained.load(path)
    message = str(e.value)
    assert str(path) in message
    for name in ("Transformer/encoderblock_1/LayerNorm_0/scale", "MAPHead_0/LayerNorm_0/bias",
                 "Transformer/encoderblock_0/Surprise/kernel", "head/kernel"):
        assert name in message
    assert "missing (2)" in message and "unexpected (2)" in message


def test_ignore_drops_named_parameters(tmp_path, hf_tower):
    arrays = {f"params/img/{p}": v for p, v in flat(hf_tower.params).items()}
    arrays["params/img/head/kernel"] = np.zeros((32, 10), np.float32)
    arrays["params/img/head/bias"] = np.zeros(10, np.float32)
    path = tmp_path / "classifier.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="head/kernel"):
        pretrained.load(path)
    assert "head" not in pretrained.load(path, ignore=["head/.*"]).params


def test_wrong_shape_is_named(tmp_path, hf_tower):
    arrays = flat(hf_tower.params)
    arrays["Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"] = np.zeros(31, np.float32)
    path = tmp_path / "shape.npz"
    pretrained.save_big_vision(path, tree.unflatten(arrays))
    with pytest.raises(ValueError, match=r"wrong shape \(1\): Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias: "
                                         r"checkpoint \(31,\) vs model \(32,\)"):
        pretrained.load(path)


def copy_hf(tmp_path, folder="vision") -> pathlib.Path:
    out = tmp_path / folder
    shutil.copytree(FIXTURES / folder, out)
    return out


def rewrite_safetensors(folder: pathlib.Path, edit) -> None:
    from safetensors.numpy import load_file, save_file
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"))


def test_sharded_huggingface_checkpoint(tmp_path, hf_tower):
    from safetensors.numpy import load_file, save_file
    folder = copy_hf(tmp_path, "full")
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    tower = pretrained.load(folder)
    pooled, _ = run(tower)
    assert relative_error(pooled, expected("full")["pooler_output"]) < TOL


def test_huggingface_strict_errors(tmp_path):
    folder = copy_hf(tmp_path, "full")

    def edit(w):
        del w["vision_model.encoder.layers.1.mlp.fc2.bias"]
        w["vision_model.encoder.layers.0.self_attn.rotary.weight"] = np.zeros(4, np.float32)
        w["vision_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
        w["text_model.anything"] = np.zeros(2, np.float32)  # the text tower is not ours to judge
    rewrite_safetensors(folder, edit)
    with pytest.raises(ValueError) as e:
        pretrained.load(folder)
    message = str(e.value)
    assert str(folder) in message
    assert "missing (1): Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias" in message
    assert "unexpected (1): vision_model.encoder.layers.0.self_attn.rotary.weight" in message
    assert "wrong shape (1): vision_model.encoder.layers.0.self_attn.q_proj.weight: shape (32, 16)" in message
    assert "text_model" not in message


def test_huggingface_config_checks(tmp_path):
    folder = copy_hf(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        pretrained.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "image_size": 64}))
    with pytest.raises(ValueError, match="image_size 64"):
        pretrained.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "image_size": 39}))  # 39 // 8 == 4: fine
    assert pretrained.load(folder).image_size == (32, 32)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="no config.json"):
        pretrained.load(folder)


def test_unrecognised_layouts_name_the_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, **{"opt/step": np.zeros(1), "weights/conv": np.zeros(3)})
    with pytest.raises(ValueError, match=f"{path}: unrecognised layout"):
        pretrained.load(path)
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    from safetensors.numpy import save_file
    save_file({"encoder.layer.0.weight": np.zeros(2, np.float32)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="model.safetensors: unrecognised layout"):
        pretrained.load(folder)
    with pytest.raises(ValueError, match="not a pretrained checkpoint"):
        pretrained.load(tmp_path / "weights.pt")


def test_pickled_npz_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"params/img/embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        pretrained.load(path)


def test_bfloat16_safetensors(tmp_path, hf_tower):
    """numpy has no bfloat16; such tensors are read from their byte ranges."""
    import ml_dtypes
    from safetensors.numpy import load_file
    folder = copy_hf(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    header, blobs, offset = {}, [], 0
    for name, w in sorted(weights.items()):
        blob = w.astype(ml_dtypes.bfloat16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(w.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    tower = pretrained.load(folder)
    want = flat(hf_tower.params)
    for p, v in flat(tower.params).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, want[p].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=p)


# --- position embedding -------------------------------------------------------------------------

def test_resize_posemb_shape_and_identity():
    posemb = np.random.default_rng(0).normal(size=(1, 16, 8)).astype(np.float32)
    assert pretrained.resize_posemb(posemb, 4) is posemb
    assert pretrained.resize_posemb(posemb, (6, 3)).shape == (1, 18, 8)
    # a constant grid stays constant, up- and downsampled
    constant = np.full((1, 16, 8), 0.25, np.float32)
    for grid in (2, 3, 7):
        np.testing.assert_allclose(pretrained.resize_posemb(constant, grid), 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="square grid"):
        pretrained.resize_posemb(np.zeros((1, 15, 8)), 4)


def test_load_at_the_same_size_changes_nothing(hf_tower):
    same = pretrained.load(FIXTURES / "vision", image_size=32)
    np.testing.assert_array_equal(same.params["pos_embedding"], hf_tower.params["pos_embedding"])
    # the patch conv is VALID: 36 px still makes a 4x4 grid (like 384 px at patch 14: 27x27)
    np.testing.assert_array_equal(pretrained.load(FIXTURES / "vision", image_size=36).params["pos_embedding"],
                                  hf_tower.params["pos_embedding"])
    with pytest.raises(ValueError, match="smaller than the patch size"):
        pretrained.load(FIXTURES / "vision", image_size=7)


# --- into an EmotionModel -----------------------------------------------------------------------

def emotion_params(size=32, **vit):
    """An EmotionModel and stand-in initial parameters (random numbers in the init's shapes: cheaper
    than compiling model.init, and all init_tower looks at)."""
    model = emonet.EmotionModel(img=ViT(**{**dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8), **vit}))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, size, size, 3))))["params"]
    rng = np.random.default_rng(0)
    return model, jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), shapes)


@pytest.mark.parametrize("scan", [False, True])
def test_init_tower_fills_img_and_keeps_heads(scan):
    model, params = emotion_params(scan=scan)
    new, loaded = pretrained.init_tower(params, FIXTURES / "full")
    before, after = flat(params), flat(new)
    assert after.keys() == before.keys()
    assert loaded == sorted(p for p in before if p.startswith("img/"))
    for p in before:
        if not p.startswith("img/"):
            np.testing.assert_array_equal(after[p], before[p], err_msg=p)
    tower = flat(pretrained.load(FIXTURES / "full", scan=scan).params)
    for p, v in tower.items():
        np.testing.assert_array_equal(after["img/" + p], v, err_msg=p)
    if not scan:  # end to end: the model's embedding is transformers' pooler_output
        out = apply(model, new, images())
        assert relative_error(out["embedding"], expected("full")["pooler_output"]) < TOL


def test_init_tower_resizes_position_embedding():
    _, params = emotion_params(size=48)
    new, _ = pretrained.init_tower(params, FIXTURES / "siglip2_vision")
    want = pretrained.load(FIXTURES / "siglip2_vision", image_size=48).params["pos_embedding"]
    np.testing.assert_array_equal(new["img"]["pos_embedding"], want)
    with pytest.raises(ValueError, match="pos_embedding: checkpoint"):
        pretrained.init_tower(params, FIXTURES / "siglip2_vision", resize=False)


def test_init_tower_is_strict():
    _, params = emotion_params(depth=3, num_heads=4)
    with pytest.raises(ValueError) as e:
        pretrained.init_tower(params, FIXTURES / "vision")
    message = str(e.value)
    assert "missing (" in message and "img/Transformer/encoderblock_2/LayerNorm_0/scale" in message
    assert "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel: checkpoint (32, 2, 16) " \
           "vs model (32, 4, 8)" in message
    _, gap = emotion_params(pool="gap")
    with pytest.raises(ValueError, match=r"unexpected \(\d+\): img/MAPHead_0/"):
        pretrained.init_tower(gap, FIXTURES / "vision")
    with pytest.raises(ValueError, match="no parameters under 'tower'"):
        pretrained.init_tower(params, FIXTURES / "vision", prefix="tower")
