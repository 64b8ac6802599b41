"""Non-learned ranking baselines for offline evaluation, in numpy.

``most_popular_topk`` ranks the catalogue by training popularity and gives every user the k most popular items
they have not interacted with. A learned model that does not beat it is not learning anything personal.

EASE (Steck, 2019: a closed-form item-item linear model) belongs here too; it is tracked as a separate task.
"""

from __future__ import annotations

import numpy as np

from eval.metrics import PAD, csr_pairs, sorted_unique


def most_popular_topk(item_counts, users, k: int, *, exclude_indptr=None, exclude_items=None) -> np.ndarray:
    """The k most popular items per user, skipping the user's excluded items; ties go to the smaller item id.

    Vectorised: with the user's excluded items at sorted popularity ranks e_0 < e_1 < ..., the j-th eligible
    item sits at rank ``j + #{i : e_i - i <= j}`` (``e_i - i`` counts the eligible items ranked before e_i), so
    a cumulative histogram of e_i - i per user places every result without a per-user loop.

    Args:
      item_counts: float or int[N] popularity of each item (e.g. training interaction counts).
      users: int[Q] CSR rows of the users to rank for (repeats allowed).
      k: results per user, in [1, N].
      exclude_indptr: optional int64[R + 1] CSR offsets of the items to exclude per user.
      exclude_items: optional int[nnz] excluded item ids, each in [0, N).

    Returns:
      ids int32[Q, k], most popular first; ``-1`` pads rows with fewer than k eligible items.
    """
    counts = np.asarray(item_counts)
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.number):
        raise ValueError(f"item_counts must be a non-empty 1-D numeric array [N], got shape {counts.shape} "
                         f"dtype {counts.dtype}")
    if not np.all(np.isfinite(counts)):
        raise ValueError("item_counts holds NaN or inf values")
    n = counts.size
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N={n}] (N = len(item_counts)), got k={k!r}")
    users = np.asarray(users)
    if users.ndim != 1 or not (np.issubdtype(users.dtype, np.integer) or users.size == 0):
        raise ValueError(f"users must be a 1-D integer array [Q], got shape {users.shape} dtype {users.dtype}")
    # Stable sort of the negated counts: most popular first, equal counts by smaller item id.
    order = np.argsort(-counts.astype(np.float64), kind="stable")
    q = users.size
    if (exclude_indptr is None) != (exclude_items is None):
        raise ValueError("pass exclude_indptr and exclude_items together (a CSR of items to exclude), or neither")
    if exclude_indptr is None:
        return np.broadcast_to(order[:k].astype(np.int32), (q, k)).copy()

    rows, items, _ = csr_pairs(exclude_indptr, exclude_items, users, num_cols=n, name="exclusions")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    # Sorted, de-duplicated (user, excluded rank) keys; duplicates would be counted twice otherwise.
    keys = sorted_unique(rows * n + rank[items])
    key_rows, key_ranks = keys // n, keys % n
    row_start = np.searchsorted(key_rows, np.arange(q))
    eligible_before = key_ranks - (np.arange(keys.size) - row_start[key_rows])
    # skipped[u, j] = #{i : e_i - i <= j}: a per-user histogram of e_i - i (only values < k matter), summed up.
    near = eligible_before < k
    hist = np.bincount(key_rows[near] * k + eligible_before[near], minlength=q * k).reshape(q, k)
    position = np.arange(k) + np.cumsum(hist, axis=1)
    out = np.full((q, k), PAD, np.int32)
    valid = position < n
    out[valid] = order[position[valid]]
    return out
