"""The towers on table rows: items or users through their tower (jit, fixed batch shapes).

`towers.inference.embed` decides what a run's items and users feed in (which ID rows, features, audiences,
histories) and calls these; everything else calls that. Inputs are arrays indexed by row (ID tables, feature
arrays, history rows), so nothing here knows about files, datasets or training.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0,))
def _item_fn(graphdef, params, table, ids, feats, audience=None):
    model = nnx.merge(graphdef, params)
    id_emb = None if table is None else table[jnp.maximum(ids, 0)] * (ids >= 0)[:, None]
    if audience is None:
        if model.item.use_history:   # raised while tracing, so it costs nothing per call
            raise ValueError("embed_items: this item tower pools each item's audience (model.item.use_history); "
                             "pass audience=(means, has) from data.batching.item_audience_mean (has=False for an "
                             "item without train users)")
        return model.item(feats, id_emb)
    # The audience mean enters as a one-entry history: the tower's masked mean of it is the mean itself.
    return model.item(feats, id_emb, audience["mean"][:, None, :], audience["has"][:, None])


def user_forward(graphdef, params, user_table, item_table, ids, history, feats, extra_id_emb=None):
    """The user tower on table rows: what `embed_users` and the server both run (traceable, not jitted).

    Args:
      ids: int[B] user-table rows; -1 = no row (the ID embedding is zeros, plus `extra_id_emb`).
      history: int[B, H] item-table rows, -1 padded, or None.
      feats: {name: array[B, ...]}.
      extra_id_emb: float[B, id_dim] added to the ID embedding, or None. The server passes the hashed-row
        embedding of user ids outside the vocabulary here (with ids -1), so an unseen id still has one.
    Returns:
      [B, output_dim]
    """
    model = nnx.merge(graphdef, params)
    id_emb = None if user_table is None else user_table[jnp.maximum(ids, 0)] * (ids >= 0)[:, None]
    if extra_id_emb is not None and id_emb is not None:
        id_emb = id_emb + extra_id_emb
    hist_emb = hist_mask = None
    if history is not None:
        hist_mask = history >= 0
        hist_emb = item_table[jnp.maximum(history, 0)]
    return model.user(feats, id_emb, hist_emb, hist_mask)


_user_fn = jax.jit(user_forward, static_argnums=(0,))


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _pad(x: np.ndarray, size: int, fill) -> np.ndarray:
    if len(x) == size:
        return x
    pad = np.full((size - len(x), *x.shape[1:]), fill, dtype=x.dtype)
    return np.concatenate([x, pad])


def _run_batched(fn, n: int, batch_size: int, ids: np.ndarray, feats: dict, history=None) -> np.ndarray:
    """fn(ids, feats, history) over fixed-size padded batches (one compile), concatenated and unpadded.

    `history` is an int array [n, H] (padded with -1) or a dict of arrays [n, ...] (padded with zeros)."""
    out = []
    size = min(batch_size, max(n, 1))
    for a, b in _batches(n, size):
        batch_ids = _pad(np.asarray(ids[a:b], np.int32), size, -1)
        batch_feats = {k: _pad(np.asarray(v[a:b]), size, 0) for k, v in feats.items()}
        if isinstance(history, dict):
            hist = {k: _pad(np.asarray(v[a:b]), size, 0) for k, v in history.items()}
        else:
            hist = None if history is None else _pad(np.asarray(history[a:b], np.int32), size, -1)
        out.append(np.asarray(fn(batch_ids, batch_feats, hist))[: b - a])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_items(graphdef, params, item_table, item_rows: np.ndarray, item_features: dict[str, np.ndarray],
                *, batch_size: int = 8192, audience: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Item embeddings.

    Args:
      item_rows: int[N] rows of the item table to embed; -1 = an item without an ID row (fresh item,
        embedded from its features alone).
      item_features: {name: array[N, ...]} aligned with item_rows.
      audience: for an item tower with `use_history`, (float32[N, id_dim] mean user row of each item's audience,
        bool[N] whether it has one), from `data.batching.item_audience_mean`; None otherwise.
    Returns:
      float32[N, output_dim]
    """
    def fn(ids, feats, aud):
        return _item_fn(graphdef, params, item_table, ids, feats, aud)

    aud = None if audience is None else {"mean": np.asarray(audience[0], np.float32),
                                         "has": np.asarray(audience[1], bool)}
    return _run_batched(fn, len(item_rows), batch_size, item_rows, item_features, aud)


def embed_users(graphdef, params, user_table, item_table, user_rows: np.ndarray,
                user_features: dict[str, np.ndarray], history: np.ndarray | None,
                *, batch_size: int = 8192) -> np.ndarray:
    """User embeddings.

    Args:
      user_rows: int[Q] rows of the user table (-1 = a user without an ID row).
      user_features: {name: array[Q, ...]} aligned with user_rows.
      history: int32[Q, H] item rows of each user's recent items (-1 padded), or None.
    Returns:
      float32[Q, output_dim]
    """
    def fn(ids, feats, hist):
        return _user_fn(graphdef, params, user_table, item_table, ids, hist, feats)

    return _run_batched(fn, len(user_rows), batch_size, user_rows, user_features, history)
