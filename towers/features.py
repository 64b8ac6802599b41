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


def gathered_mean(rows: jax.Array, idx: jax.Array, mask: jax.Array) -> jax.Array:
    """`masked_mean(rows[idx], mask)` without building the [B, L, d] block of gathered rows.

    One [B, d] gather per slot, weighted and accumulated in a loop over the L slots; the backward is one
    [B, d] scatter-add per slot. On XLA:CPU the one-shot form costs a [B, L, d] gather, a [B, L, d] broadcast
    of the mask and a reduction over them, each a pass over B * L * d floats (26 MB for 1024 x 100 x 64), several
    times this loop (see BENCHMARKS.md, "Where the step's time goes"). The same sums, added slot by slot.

    Args:
      rows: [U, d] table rows.
      idx: int[B, L] indices into `rows`, or int[B, L, K] for a hashed table (an entry is the sum of its K
        rows); in bounds everywhere (masked entries may hold any valid index).
      mask: [B, L] bool or 0/1.
    Returns:
      [B, d]; zero for a row whose mask is empty.
    """
    w = mask.astype(rows.dtype)
    hashed = idx.ndim == 3

    def slot(j, acc):
        r = rows.at[idx[:, j]].get(mode="promise_in_bounds", wrap_negative_indices=False)
        return acc + (r.sum(axis=-2) if hashed else r) * w[:, j, None]

    if idx.shape[1] == 0:
        return jnp.zeros((idx.shape[0], rows.shape[-1]), rows.dtype)
    # The first slot starts the sum, so the carry has the slots' type (under shard_map: varying over the axes).
    total = jax.lax.fori_loop(1, idx.shape[1], slot, slot(0, 0.0))
    return total / jnp.maximum(jnp.sum(w, axis=1), 1.0)[:, None]


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
