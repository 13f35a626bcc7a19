"""Pretrained SigLIP / SigLIP2 image towers for `emonet_jax.models.vit.ViT`.

Two checkpoint formats are read:

- big_vision `.npz` (what SigLIP and SigLIP2 are published as): '/'-joined parameter paths,
  the image tower under `params/img/`, `img/`, `params/` or bare, blocks either scanned
  (`Transformer/encoderblock/...` with a leading depth axis) or not
  (`Transformer/encoderblock_{i}/...`). Read with `np.load(..., allow_pickle=False)`.
- Hugging Face: a folder with `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`) holding a `SiglipModel` / `Siglip2Model` (image tower under
  `vision_model.`, `vision_config` in config.json; the text tower is ignored) or a bare
  `SiglipVisionModel` / `Siglip2VisionModel`. Fixed-resolution SigLIP2 checkpoints are
  `SiglipModel`s; NaFlex ones (`Siglip2*`, a linear patch embedding on flattened patches) load
  as a conv embedding, so they run on fixed-size images. Read with the `safetensors` numpy API
  (bfloat16 tensors, which numpy cannot hold, are read from the file's byte ranges via
  `ml_dtypes`); torch is not needed.

API:

    tower = load(path, image_size=None, scan=False, ignore=())
    tower.config        ViT keyword arguments inferred from the checkpoint (width, depth,
                        mlp_dim, num_heads, patch_size, posemb, pool, scan)
    tower.params        the ViT's parameter tree (nested dicts of float32 numpy arrays)
    tower.image_size    (height, width) in pixels that the position grid covers: grid * patch
                        (a 384 px So400m/14 has a 27x27 grid, 378 px; its VALID patch
                        conv drops the remainder, so 384 px images work unchanged)
    tower.module(**kw)  ViT(**tower.config, **kw), e.g. module(dtype=jnp.bfloat16)

    params, loaded = init_tower(params, path, prefix="img")   # into an EmotionModel's tree
    save_big_vision(path, tower.params, prefix="params/img", scan=False)  # and back to .npz
    resize_posemb(posemb, (h, w))                                     # bilinear on the grid

Loading is strict: missing names, unexpected names and wrong shapes are listed together in
one error naming the file, and nothing half-loaded is ever returned. `ignore` takes regexes
(matched against the whole checkpoint-side name, after the tower prefix) for parameters to
drop, e.g. a big_vision classifier's `head/.*`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emonet_jax import tree
from emonet_jax.models.vit import ViT

# What flax's ViT computes: nn.gelu's tanh approximation and LayerNorm's epsilon.
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new")
_LAYER_NORM_EPS = 1e-6
# transformers' config defaults (SiglipVisionConfig / Siglip2VisionConfig), for keys a config.json omits.
_HF_DEFAULTS = dict(num_attention_heads=12, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                    num_channels=3, vision_use_head=True)
_BIG_VISION_PREFIXES = ("params/img/", "img/", "params/", "")


@dataclasses.dataclass(frozen=True)
class Tower:
    """A loaded image tower: ViT kwargs, its parameter tree and where it came from."""
    config: dict[str, Any]
    params: dict[str, Any]
    image_size: tuple[int, int]
    source: str       # 'big_vision' or 'huggingface'
    path: str

    def module(self, **overrides) -> ViT:
        return ViT(**{**self.config, **overrides})


# --- public API ---------------------------------------------------------------------------------

def load(path, *, image_size: int | Sequence[int] | None = None, scan: bool = False,
         ignore: Sequence[str] = ()) -> Tower:
    """Reads a big_vision .npz or Hugging Face SigLIP checkpoint into our ViT's layout.

    `image_size` (int or (h, w)) resizes the learned position embedding (bilinear on its grid,
    see `resize_posemb`) for another resolution; None keeps the checkpoint's. `scan` picks the
    scanned (`Transformer/encoderblock/...`, leading depth axis) or unscanned layout.
    """
    path = pathlib.Path(path).expanduser()
    return _finish(path, *_read(path, ignore), image_size, scan)


def init_tower(params: Any, path, *, prefix: str = "img", ignore: Sequence[str] = (),
               resize: bool = True) -> tuple[Any, list[str]]:
    """`params` (e.g. an initialised EmotionModel's) with its `prefix` subtree from a checkpoint.

    Every parameter under `prefix/` must come from the checkpoint with the same shape, and the
    checkpoint's tower must have nothing more (all mismatches listed in one error); the other
    parameters (the fresh task heads) are kept. The layout (scanned or not) follows `params`;
    with `resize` the position embedding is resized to the model's grid when they differ.
    Returns (new params, sorted loaded paths). Leaves come back as numpy arrays in the
    target's dtypes.
    """
    wanted = tree.flatten(params)
    head = prefix.rstrip("/") + "/"
    target = {p[len(head):]: v for p, v in wanted.items() if p.startswith(head)}
    if not target:
        raise ValueError(f"no parameters under {prefix!r} in the target tree (top level: "
                         f"{sorted({p.split('/')[0] for p in wanted})})")
    scan = any(p.startswith("Transformer/encoderblock/") for p in target)
    image_size = None  # the model's grid side, in patches
    if resize and "pos_embedding" in target:
        n = np.shape(target["pos_embedding"])[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{head}pos_embedding has {n} positions, not a square grid; load it with "
                             "load(path, image_size=(h, w)) and place it yourself")
        image_size = side
    path = pathlib.Path(path).expanduser()
    read = _read(path, ignore)
    config = read[1]
    image_size = image_size * config["patch_size"] if image_size is not None and config["posemb"] == "learn" else None
    got = tree.flatten(_finish(path, *read, image_size, scan).params)
    missing = sorted(p for p in target if p not in got)
    unexpected = sorted(p for p in got if p not in target)
    shape = sorted(f"{head}{p}: checkpoint {np.shape(got[p])} vs model {tuple(np.shape(v))}"
                   for p, v in target.items() if p in got and np.shape(got[p]) != tuple(np.shape(v)))
    if missing or unexpected or shape:
        raise ValueError(_mismatch_message(f"cannot initialise {head} from {path}", [head + p for p in missing],
                                           [head + p for p in unexpected], shape))
    loaded = {head + p: np.asarray(got[p], dtype=np.dtype(getattr(v, "dtype", np.float32)))
              for p, v in target.items()}
    merged = {p: loaded.get(p, v) for p, v in wanted.items()}
    return jax.tree.map(lambda _, x: x, params, tree.unflatten(merged)), sorted(loaded)


def resize_posemb(posemb, grid: int | Sequence[int]) -> np.ndarray:
    """[1, N, D] learned position embedding on a square grid -> [1, h*w, D], bilinear.

    Half-pixel centres (like torch's align_corners=False and Siglip2's NaFlex resizing),
    antialiased when shrinking; returns the input unchanged when the grid is the same.
    """
    posemb = np.asarray(posemb)
    h, w = _pair(grid)
    side = math.isqrt(posemb.shape[1]) if posemb.ndim == 3 else -1
    if posemb.ndim != 3 or posemb.shape[0] != 1 or side * side != posemb.shape[1]:
        raise ValueError(f"expected a [1, N, D] position embedding on a square grid, got {posemb.shape}")
    if (h, w) == (side, side):
        return posemb
    dim = posemb.shape[2]
    with jax.default_device(_host_device()):
        resized = jax.image.resize(jnp.asarray(posemb.reshape(side, side, dim), jnp.float32), (h, w, dim),
                                   method="bilinear")
    return np.asarray(resized).reshape(1, h * w, dim).astype(posemb.dtype)


def to_scanned(flat: dict[str, Any]) -> dict[str, Any]:
    """Unscanned 'Transformer/encoderblock_{i}/...' paths -> one stacked 'Transformer/encoderblock/...'."""
    blocks: dict[str, dict[int, Any]] = {}
    out = {}
    for p, v in flat.items():
        m = re.match(r"^(.*Transformer/)encoderblock_(\d+)/(.*)$", p)
        if m:
            blocks.setdefault(f"{m[1]}encoderblock/{m[3]}", {})[int(m[2])] = v
        else:
            out[p] = v
    for p, by_depth in blocks.items():
        if sorted(by_depth) != list(range(len(by_depth))):
            raise ValueError(f"encoder blocks of {p} are not numbered 0..{len(by_depth) - 1}: {sorted(by_depth)}")
        out[p] = np.stack([np.asarray(by_depth[i]) for i in range(len(by_depth))])
    return out


def to_unscanned(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `to_scanned`."""
    out = {}
    for p, v in flat.items():
        m = re.match(r"^(.*Transformer/)encoderblock/(.*)$", p)
        if m:
            for i, leaf in enumerate(np.asarray(v)):
                out[f"{m[1]}encoderblock_{i}/{m[2]}"] = leaf
        else:
            out[p] = v
    return out


def save_big_vision(path, params: Any, *, prefix: str = "params/img", scan: bool | None = None) -> None:
    """Writes a ViT parameter tree as a big_vision-style .npz ('/'-joined keys under `prefix`).

    `scan` None keeps the tree's layout; True/False converts.
    """
    flat = {p: np.asarray(v) for p, v in tree.flatten(params).items()}
    if scan is True:
        flat = to_scanned(to_unscanned(flat))
    elif scan is False:
        flat = to_unscanned(flat)
    head = prefix.strip("/") + "/" if prefix.strip("/") else ""
    np.savez(pathlib.Path(path), **{head + p: v for p, v in flat.items()})


def _read(path: pathlib.Path, ignore: Sequence[str]):
    """(unscanned flat tree, inferred ViT kwargs, source, problems); names and shapes not checked yet.

    problems: (checkpoint names the reader could not place, their shape errors, our names those
    were for), for `_check_against_model`.
    """
    ignore_patterns = tree.compile_patterns(ignore, "ignore")
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        return _read_huggingface(path, ignore_patterns)
    if path.suffix == ".npz":
        return _read_big_vision(path, ignore_patterns)
    raise ValueError(f"{path}: not a pretrained checkpoint this loader knows: expected a big_vision .npz, "
                     "or a Hugging Face folder with config.json and model.safetensors")


def _finish(path, flat, config, source, problems, image_size, scan) -> Tower:
    """Resize the position embedding, check every name and shape, lay the blocks out."""
    grid = _posemb_grid(flat, path)
    if image_size is not None:
        size = _pair(image_size)
        # the patch embedding is a VALID conv: a remainder is dropped (So400m/14 at 384 px: 27x27)
        new_grid = (size[0] // config["patch_size"], size[1] // config["patch_size"])
        if min(new_grid) < 1:
            raise ValueError(f"image_size {size} is smaller than the patch size {config['patch_size']} of {path}")
        if "pos_embedding" in flat:
            flat["pos_embedding"] = resize_posemb(flat["pos_embedding"], new_grid)
        grid = new_grid
    elif grid is None:
        raise ValueError(f"{path} has no learned position embedding (posemb='sincos2d'); pass image_size")
    _check_against_model(flat, config, grid, path, *problems)
    if scan:
        flat = to_scanned(flat)
    return Tower(config={**config, "scan": scan}, params=tree.unflatten(flat),
                 image_size=(grid[0] * config["patch_size"], grid[1] * config["patch_size"]),
                 source=source, path=str(path))


# --- big_vision .npz ----------------------------------------------------------------------------

def _read_big_vision(path: pathlib.Path, ignore: Sequence[re.Pattern]):
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        prefix = next((p for p in _BIG_VISION_PREFIXES if p + "embedding/kernel" in keys), None)
        if prefix is None:
            raise ValueError(f"{path}: unrecognised layout: no image tower ('embedding/kernel' under "
                             f"{', '.join(repr(p) for p in _BIG_VISION_PREFIXES[:-1])} or at the top level); "
                             f"first keys: {sorted(keys)[:8]}")
        flat = {k[len(prefix):]: np.asarray(npz[k]) for k in keys
                if k.startswith(prefix) and not tree.matches_any(k[len(prefix):], ignore)}
    scanned = [p for p in flat if re.search(r"(^|/)Transformer/encoderblock/", p)]
    looped = [p for p in flat if re.search(r"(^|/)Transformer/encoderblock_\d+/", p)]
    if scanned and looped:
        raise ValueError(f"{path}: unrecognised layout: both scanned (Transformer/encoderblock/) and unscanned "
                         "(Transformer/encoderblock_N/) blocks")
    if scanned:
        flat = to_unscanned(flat)
    flat = {p: v.astype(np.float32) for p, v in flat.items()}
    return flat, _infer_big_vision_config(flat, path), "big_vision", ([], [], [])


def _infer_big_vision_config(flat: dict[str, np.ndarray], path) -> dict[str, Any]:
    def need(pattern: str) -> np.ndarray:
        """The first parameter whose name matches (any block will do for the sizes)."""
        for p in sorted(flat):
            if re.fullmatch(pattern, p):
                return flat[p]
        raise ValueError(f"{path}: unrecognised layout: no {pattern!r} in the image tower "
                         f"(its names: {sorted(flat)[:12]}...)")

    kernel = need("embedding/kernel")
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != 3:
        raise ValueError(f"{path}: embedding/kernel has shape {kernel.shape}, expected [p, p, 3, width]")
    depth = len({m[1] for p in flat for m in [re.match(r"^Transformer/encoderblock_(\d+)/", p)] if m})
    block = r"Transformer/encoderblock_\d+/"
    return dict(width=int(kernel.shape[3]), depth=depth,
                mlp_dim=int(need(block + "MlpBlock_0/Dense_0/kernel").shape[1]),
                num_heads=int(need(block + "MultiHeadDotProductAttention_0/query/kernel").shape[1]),
                patch_size=int(kernel.shape[0]), posemb="learn" if "pos_embedding" in flat else "sincos2d",
                pool="map" if "MAPHead_0/probe" in flat else "tok" if "cls" in flat else "gap")


# --- Hugging Face -------------------------------------------------------------------------------

def huggingface_folder(path) -> pathlib.Path:
    """The folder of a Hugging Face checkpoint given as its folder or one of its .safetensors files
    (where config.json and preprocessor_config.json are)."""
    path = pathlib.Path(path)
    return path if path.is_dir() else path.parent


def _read_huggingface(path: pathlib.Path, ignore: Sequence[re.Pattern]):
    folder = huggingface_folder(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json (a Hugging Face checkpoint is a folder with config.json "
                         "and model.safetensors)")
    config = json.loads(config_path.read_text())
    if path.suffix == ".safetensors":
        files = [path]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                         "(only safetensors weights are read, not pytorch_model.bin)")
    names = {f: _safetensors_names(f) for f in files}
    where = ", ".join(str(f) for f in files)
    ends = [k for ks in names.values() for k in ks if k.endswith("embeddings.patch_embedding.weight")]
    if len(ends) != 1:
        raise ValueError(f"{where}: unrecognised layout: expected one image tower "
                         f"('[vision_model.]embeddings.patch_embedding.weight'), found {ends or 'none'}")
    prefix = ends[0][: -len("embeddings.patch_embedding.weight")]
    tower = {}  # read only the image tower (a SiglipModel's text tower can be as big)
    for f, ks in names.items():
        wanted = [k for k in ks if k.startswith(prefix) and not tree.matches_any(k[len(prefix):], ignore)]
        tower.update({k[len(prefix):]: v for k, v in _read_safetensors(f, wanted).items()})

    vision = config.get("vision_config", config) or {}
    settings = {k: vision.get(k, d) for k, d in _HF_DEFAULTS.items()}
    if settings["hidden_act"] not in _TANH_GELU:
        raise ValueError(f"{config_path}: hidden_act {settings['hidden_act']!r}; our ViT computes the tanh "
                         f"approximation of gelu ({' / '.join(_TANH_GELU)})")
    if not math.isclose(float(settings["layer_norm_eps"]), _LAYER_NORM_EPS):
        raise ValueError(f"{config_path}: layer_norm_eps {settings['layer_norm_eps']}; our ViT uses {_LAYER_NORM_EPS}")
    if settings["num_channels"] != 3:
        raise ValueError(f"{config_path}: num_channels {settings['num_channels']}; our ViT takes RGB images")

    patch_weight = tower["embeddings.patch_embedding.weight"]
    width = int(patch_weight.shape[0])
    heads = int(settings["num_attention_heads"])
    if width % heads:
        raise ValueError(f"{config_path}: hidden size {width} is not divisible by num_attention_heads {heads}")
    patch = int(patch_weight.shape[2]) if patch_weight.ndim == 4 else int(settings["patch_size"])
    flat, unexpected, bad_shape, covered = _convert_huggingface(tower, width, heads, patch)
    depth = len({m[1] for k in tower for m in [re.match(r"^encoder\.layers\.(\d+)\.", k)] if m})
    fc1 = [k for k in sorted(tower) if re.fullmatch(r"(encoder\.layers\.\d+|head)\.mlp\.fc1\.weight", k)]
    if not fc1:
        raise ValueError(f"{where}: unrecognised layout: no '{prefix}encoder.layers.N.mlp.fc1.weight'")
    out = dict(width=width, depth=depth, mlp_dim=int(tower[fc1[0]].shape[0]), num_heads=heads, patch_size=patch,
               posemb="learn", pool="map" if "head.probe" in tower else "gap")
    if "image_size" in vision and "pos_embedding" in flat:
        grid = _posemb_grid(flat, where)
        if grid is not None and grid[0] != int(vision["image_size"]) // patch:
            raise ValueError(f"{config_path}: image_size {vision['image_size']} does not match the "
                             f"{grid[0]}x{grid[1]} position grid of patch {patch}")
    return flat, out, "huggingface", ([prefix + k for k in unexpected], [prefix + e for e in bad_shape], covered)


def _safetensors_names(path: pathlib.Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return list(f.keys())


def _read_safetensors(path: pathlib.Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Those tensors of one file, floats as float32."""
    from safetensors import safe_open

    out, bf16 = {}, []
    with safe_open(str(path), framework="np") as f:
        for key in keys:
            dtype = f.get_slice(key).get_dtype()
            if dtype == "BF16":
                bf16.append(key)
            elif dtype in ("F32", "F16", "F64"):
                out[key] = f.get_tensor(key).astype(np.float32)
            else:
                out[key] = f.get_tensor(key)
    if bf16:  # numpy has no bfloat16: read those byte ranges as ml_dtypes.bfloat16
        import ml_dtypes

        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for key in bf16:
            start, end = header[key]["data_offsets"]
            data = raw[8 + header_len + start:8 + header_len + end].view(ml_dtypes.bfloat16)
            out[key] = data.reshape(header[key]["shape"]).astype(np.float32)
        del raw
    return out


def _convert_huggingface(tower: dict[str, np.ndarray], width: int, heads: int, patch: int):
    """HF names/layouts -> our unscanned flat tree.

    Returns (flat, unexpected HF names, shape errors, our names whose HF tensor had a wrong shape).
    """
    hd = width // heads
    flat: dict[str, np.ndarray] = {}
    unexpected, bad_shape, covered = [], [], []

    def linear(w):          # torch Linear weight [out, in] -> kernel [in, out]
        return np.ascontiguousarray(w.T)

    def qkv_kernel(w):      # [H*hd, D] -> [D, H, hd]
        return np.ascontiguousarray(w.T.reshape(width, heads, hd))

    def out_kernel(w):      # [D, H*hd] -> [H, hd, D]
        return np.ascontiguousarray(w.T.reshape(heads, hd, width))

    def patch_kernel(w):
        if w.ndim == 4:     # Conv2d [D, C, p, p] -> [p, p, C, D]
            return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        # Siglip2 NaFlex Linear on patches flattened as (p, p, C): [D, p*p*C] -> [p, p, C, D]
        return np.ascontiguousarray(w.reshape(width, patch, patch, 3).transpose(1, 2, 3, 0))

    def expect(shape):
        return lambda name, w: None if tuple(w.shape) == shape else f"{name}: shape {tuple(w.shape)}, expected {shape}"

    attn = "MultiHeadDotProductAttention_0/"
    renames = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
    # (regex on the HF name, {our name template: converter}, shape check)
    rules: list[tuple[str, dict[str, Callable], Callable | None]] = [
        (r"embeddings\.patch_embedding\.weight", {"embedding/kernel": patch_kernel},
         lambda n, w: None if (w.ndim == 4 and w.shape[1:] == (3, patch, patch)) or
         (w.ndim == 2 and w.shape[1] == 3 * patch * patch) else
         f"{n}: shape {tuple(w.shape)}, expected [{width}, 3, {patch}, {patch}] or [{width}, {3 * patch * patch}]"),
        (r"embeddings\.patch_embedding\.bias", {"embedding/bias": np.asarray}, expect((width,))),
        (r"embeddings\.position_embedding\.weight", {"pos_embedding": lambda w: w[None]}, None),
        (r"post_layernorm\.weight", {"Transformer/encoder_norm/scale": np.asarray}, expect((width,))),
        (r"post_layernorm\.bias", {"Transformer/encoder_norm/bias": np.asarray}, expect((width,))),
        (r"head\.probe", {"MAPHead_0/probe": np.asarray}, expect((1, 1, width))),
        (r"head\.attention\.in_proj_weight",
         {f"MAPHead_0/{attn}{n}/kernel": (lambda w, i=i: qkv_kernel(w[i * width:(i + 1) * width]))
          for i, n in enumerate(("query", "key", "value"))}, expect((3 * width, width))),
        (r"head\.attention\.in_proj_bias",
         {f"MAPHead_0/{attn}{n}/bias": (lambda b, i=i: b[i * width:(i + 1) * width].reshape(heads, hd))
          for i, n in enumerate(("query", "key", "value"))}, expect((3 * width,))),
        (r"head\.attention\.out_proj\.weight", {f"MAPHead_0/{attn}out/kernel": out_kernel}, expect((width, width))),
        (r"head\.attention\.out_proj\.bias", {f"MAPHead_0/{attn}out/bias": np.asarray}, expect((width,))),
        (r"head\.layernorm\.weight", {"MAPHead_0/LayerNorm_0/scale": np.asarray}, expect((width,))),
        (r"head\.layernorm\.bias", {"MAPHead_0/LayerNorm_0/bias": np.asarray}, expect((width,))),
        (r"head\.mlp\.fc(?P<fc>[12])\.weight", {"MAPHead_0/MlpBlock_0/Dense_{fc0}/kernel": linear}, None),
        (r"head\.mlp\.fc(?P<fc>[12])\.bias", {"MAPHead_0/MlpBlock_0/Dense_{fc0}/bias": np.asarray}, None),
        (r"encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<ln>[12])\.weight",
         {"Transformer/encoderblock_{i}/LayerNorm_{ln0}/scale": np.asarray}, expect((width,))),
        (r"encoder\.layers\.(?P<i>\d+)\.layer_norm(?P<ln>[12])\.bias",
         {"Transformer/encoderblock_{i}/LayerNorm_{ln0}/bias": np.asarray}, expect((width,))),
        (r"encoder\.layers\.(?P<i>\d+)\.mlp\.fc(?P<fc>[12])\.weight",
         {"Transformer/encoderblock_{i}/MlpBlock_0/Dense_{fc0}/kernel": linear}, None),
        (r"encoder\.layers\.(?P<i>\d+)\.mlp\.fc(?P<fc>[12])\.bias",
         {"Transformer/encoderblock_{i}/MlpBlock_0/Dense_{fc0}/bias": np.asarray}, None),
        (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.weight",
         {"Transformer/encoderblock_{i}/" + attn + "out/kernel": out_kernel}, expect((width, width))),
        (r"encoder\.layers\.(?P<i>\d+)\.self_attn\.out_proj\.bias",
         {"Transformer/encoderblock_{i}/" + attn + "out/bias": np.asarray}, expect((width,))),
        *((rf"encoder\.layers\.(?P<i>\d+)\.self_attn\.{hf}\.weight",
           {"Transformer/encoderblock_{i}/" + attn + ours + "/kernel": qkv_kernel}, expect((width, width)))
          for ours, hf in renames.items()),
        *((rf"encoder\.layers\.(?P<i>\d+)\.self_attn\.{hf}\.bias",
           {"Transformer/encoderblock_{i}/" + attn + ours + "/bias": lambda b: b.reshape(heads, hd)},
           expect((width,)))
          for ours, hf in renames.items()),
    ]
    compiled = [(re.compile(r), names, check) for r, names, check in rules]
    for name, w in sorted(tower.items()):
        for regex, names, check in compiled:
            m = regex.fullmatch(name)
            if not m:
                continue
            groups = m.groupdict()
            fmt = {"i": groups.get("i"), "fc0": int(groups["fc"]) - 1 if groups.get("fc") else None,
                   "ln0": int(groups["ln"]) - 1 if groups.get("ln") else None}
            error = check(name, w) if check else None
            if error:
                bad_shape.append(error)
                covered.extend(template.format(**fmt) for template in names)
                break
            for template, convert in names.items():
                flat[template.format(**fmt)] = np.asarray(convert(w), np.float32)
            break
        else:
            unexpected.append(name)
    return flat, unexpected, bad_shape, covered


# --- checks and helpers -------------------------------------------------------------------------

def _check_against_model(flat: dict[str, np.ndarray], config: dict[str, Any], grid: tuple[int, int], path,
                         unplaced: Sequence[str] = (), bad_shape: Sequence[str] = (),
                         covered: Sequence[str] = ()) -> None:
    """Every name and shape the (unscanned) ViT wants, nothing more: one error listing all mismatches.

    `unplaced` (checkpoint names the reader could not map) and `bad_shape` (its shape errors)
    join the list; `covered` names (those the bad shapes were for) are not also called missing.
    """
    module = ViT(**config, scan=False)
    size = (grid[0] * config["patch_size"], grid[1] * config["patch_size"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *size, 3))))["params"]
    wanted = {p: tuple(x.shape) for p, x in tree.flatten(shapes).items()}
    missing = sorted(p for p in wanted if p not in flat and p not in covered)
    unexpected = sorted(p for p in flat if p not in wanted) + sorted(unplaced)
    shape = sorted(f"{p}: checkpoint {tuple(flat[p].shape)} vs model {s}" for p, s in wanted.items()
                   if p in flat and tuple(flat[p].shape) != s) + sorted(bad_shape)
    if missing or unexpected or shape:
        described = ", ".join(f"{k}={v}" for k, v in config.items())
        raise ValueError(_mismatch_message(f"{path}: does not match the ViT it describes ({described})",
                                           missing, unexpected, shape))


def _mismatch_message(what: str, missing: Iterable[str], unexpected: Iterable[str], shape: Iterable[str]) -> str:
    lines = [what + ":"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)):
        items = list(items)
        if items:
            lines.append(f"  {label} ({len(items)}): " + ", ".join(items))
    return "\n".join(lines)


def _posemb_grid(flat: dict[str, np.ndarray], path) -> tuple[int, int] | None:
    if "pos_embedding" not in flat:
        return None
    pe = flat["pos_embedding"]
    side = math.isqrt(pe.shape[1]) if pe.ndim == 3 else -1
    if pe.ndim != 3 or pe.shape[0] != 1 or side * side != pe.shape[1]:
        raise ValueError(f"{path}: position embedding of shape {pe.shape} is not [1, N, D] on a square grid")
    return side, side


def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.devices()[0]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)
