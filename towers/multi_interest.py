"""Multi-embedding users: a clustering module that turns a user's history into K interest vectors.

Fan et al., KDD 2025 ("Synergizing Implicit and Explicit User Interests: A Multi-Embedding Retrieval Framework
at Pinterest") cluster the history with capsule-style dynamic routing (B2I routing of MIND, Li et al. 2019, and
ComiRec, Cen et al. 2020) and change two things, both kept here:

- max-min initialisation: the K capsules start at K history items picked greedily, each the valid item farthest
  (squared Euclidean distance, after the shared bilinear map) from the nearest item picked so far; the first
  pick is the most recent valid item (position 0 of a most-recent-first history). The picks are deterministic,
  so the same user gets the same interests at train, eval and serve time (MIND draws its routing logits at
  random). A user with fewer valid items than K repeats its last pick: those capsules coincide, and inference
  searches only the first K' of them (`active_interests`).
- single assignment: every valid history item routes to exactly one capsule, the one whose current vector has
  the largest dot product with it (ties: the lower capsule index), instead of a softmax over capsules.

One routing iteration: `b[k, i] = <c_k, u_i>`, `w[k, i] = mask_i * onehot(argmax_k b[:, i])`,
`c_k = squash(sum_i w[k, i] u_i)`, with `u_i = S e_i` the item's row through the bilinear map S shared by all
items and capsules (MIND's B2I). `iterations` of them run from the max-min start.

Gradients: the assignment is hard at train time too (the same computation as at serving), and the routing
logits are treated as constants (`stop_gradient`), as MIND and ComiRec do for their routing coefficients; the
gradient reaches S and the history rows through the sums `sum_i w[k, i] u_i`. A straight-through estimator
would need a soft assignment to differentiate, which changes what a capsule averages between train and serve;
constant routing keeps the two identical.

Padding items (mask 0) are never picked, never assigned, and do not change any capsule. A user without a valid
history item gets K zero capsules. With K = 1 every valid item routes to the single capsule:
`squash(S sum_i e_i)`, the history sum's direction through S (the direction of the masked mean the
single-embedding tower pools), with a length that grows with the history.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def squash(z: jax.Array, eps: float = 1e-9) -> jax.Array:
    """The capsule non-linearity `|z|^2 / (1 + |z|^2) * z / |z|` over the last axis (zero stays zero)."""
    sq = jnp.sum(z * z, axis=-1, keepdims=True)
    return z * (sq / (1.0 + sq)) * jax.lax.rsqrt(sq + eps)


def max_min_init(u: jax.Array, mask: jax.Array, k: int) -> jax.Array:
    """Indices of K history items picked by max-min (farthest-point) selection, per user.

    Args:
      u: [B, H, d] (mapped) history item vectors.
      mask: [B, H] bool or 0/1, valid items.
      k: number of picks K.
    Returns:
      int32[B, K]: the first pick is the first valid item; each next one the valid item whose squared distance
      to its nearest pick is largest (ties: the lower position). Once every valid item is picked, the next
      picks are the lowest valid position again (all distances are 0). A user without valid items gets
      position 0 everywhere (its capsules are zero: nothing is routed to them).
    """
    valid = mask.astype(bool)
    u = jax.lax.stop_gradient(u).astype(jnp.float32)
    sq = jnp.sum(u * u, axis=-1)                                            # [B, H]
    first = jnp.argmax(valid, axis=1).astype(jnp.int32)                     # first valid position (0 if none)
    neg = jnp.asarray(-jnp.inf, jnp.float32)

    def dist_to(idx):
        c = jnp.take_along_axis(u, idx[:, None, None], axis=1)[:, 0]        # [B, d]
        return sq - 2.0 * jnp.einsum("bhd,bd->bh", u, c) + jnp.sum(c * c, axis=-1, keepdims=True)

    picks = [first]
    nearest = dist_to(first)
    for _ in range(1, k):
        score = jnp.where(valid, jnp.maximum(nearest, 0.0), neg)
        nxt = jnp.argmax(score, axis=1).astype(jnp.int32)
        picks.append(nxt)
        nearest = jnp.minimum(nearest, dist_to(nxt))
    return jnp.stack(picks, axis=1)


def route(u: jax.Array, mask: jax.Array, k: int, iterations: int) -> jax.Array:
    """Single-assignment dynamic routing from the max-min start (see the module docstring).

    Args:
      u: [B, H, d] mapped history item vectors; mask: [B, H] valid items.
      k: number of capsules K; iterations: routing iterations (>= 1).
    Returns:
      [B, K, d] squashed interest capsules.
    """
    m = mask.astype(u.dtype)
    picks = max_min_init(u, mask, k)
    caps = jnp.take_along_axis(u, picks[:, :, None], axis=1)               # [B, K, d]
    for _ in range(iterations):
        logits = jax.lax.stop_gradient(jnp.einsum("bkd,bhd->bkh", caps, u))
        assign = jax.nn.one_hot(jnp.argmax(logits, axis=1), k, axis=1, dtype=u.dtype)   # [B, K, H]
        caps = squash(jnp.einsum("bkh,bhd->bkd", assign * m[:, None, :], u))
    return caps


class InterestClustering(nnx.Module):
    """History item rows [B, H, d] (+ mask) -> K interest capsules [B, K, d] (MIND's B2I map S, then `route`).

    Args:
      dim: width d of the history rows and of the capsules.
      num_interests: K.
      iterations: routing iterations.
    """

    def __init__(self, dim: int, num_interests: int, iterations: int = 3, *, rngs: nnx.Rngs):
        if num_interests < 1 or iterations < 1:
            raise ValueError(f"InterestClustering: num_interests={num_interests} and iterations={iterations} "
                             "must both be >= 1")
        self.num_interests = int(num_interests)
        self.iterations = int(iterations)
        self.bilinear = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, history_emb: jax.Array, history_mask: jax.Array) -> jax.Array:
        u = self.bilinear(history_emb)
        return route(u, history_mask, self.num_interests, self.iterations)
