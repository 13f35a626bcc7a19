"""cuDNN attention against XLA's: the same ViT's pooled embedding and gradients, bfloat16, on a GPU.

    python benchmarks/attention_parity.py        # needs an NVIDIA GPU (cuDNN's fused attention)

For each (variant, resolution), builds the ViT twice, `attention='xla'` and `attention='cudnn'`,
initialises one set of parameters, and prints one JSON line: the largest absolute difference of
the pooled embeddings (beside the largest value, for scale: bfloat16 has 8 significant bits),
the mean-square loss of each, and the relative difference of the full gradient vectors.
So400m/14 at 384 px has 729 tokens, an odd count that takes `vit.even_length_attention`'s padding.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from emonet_jax.models import vit

CASES = (("S/16", 224), ("So400m/14", 384))


def compare(variant: str, resolution: int, batch: int = 2) -> dict:
    models = {a: vit.ViT.from_variant(variant, dtype=jnp.bfloat16, attention=a) for a in vit.ATTENTION}
    images = jax.random.uniform(jax.random.key(0), (batch, resolution, resolution, 3), minval=-1, maxval=1)
    params = models["xla"].init(jax.random.key(1), images)

    def loss(p, model):
        pooled = model.apply(p, images)[0]
        return jnp.mean(pooled.astype(jnp.float32) ** 2), pooled

    losses, grads, pooled = {}, {}, {}
    for name, model in models.items():
        (losses[name], pooled[name]), g = jax.jit(jax.value_and_grad(lambda p, m=model: loss(p, m), has_aux=True))(params)
        grads[name] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float32)
        pooled[name] = np.asarray(pooled[name], np.float32)
    return {"pooled_max_abs_diff": float(np.abs(pooled["xla"] - pooled["cudnn"]).max()),
            "pooled_max_abs": float(np.abs(pooled["xla"]).max()),
            "loss": [float(losses[a]) for a in vit.ATTENTION],
            "grad_rel_diff": float(np.linalg.norm(grads["xla"] - grads["cudnn"]) / np.linalg.norm(grads["xla"]))}


if __name__ == "__main__":
    print(json.dumps({"benchmark": "attention_parity", "device": jax.devices()[0].device_kind,
                      **{f"{v}@{r}": compare(v, r) for v, r in CASES}}))
