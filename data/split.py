"""Ordering interactions in time and splitting them per user.

Rules (also in the README):

* Canonical order: by user, then timestamp; equal timestamps are ordered by a key hashed from
  `split_seed` and the row's position in the log (temporal split) or kept in file order (given split). The rules
  are applied per user by `data.peruser`, the one implementation shared by the in-memory, chunked and Beam paths.
* Temporal split: a user with n >= 2 interactions gets n_test = max(1, floor(test_fraction * n)), capped at n - 1
  so at least one train interaction remains; their last n_test interactions are test. A user with a single
  interaction keeps it in train. test_fraction = 0 gives no test rows.
* Validation: the same rule with `valid_fraction`, applied to each user's train part (its latest interactions).
  Equal timestamps are ordered by the `split_seed` keys here for both splits, so with a given split
  that has no time (LightGCN files: all timestamps 0) each user's validation items are a seeded random share
  of their train items, not the end of their train line in file order.
* Cold items (`cold_item_fraction` f > 0): of the A items with at least one interaction, C = clip(floor(f * A),
  1, A - 1) chosen by a permutation seeded with `cold_item_seed` are held out of training entirely. The split
  above runs first; then every train and valid row of a cold item moves to test, so the warm test rows are
  the same as without cold items and only train (and valid) shrink.
"""
from __future__ import annotations

import numpy as np

# floor(f * n) of e.g. 0.29 * 100 is 28.999999999999996 in floating point; the guard keeps it at 29.
_FLOOR_EPS = 1e-9
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _sorted_without_ties(user: np.ndarray, ts: np.ndarray) -> bool:
    """True when rows are already in (user, time) order with strictly increasing time within each user."""
    if user.shape[0] < 2:
        return True
    same = user[1:] == user[:-1]
    return bool(np.all((user[1:] > user[:-1]) | (same & (ts[1:] > ts[:-1]))))


def _stable_order(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Stable argsort by (user, ts); one packed int64 key when both fit (several times faster than lexsort)."""
    if user.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    t_min = int(ts.min())
    t_bits = int(ts.max() - t_min).bit_length()
    u_bits = int(user.max()).bit_length()
    if t_bits + u_bits <= 62:
        key = (user.astype(np.int64) << t_bits) | (ts - t_min)
        return np.argsort(key, kind="stable")
    return np.lexsort((ts, user))


def tie_keys(seed: int, row_id: np.ndarray) -> np.ndarray:
    """uint64 [N]: splitmix64 of each row's position in the log, salted by `seed`; distinct positions give
    distinct keys (splitmix64 is a bijection), so the order they define has no ties."""
    with np.errstate(over="ignore"):
        z = np.asarray(row_id).astype(np.uint64) + _GOLDEN * np.uint64(seed + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def canonical_order(user: np.ndarray, ts: np.ndarray, *, tie_seed: int | None) -> np.ndarray:
    """Row order by (user, timestamp) with ties broken reproducibly.

    Args:
      user: int [N] user rows.
      ts: int64 [N] timestamps.
      tie_seed: seed of the keys (`tie_keys` of the row positions) that order equal timestamps of a user; None
        keeps input order.

    Returns:
      int64 [N] permutation of 0..N-1.
    """
    n = user.shape[0]
    if _sorted_without_ties(user, ts):
        return np.arange(n, dtype=np.int64)
    if tie_seed is None:
        return _stable_order(user, ts)
    return np.lexsort((tie_keys(tie_seed, np.arange(n)), ts, user)).astype(np.int64)


def tail_counts(counts: np.ndarray, fraction: float) -> np.ndarray:
    """Per user, how many of the latest interactions go to the held-out part.

    Args:
      counts: int [U] interactions per user.
      fraction: held-out fraction in [0, 1).

    Returns:
      int64 [U]: 0 for users with < 2 interactions or fraction 0, else clip(floor(f*n), 1, n-1).
    """
    counts = np.asarray(counts, dtype=np.int64)
    if fraction <= 0:
        return np.zeros_like(counts)
    n_tail = np.floor(fraction * counts + _FLOOR_EPS).astype(np.int64)
    n_tail = np.clip(n_tail, 1, np.maximum(counts - 1, 1))
    return np.where(counts >= 2, n_tail, 0)


def tail_mask(user_sorted: np.ndarray, num_users: int, fraction: float) -> np.ndarray:
    """Marks each user's latest interactions per `tail_counts`.

    Args:
      user_sorted: int [N] user rows in canonical order (grouped by user, oldest first).
      num_users: U.
      fraction: held-out fraction.

    Returns:
      bool [N], True for held-out rows.
    """
    counts = np.bincount(user_sorted, minlength=num_users).astype(np.int64)
    n_tail = tail_counts(counts, fraction)
    start = np.cumsum(counts) - counts
    rank = np.arange(user_sorted.shape[0], dtype=np.int64) - start[user_sorted]
    return rank >= (counts - n_tail)[user_sorted]


def latest_share_mask(user: np.ndarray, ts: np.ndarray, num_users: int, fraction: float, *,
                      tie_seed: int | None) -> np.ndarray:
    """Marks each user's latest interactions per `tail_counts`, for rows in any order.

    Args:
      user: int [N] user rows.
      ts: int64 [N] timestamps.
      num_users: U.
      fraction: held-out fraction.
      tie_seed: seed of the order of a user's equal timestamps (see `canonical_order`); None keeps input order.

    Returns:
      bool [N] in the input order, True for held-out rows.
    """
    order = canonical_order(user, ts, tie_seed=tie_seed)
    held = np.zeros(user.shape[0], dtype=bool)
    held[order] = tail_mask(user[order], num_users, fraction)
    return held


def duplicate_mask(user: np.ndarray, item: np.ndarray, num_items: int, order: np.ndarray) -> np.ndarray:
    """Marks repeats of a (user, item) pair; the first in `order` is not a repeat.

    Args:
      user, item: int [N] codes.
      num_items: bound of item codes (for packing the pair into one key).
      order: int [N] row order that defines "first" (canonical time order).

    Returns:
      bool [N], True for every occurrence after the first.
    """
    key = user.astype(np.int64)[order] * num_items + item[order]
    sorter = np.argsort(key, kind="stable")
    ks = key[sorter]
    repeat_sorted = np.zeros(ks.shape[0], dtype=bool)
    repeat_sorted[1:] = ks[1:] == ks[:-1]
    out = np.zeros(ks.shape[0], dtype=bool)
    out[order[sorter]] = repeat_sorted
    return out


def count_duplicates(user: np.ndarray, item: np.ndarray, num_items: int) -> int:
    """How many rows repeat an earlier (user, item) pair (N minus distinct pairs)."""
    if user.shape[0] == 0:
        return 0
    key = np.sort(user.astype(np.int64) * num_items + item)
    return int(np.count_nonzero(key[1:] == key[:-1]))


def pick_cold_items(item: np.ndarray, num_items: int, fraction: float, seed: int) -> np.ndarray:
    """The items held out of training entirely (cold-start protocol).

    Args:
      item: int [N] item rows of every interaction that survived the filters.
      num_items: bound of the item rows.
      fraction: share of the items with at least one interaction to hold out, in [0, 1).
      seed: seed of the permutation that picks them.

    Returns:
      int32 [C] sorted item rows: C = clip(floor(fraction * A), 1, A - 1) of the A items with interactions
      (`tail_counts` of A), so at least one item stays warm; empty when fraction is 0 or A < 2.
    """
    active = np.flatnonzero(np.bincount(item, minlength=num_items) > 0)
    num_cold = int(tail_counts(np.array([active.size]), fraction)[0])
    perm = np.random.default_rng(seed).permutation(active.size)
    return np.sort(active[perm[:num_cold]]).astype(np.int32)


def hold_out_items(user: np.ndarray, item: np.ndarray, ts: np.ndarray, train_idx: np.ndarray,
                   valid_idx: np.ndarray | None, test_idx: np.ndarray, cold_items: np.ndarray):
    """Moves every train and valid row of `cold_items` into test.

    Args:
      user, item, ts: [N] columns the index arrays point into.
      train_idx, valid_idx, test_idx: row indices of each split (valid may be None), each in (user, time) order.
      cold_items: int [C] item rows to hold out.

    Returns:
      (train_idx, valid_idx, test_idx, moved): the new splits, test still in (user, time) order (a moved row
      follows a test row of the same user and timestamp), and how many rows moved.
    """
    moved = []
    kept = []
    for idx in (train_idx, valid_idx):
        if idx is None:
            kept.append(None)
            continue
        cold = np.isin(item[idx], cold_items)
        kept.append(idx[~cold])
        moved.append(idx[cold])
    merged = np.concatenate([test_idx, *moved])
    # Stable ordering keeps ties in input order, so the split stays reproducible without a seed.
    test_idx = merged[canonical_order(user[merged], ts[merged], tie_seed=None)]
    return kept[0], kept[1], test_idx, int(sum(m.size for m in moved))
