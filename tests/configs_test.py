"""Every config file loads for each of its arguments, and the fine-tuning config's tower loads."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from configs import siglip_finetune
from emonet_jax.models import emonet, pretrained

ARGS = {"hq": ("", "demo"), "big": ("", "demo"), "binary": ("", "demo"),
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


def test_finetune_demo_loads_the_shipped_tower():
    c = siglip_finetune.get_config("demo")
    model = emonet.build(c)
    size = c.input.image_size
    fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]
    fresh = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), fresh)
    params, loaded = pretrained.init_tower(fresh, c.model.pretrained)
    assert loaded and all(p.startswith("img/") for p in loaded)
    assert float(jnp.abs(params["img"]["embedding"]["kernel"]).sum()) > 0
