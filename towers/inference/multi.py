"""Retrieval for users with K embeddings (`model.user.num_embeddings`, `towers.multi_interest`): how many of a
user's embeddings are searched, and how their result lists become one.

- `active_interests`: K' = min(K, 1 + valid_history_items // history_per_interest) (all K when
  history_per_interest is 0). A short history has few distinct interests, and its later capsules repeat or
  split the same few items; searching them would spend the list on near-duplicates of the first interest.
  `towers.inference.embed.embed_users` applies the rule: it zeroes a user's embeddings past K'.
- `merge_round_robin`: one list from the K' per-interest lists, taking each interest's next item in turn
  (interest 0 first within a round), skipping items already taken, until k are taken.
- `multi_interest_topk`: a top-k search per interest (any search function with `exact_topk`'s signature),
  inactive (zero) embeddings skipped, merged round-robin.

Host numpy only (no JAX import here).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from data.types import PAD


def active_interests(history_lengths, num_embeddings: int, history_per_interest: int) -> np.ndarray:
    """K' per user: how many of its first embeddings are searched.

    Args:
      history_lengths: int[Q] valid history items of each user (the tower's input, at most history_len).
      num_embeddings: K >= 1.
      history_per_interest: h >= 0; 0 = every user gets all K.
    Returns:
      int32[Q] in [1, K]: min(K, 1 + len // h).
    """
    lengths = np.asarray(history_lengths, np.int64)
    if num_embeddings < 1 or history_per_interest < 0:
        raise ValueError(f"active_interests: num_embeddings={num_embeddings} must be >= 1 and "
                         f"history_per_interest={history_per_interest} >= 0")
    if history_per_interest == 0:
        return np.full(lengths.shape, num_embeddings, np.int32)
    return np.minimum(num_embeddings, 1 + np.maximum(lengths, 0) // history_per_interest).astype(np.int32)


def merge_round_robin(per_interest_ids, k: int) -> np.ndarray:
    """Merges each user's per-interest ranked lists into one of length k, round-robin, without duplicates.

    Round r takes the r-th item of interest 0, then of interest 1, ...; an item already taken (from any list)
    or a `-1` pad is skipped, and the next ones move up. The result is filled to k whenever the lists hold k
    distinct items (e.g. whenever one list has k distinct ones).

    Args:
      per_interest_ids: int[Q, K', L] ranked ids per interest, -1 padded (a whole row of -1 = an interest
        not searched).
      k: length of the merged list, >= 1.
    Returns:
      int64[Q, k] merged ids, -1 past the distinct items available.
    """
    ids = np.asarray(per_interest_ids)
    if ids.ndim != 3:
        raise ValueError(f"merge_round_robin: per_interest_ids must be [users, interests, k], got {ids.shape}")
    if k < 1:
        raise ValueError(f"merge_round_robin: k={k} must be >= 1")
    q, kp, length = ids.shape
    flat = ids.transpose(0, 2, 1).reshape(q, length * kp).astype(np.int64)   # round-major, interest-minor
    # The first occurrence of each id in its row: sort by id (stable keeps the earlier position first).
    order = np.argsort(flat, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(flat, order, axis=1)
    first_sorted = np.ones_like(sorted_ids, bool)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    keep = first & (flat != PAD)
    # The kept entries in their merged order, then the rest (stable: positions stay in order).
    pick = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(flat, pick, axis=1)
    out[~np.take_along_axis(keep, pick, axis=1)] = PAD
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((q, k - out.shape[1]), PAD, np.int64)], axis=1)
    return out


def multi_interest_topk(user_emb, item_emb, k: int, search: Callable, **search_kw) -> np.ndarray:
    """Top-k per user from its K embeddings: each active embedding searched, the lists merged round-robin.

    Args:
      user_emb: float[Q, K, d]; an all-zero [d] row is an interest not searched (`embed_users` zeroes those
        past K'). Interest 0 is always searched.
      item_emb: float[N, d].
      k: results per user.
      search: `towers.inference.exact.exact_topk` or a function with its signature and return value.
      search_kw: passed to `search` (exclusions, blocks); the exclusion rows align with the users.
    Returns:
      int64[Q, k] merged ids, -1 padded.
    """
    user_emb = np.asarray(user_emb)
    if user_emb.ndim != 3:
        raise ValueError(f"multi_interest_topk: user_emb must be [users, K, d], got {user_emb.shape}")
    active = np.any(user_emb != 0, axis=2)
    active[:, 0] = True
    lists = []
    for j in range(user_emb.shape[1]):
        _, ids = search(user_emb[:, j], item_emb, k, **search_kw)
        ids = np.asarray(ids, np.int64)
        ids[~active[:, j]] = PAD
        lists.append(ids)
    return merge_round_robin(np.stack(lists, axis=1), k)
