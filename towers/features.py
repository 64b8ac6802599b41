"""Side-feature embeddings and history pooling.

ID tables are *not* here: they are large, updated row-sparsely by the trainer, and passed into the towers as
gathered rows. This module embeds the small side features described by a `data.types.FeatureSpec` list:
categorical (one id per example), multi-hot (a padded bag of ids, mean-pooled) and dense (a linear map).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from data.types import FeatureSpec


def masked_mean(emb: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over axis 1 of the entries where mask is set; zero when none is.

    Args:
      emb: [B, L, d] embeddings.
      mask: [B, L] bool or 0/1.
    Returns:
      [B, d]
    """
    m = mask.astype(emb.dtype)[..., None]
    return jnp.sum(emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class FeatureEmbedder(nnx.Module):
    """Embeds every feature of a spec list into `dim` and returns them stacked: [B, num_features, dim]."""

    def __init__(self, specs: list[FeatureSpec], dim: int, *, rngs: nnx.Rngs):
        self.specs = tuple(specs)
        self.dim = dim
        init = nnx.initializers.normal(stddev=0.05)
        layers = {}
        for spec in specs:
            if spec.kind in ("categorical", "multihot"):
                layers[spec.name] = nnx.Embed(spec.size, dim, embedding_init=init, rngs=rngs)
            elif spec.kind == "dense":
                layers[spec.name] = nnx.Linear(spec.size, dim, rngs=rngs)
            else:
                raise ValueError(f"feature {spec.name!r}: unknown kind {spec.kind!r} "
                                 "(expected categorical, multihot or dense)")
        self.layers = nnx.Dict(layers)

    def __len__(self) -> int:
        return len(self.specs)

    def __call__(self, feats: dict[str, jax.Array]) -> jax.Array:
        missing = [s.name for s in self.specs if s.name not in feats]
        if missing:
            raise KeyError(f"features {missing} are in the tower's spec but not in the batch "
                           f"(batch has {sorted(feats)})")
        out = []
        for spec in self.specs:
            x, layer = feats[spec.name], self.layers[spec.name]
            if spec.kind == "categorical":
                out.append(layer(x.astype(jnp.int32)))
            elif spec.kind == "multihot":
                x = x.astype(jnp.int32)
                out.append(masked_mean(layer(jnp.maximum(x, 0)), x >= 0))
            else:
                out.append(layer(x.astype(jnp.float32).reshape(x.shape[0], -1)))
        return jnp.stack(out, axis=1)
