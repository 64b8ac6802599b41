"""Ordering interactions in time and splitting them per user.

Rules (also in the README):

* Canonical order: by user, then timestamp; equal timestamps are ordered by a permutation seeded with
  `split_seed` (temporal split) or kept in file order (given split).
* Temporal split: a user with n >= 2 interactions gets n_test = max(1, floor(test_fraction * n)), capped at n - 1
  so at least one train interaction remains; their last n_test interactions are test. A user with a single
  interaction keeps it in train. test_fraction = 0 gives no test rows.
* Validation: the same rule with `valid_fraction`, applied to each user's train part (its latest interactions).
"""
from __future__ import annotations

import numpy as np

# floor(f * n) of e.g. 0.29 * 100 is 28.999999999999996 in floating point; the guard keeps it at 29.
_FLOOR_EPS = 1e-9


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


def canonical_order(user: np.ndarray, ts: np.ndarray, *, tie_seed: int | None) -> np.ndarray:
    """Row order by (user, timestamp) with ties broken reproducibly.

    Args:
      user: int [N] user rows.
      ts: int64 [N] timestamps.
      tie_seed: seed of the permutation that orders equal timestamps of a user; None keeps input order.

    Returns:
      int64 [N] permutation of 0..N-1.
    """
    n = user.shape[0]
    if _sorted_without_ties(user, ts):
        return np.arange(n, dtype=np.int64)
    if tie_seed is None:
        return _stable_order(user, ts)
    perm = np.random.default_rng(tie_seed).permutation(n)
    return perm[_stable_order(user[perm], ts[perm])]


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
