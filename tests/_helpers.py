"""What train_test.py and faults_test.py share: a tiny trainer config, compiled steps, whole runs.

    config = tiny_config(total_steps=12)               # the demo config, shrunk for a 2-core CPU
    trainer, step, state = setup()                     # compiled once per (overrides, devices)
    result = train_run(workdir, data_dir, **overrides)  # train.train_and_evaluate in this process
    params = final_params(workdir)                     # the latest checkpoint's parameters, uncompiled
"""

import functools
import pathlib
import sys

import jax
import numpy as np

from configs import hq
from emonet_jax import checkpoint, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(**overrides):
    # The whole ViT trained (the real demo freezes a pre-trained tower).
    c = hq.get_config("demo_scratch")
    c.batch_size = 16
    c.input.image_size = 32
    c.input.threads = 1
    c.total_steps = 6
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
    c.optimizer.warmup_steps = 2
    for key, value in overrides.items():
        node = c
        *parents, name = key.split(".")
        for p in parents:
            node = node[p]
        node[name] = value
    return c


def first_batch(config, data_dir):
    return next(train.train_input(config, data_dir))


@functools.lru_cache(maxsize=None)
def _compiled(overrides: tuple, num_devices: int):
    """(trainer, jitted step, host copy of the initial state): compiling is most of a test's
    time on 2 cores, so each (config, mesh) is built once per test process."""
    config = tiny_config(**dict(overrides))
    trainer = train.build(config, train.make_mesh(config, jax.devices()[:num_devices]))
    return trainer, train.make_train_step(trainer), jax.device_get(train.initial_state(trainer))


def setup(num_devices=8, **overrides):
    """(trainer, step, a fresh initial state on the mesh)."""
    trainer, step, host_state = _compiled(tuple(sorted(overrides.items())), num_devices)
    return trainer, step, jax.device_put(host_state, trainer.state_shardings)


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def train_run(workdir, data_dir, **overrides):
    return train.train_and_evaluate(tiny_config(**overrides), workdir, data_dir)


def abstract_state(config=None):
    """The train state's shapes, dtypes and shardings for `config` (default: the tiny one), uncompiled."""
    config = config or tiny_config()
    trainer = train.build(config, train.make_mesh(config))
    return train.abstract_state(trainer, jax.eval_shape(lambda: train.initial_state(trainer)))


def final_params(workdir):
    """The parameters of `workdir`'s latest checkpoint (a run of the tiny model)."""
    ckpt = checkpoint.Checkpoints(workdir)
    restored, _ = ckpt.restore(ckpt.latest_step(), abstract_state())
    ckpt.close()
    return jax.device_get(restored["params"])


def main_command(workdir, data_dir, *flags):
    """`python -m emonet_jax.main` on the prepared tiny records, with `tiny_config`'s sizes."""
    overrides = {"batch_size": 16, "input.image_size": 32, "input.threads": 1, "data.synthetic": False,
                 "data.data_dir": str(data_dir), "eval_every_steps": 0, "optimizer.warmup_steps": 2}
    return [sys.executable, "-m", "emonet_jax.main", "--config=configs/hq.py:demo_scratch", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items()), *flags]
