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
- `interest_queries` / `merge_searched`: the same with every user's active embeddings in one search call (an
  index's batched search, as the server and batch candidates run it), scores following the merged items.

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
    pick = merge_positions(ids, k)
    q, kp, length = ids.shape
    flat = ids.transpose(0, 2, 1).reshape(q, length * kp).astype(np.int64)
    return np.where(pick >= 0, np.take_along_axis(flat, np.maximum(pick, 0), axis=1), PAD)


def merge_positions(per_interest_ids, k: int) -> np.ndarray:
    """Where `merge_round_robin`'s picks come from, so that anything aligned with the ids (scores, raw ids of
    any kind coded as ints) can follow them.

    Args:
      per_interest_ids: int[Q, K', L] ranked ids per interest, -1 padded.
      k: length of the merged list, >= 1.
    Returns:
      int64[Q, k] positions into the round-major flattening of each user's lists (position r * K' + j is item
      r of interest j: `per_interest_ids.transpose(0, 2, 1).reshape(Q, L * K')`), -1 past the distinct items.
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
    pick = np.argsort(~keep, axis=1, kind="stable")[:, :k].astype(np.int64)
    pick[~np.take_along_axis(keep, pick, axis=1)] = PAD
    if pick.shape[1] < k:
        pick = np.concatenate([pick, np.full((q, k - pick.shape[1]), PAD, np.int64)], axis=1)
    return pick


def active_mask(user_emb) -> np.ndarray:
    """bool[Q, K]: the embeddings searched, the non-zero ones (`embed_users` zeroes those past K'); the first
    is always searched."""
    user_emb = np.asarray(user_emb)
    if user_emb.ndim != 3:
        raise ValueError(f"multi-interest search: user_emb must be [users, K, d], got {user_emb.shape}")
    active = np.any(user_emb != 0, axis=2)
    active[:, 0] = True
    return active


def interest_queries(user_emb) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The active embeddings of every user as one batch of queries, for one index call.

    Args:
      user_emb: float[Q, K, d].
    Returns:
      (queries float[M, d], owner int64[M] the user of each query, interest int64[M] its embedding), M the
      active embeddings over all users, user-major.
    """
    user_emb = np.asarray(user_emb)
    owner, interest = np.nonzero(active_mask(user_emb))
    return user_emb[owner, interest], owner.astype(np.int64), interest.astype(np.int64)


def merge_searched(owner, interest, scores, codes, num_users: int, num_interests: int,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """One search's per-interest results (`interest_queries`) merged round-robin per user.

    Args:
      owner, interest: int[M] from `interest_queries`.
      scores: float[M, L] each query's scores (-inf past its results).
      codes: int[M, L] each result's item as a non-negative int (a slot, or a code of a raw id), -1 padded.
      num_users, num_interests: Q and K.
      k: merged length.
    Returns:
      (scores float32[Q, k], positions int64[Q, k]): each merged item's score (from the interest whose list it
      was taken from) and where it sits in the flattened `codes` (row m, column l -> m * L + l), -1 past the
      distinct items; gather any array aligned with `codes` with it.
    """
    scores, codes = np.asarray(scores, np.float32), np.asarray(codes, np.int64)
    length = codes.shape[1]
    flat_at = np.full((num_users, num_interests, length), PAD, np.int64)
    flat_at[owner, interest] = (np.arange(len(owner), dtype=np.int64) * length)[:, None] + np.arange(length)
    ids = np.full((num_users, num_interests, length), PAD, np.int64)
    ids[owner, interest] = codes
    pick = merge_positions(ids, k)
    at = flat_at.transpose(0, 2, 1).reshape(num_users, length * num_interests)
    pos = np.where(pick >= 0, np.take_along_axis(at, np.maximum(pick, 0), axis=1), PAD)
    out = np.where(pos >= 0, scores.reshape(-1)[np.maximum(pos, 0)] if scores.size else 0, -np.inf)
    return out.astype(np.float32), pos


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
    active = active_mask(user_emb)
    lists = []
    for j in range(user_emb.shape[1]):
        _, ids = search(user_emb[:, j], item_emb, k, **search_kw)
        ids = np.asarray(ids, np.int64)
        ids[~active[:, j]] = PAD
        lists.append(ids)
    return merge_round_robin(np.stack(lists, axis=1), k)
