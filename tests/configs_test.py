"""Every config file loads for each of its arguments, and the towers the demos start from load."""

import importlib
import json

import jax
import jax.numpy as jnp
import pytest

from configs import common, hq, siglip_finetune
from emonet_jax import optim, tree
from emonet_jax.models import emonet, pretrained

ARGS = {"hq": ("", "demo", "demo_scratch"), "big": ("", "demo"), "binary": ("", "demo"),
        "siglip_finetune": ("", "so400m", "b16", "demo")}


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_configs_load(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    assert config.total_steps > 0 and config.batch_size > 0


def test_unknown_argument_is_refused():
    with pytest.raises(ValueError, match="so400m"):
        siglip_finetune.get_config("so400")


def test_finetune_config_tower_and_decay():
    c = siglip_finetune.get_config("so400m")
    assert (c.model.variant, c.input.image_size, c.data.resolution) == ("So400m/14", 384, 384)
    assert c.optimizer.layer_decay < 1 and c.optimizer.lr <= 1e-4 and not c.input.flip


def load_configured_tower(c):
    """(zero-initialised params of the config's model, them with the config's tower loaded, loaded paths)."""
    model = emonet.build(c)
    size = c.input.image_size
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), fresh)
    return (fresh, *pretrained.init_tower(fresh, c.model.pretrained))


def test_finetune_demo_loads_the_shipped_tower():
    _, params, loaded = load_configured_tower(siglip_finetune.get_config("demo"))
    assert loaded and all(p.startswith("img/") for p in loaded)
    assert float(jnp.abs(params["img"]["embedding"]["kernel"]).sum()) > 0


def test_hq_demo_freezes_the_shipped_pretrained_tower():
    c = hq.get_config("demo")
    fresh, params, loaded = load_configured_tower(c)
    # Every tower parameter comes from the file, and the optimizer leaves all of them alone.
    assert sorted(loaded) == sorted(p for p in tree.flatten(fresh) if p.startswith("img/"))
    assert float(jnp.abs(params["img"]["embedding"]["kernel"]).sum()) > 0
    assert all(f == p.startswith("img/") for p, f in tree.flatten(optim.frozen(c.optimizer, fresh)).items())


def test_demo_tower_card_says_how_it_was_made():
    card = json.loads(common.DEMO_TOWER.with_suffix(".json").read_text())
    assert card["command"].startswith("python experiments/pretrain_demo_tower.py")
    assert card["args"]["image_size"] == hq.get_config("demo").input.image_size
    assert 0 < card["held_out_r2_mean"] <= 1
    while card.get("init"):  # continued from an earlier tower: its card, all the way down
        card = card["init"]
        assert card["command"].startswith("python experiments/pretrain_demo_tower.py") and card["held_out_r2_mean"] > 0
