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

    One [B, d] gather per slot, accumulated in a loop over the L slots; a masked entry reads an out-of-bounds
    row, which the gather fills with zeros (so no per-slot weighting), and the mean divides once at the end. The
    backward is one [B, d] scatter-add per slot (out-of-bounds entries dropped). On XLA:CPU the one-shot form
    costs a [B, L, d] gather, a [B, L, d] broadcast of the mask and a reduction over them, each a pass over
    B * L * d floats (26 MB for 1024 x 100 x 64), several times this loop (see BENCHMARKS.md, "Where the step's
    time goes"). The same sums, added slot by slot.

    Args:
      rows: [U, d] table rows.
      idx: int[B, L] indices into `rows`, or int[B, L, K] for a hashed table (an entry is the sum of its K
        rows); in [0, U) where the mask is set (masked entries may hold anything).
      mask: [B, L] bool or 0/1.
    Returns:
      [B, d]; zero for a row whose mask is empty.
    """
    b, slots = idx.shape[:2]
    if slots == 0:
        return jnp.zeros((b, rows.shape[-1]), rows.dtype)
    on = mask.astype(bool)
    # Slot-major, so each slot's indices are one contiguous [B] (or [B, K]) block.
    idx = jnp.moveaxis(jnp.where(on.reshape(on.shape + (1,) * (idx.ndim - 2)), idx, rows.shape[0]), 1, 0)

    def slot(j, acc):
        r = rows.at[idx[j]].get(mode="fill", fill_value=0, wrap_negative_indices=False)
        return acc + (r.sum(axis=-2) if idx.ndim == 3 else r)

    # The first slot starts the sum, so the carry has the slots' type (under shard_map: varying over the axes).
    total = jax.lax.fori_loop(1, slots, slot, slot(0, 0.0))
    return total / jnp.maximum(jnp.sum(on, axis=1), 1).astype(rows.dtype)[:, None]


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
