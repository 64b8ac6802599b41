"""Ranking metrics for offline retrieval evaluation, in pure numpy (no JAX, no I/O).

Inputs are ranked item ids per user, ``retrieved[Q, K]`` (best first, ``-1`` = "no item", never a hit), and the
held-out items per user as a CSR matrix ``(indptr int64[R+1], items int32[nnz])``, the layout ``data`` uses.

Row selection, shared by every function here and in ``eval.topk`` / ``eval.baselines``: pass the full CSR plus
``users: int[Q]`` (row ``i`` of ``retrieved`` belongs to CSR row ``users[i]``), or leave ``users=None`` when the
CSR is already sliced so that its rows align with the rows of ``retrieved`` (then ``R == Q``).

Definitions (binary relevance; ``H`` = the user's set of distinct held-out items, ``rank`` is 1-based):

- ``recall@k    = |top-k ∩ H| / |H|`` (the LightGCN definition: the denominator is ``|H|``, not ``min(k, |H|)``)
- ``precision@k = |top-k ∩ H| / k``
- ``ndcg@k      = sum_{hits in top-k} 1/log2(rank+1)  /  sum_{rank=1..min(k,|H|)} 1/log2(rank+1)``
- ``hitrate@k   = 1 if top-k ∩ H is non-empty else 0``
- ``mrr@k       = 1/rank of the first hit within the top-k, else 0``

Users with no held-out items have no defined recall; per-user functions return NaN for them and
``evaluate_rankings`` averages over the users with at least one held-out item only.
"""

from __future__ import annotations


import numpy as np

PAD = -1  # id meaning "no item" in ranked lists

_METRICS = ("recall", "ndcg", "hitrate", "mrr", "precision")


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for 1-D int arrays by sort + neighbour compare; numpy 2's hash-based unique is ~5x slower here."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if values.size else values


def _check_csr(indptr, indices, num_cols: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validates a CSR matrix; returns (indptr as int64, indices)."""
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    if indptr.ndim != 1 or indptr.size == 0 or indices.ndim != 1:
        raise ValueError(f"{name}: expected indptr int[R+1] and indices int[nnz], got shapes "
                         f"{indptr.shape} and {indices.shape}")
    if not (np.issubdtype(indptr.dtype, np.integer) and np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(f"{name}: indptr and indices must be integer arrays, got {indptr.dtype} and "
                         f"{indices.dtype}")
    indptr = indptr.astype(np.int64, copy=False)
    if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}: indptr must start at 0, be non-decreasing and end at len(indices)="
                         f"{indices.size}; got indptr[0]={indptr[0]}, indptr[-1]={indptr[-1]}")
    if indices.size and indices.min() < 0:
        raise ValueError(f"{name}: column ids must be >= 0, found {indices.min()}")
    if num_cols is not None and indices.size and indices.max() >= num_cols:
        raise ValueError(f"{name}: column id {indices.max()} is out of range for {num_cols} items")
    return indptr, indices


def csr_pairs(indptr, indices, users=None, *, num_cols: int | None = None,
              name: str = "csr") -> tuple[np.ndarray, np.ndarray, int]:
    """Expands selected CSR rows into (row, column) pairs without a per-row Python loop.

    Args:
      indptr: int[R + 1] row offsets, non-decreasing, ``indptr[0] == 0``, ``indptr[-1] == len(indices)``.
      indices: int[nnz] column ids (item ids), each in ``[0, num_cols)`` when ``num_cols`` is given, else ``>= 0``.
      users: optional int[Q] rows to select (repeats allowed); None selects all R rows in order.
      num_cols: optional upper bound (exclusive) for the column ids, checked.
      name: how the CSR is called in error messages.

    Returns:
      ``(rows int64[M], cols int64[M], num_rows)``: ``rows`` are positions in ``users`` (``0..Q-1``), or CSR
      rows when ``users`` is None; ``num_rows`` is Q (or R).
    """
    indptr, indices = _check_csr(indptr, indices, num_cols, name)
    num_csr_rows = indptr.size - 1
    if users is None:
        rows = np.repeat(np.arange(num_csr_rows, dtype=np.int64), np.diff(indptr))
        return rows, indices.astype(np.int64, copy=False), num_csr_rows
    users = np.asarray(users)
    if users.ndim != 1 or not (np.issubdtype(users.dtype, np.integer) or users.size == 0):
        raise ValueError(f"{name}: users must be a 1-D integer array, got shape {users.shape} "
                         f"dtype {users.dtype}")
    users = users.astype(np.int64, copy=False)
    if users.size and (users.min() < 0 or users.max() >= num_csr_rows):
        raise ValueError(f"{name}: users must be in [0, {num_csr_rows}) (the CSR has {num_csr_rows} rows), "
                         f"got min {users.min()} max {users.max()}")
    starts = indptr[users]
    lengths = indptr[users + 1] - starts
    out_starts = np.cumsum(lengths) - lengths
    # Position of each output element in `indices`: its row's CSR start plus its offset within the row.
    pos = np.arange(lengths.sum(), dtype=np.int64) + np.repeat(starts - out_starts, lengths)
    rows = np.repeat(np.arange(users.size, dtype=np.int64), lengths)
    return rows, indices[pos].astype(np.int64, copy=False), users.size


def _check_retrieved(retrieved) -> np.ndarray:
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2 or not np.issubdtype(retrieved.dtype, np.integer):
        raise ValueError(f"retrieved must be an integer array [Q, K], got shape {retrieved.shape} "
                         f"dtype {retrieved.dtype}")
    retrieved = retrieved.astype(np.int64, copy=False)
    if retrieved.size and retrieved.min() < PAD:
        raise ValueError(f"retrieved ids must be >= 0, or {PAD} for padding; found {retrieved.min()}")
    ordered = np.sort(retrieved, axis=1)
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD)
    if dup.any():
        row = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"retrieved row {row} lists an item more than once ({retrieved[row].tolist()}); "
                         "deduplicate the ranking before computing metrics")
    return retrieved


def _check_ks(ks, num_cols: int) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not ks:
        raise ValueError("ks is empty; pass at least one cut-off, e.g. ks=(10, 20)")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_cols:
            raise ValueError(f"each k must be an int in [1, K={num_cols}] (K = retrieved.shape[1]), got {k!r}; "
                             "retrieve at least max(ks) items")
    return tuple(int(k) for k in ks)


def hit_matrix(retrieved, truth_indptr, truth_items, *, users=None) -> tuple[np.ndarray, np.ndarray]:
    """Marks which retrieved items are held-out items, with one sorted membership test.

    Args:
      retrieved: int[Q, K] ranked item ids, best first; -1 pads and is never a hit. Ids in a row must be distinct.
      truth_indptr: int64[R + 1] CSR offsets of the held-out items.
      truth_items: int[nnz] held-out item ids.
      users: optional int[Q] CSR rows of the Q ranked users; None means ``R == Q`` and rows align.

    Returns:
      ``(hits bool[Q, K], num_truth int64[Q])``; ``num_truth`` counts distinct held-out items.
    """
    retrieved = _check_retrieved(retrieved)
    rows, items, num_rows = csr_pairs(truth_indptr, truth_items, users, name="truth")
    if num_rows != retrieved.shape[0]:
        raise ValueError(f"truth CSR selects {num_rows} rows but retrieved has {retrieved.shape[0]} rows "
                         f"(shape {retrieved.shape}); pass users=... or a CSR sliced to the same users")
    q = retrieved.shape[0]
    if max(retrieved.max(initial=0), items.max(initial=0)) >= 2**32:
        raise ValueError("item ids must be < 2**32 for the (row, item) key encoding")
    # (row, item) -> row * 2^32 + item: one int64 key per pair, so membership is a single sorted search.
    truth_keys = sorted_unique((rows << 32) | items)
    num_truth = np.bincount(truth_keys >> 32, minlength=q).astype(np.int64)
    query = (np.arange(q, dtype=np.int64)[:, None] << 32) | retrieved
    pos = np.minimum(np.searchsorted(truth_keys, query), max(truth_keys.size - 1, 0))
    hits = (retrieved != PAD) & (truth_keys[pos] == query) if truth_keys.size else np.zeros(query.shape, bool)
    return hits, num_truth


def _per_user(hits: np.ndarray, num_truth: np.ndarray, ks: tuple[int, ...]) -> dict[str, dict[int, np.ndarray]]:
    """All metrics from the hit matrix; NaN for users without held-out items."""
    num_cols = hits.shape[1]
    discount = 1.0 / np.log2(np.arange(num_cols, dtype=np.float64) + 2.0)
    cum_hits = np.cumsum(hits, axis=1, dtype=np.float64)
    cum_dcg = np.cumsum(hits * discount, axis=1)
    ideal = np.cumsum(discount)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), num_cols)
    valid = num_truth > 0
    denom = np.where(valid, num_truth, 1).astype(np.float64)
    out = {name: {} for name in _METRICS}
    for k in ks:
        n_hit = cum_hits[:, k - 1]
        idcg = ideal[np.clip(np.minimum(k, num_truth), 1, None) - 1]
        values = {
            "recall": n_hit / denom,
            "ndcg": cum_dcg[:, k - 1] / idcg,
            "hitrate": (n_hit > 0).astype(np.float64),
            "mrr": np.where(first < k, 1.0 / (first + 1.0), 0.0),
            "precision": n_hit / k,
        }
        for name, v in values.items():
            out[name][k] = np.where(valid, v, np.nan)
    return out


def _one_metric(name, retrieved, truth_indptr, truth_items, ks, users) -> dict[int, np.ndarray]:
    hits, num_truth = hit_matrix(retrieved, truth_indptr, truth_items, users=users)
    return _per_user(hits, num_truth, _check_ks(ks, hits.shape[1]))[name]


def recall_at_k(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[int, np.ndarray]:
    """Per-user recall@k = |top-k ∩ held-out| / |held-out|.

    Args:
      retrieved: int[Q, K] ranked item ids, best first, -1 padded.
      truth_indptr: int64[R + 1] held-out CSR offsets.
      truth_items: int[nnz] held-out item ids.
      ks: an int or iterable of ints in [1, K].
      users: optional int[Q] CSR rows of the ranked users (None: rows align, R == Q).

    Returns:
      ``{k: float64[Q]}``; NaN for users with no held-out item.
    """
    return _one_metric("recall", retrieved, truth_indptr, truth_items, ks, users)


def ndcg_at_k(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[int, np.ndarray]:
    """Per-user binary NDCG@k; the ideal DCG is over min(k, |held-out|) ranks. Args as ``recall_at_k``."""
    return _one_metric("ndcg", retrieved, truth_indptr, truth_items, ks, users)


def hit_rate_at_k(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[int, np.ndarray]:
    """Per-user hit rate@k: 1.0 if any held-out item is in the top-k, else 0.0. Args as ``recall_at_k``."""
    return _one_metric("hitrate", retrieved, truth_indptr, truth_items, ks, users)


def mrr_at_k(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[int, np.ndarray]:
    """Per-user reciprocal rank of the first hit within the top-k, else 0. Args as ``recall_at_k``."""
    return _one_metric("mrr", retrieved, truth_indptr, truth_items, ks, users)


def precision_at_k(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[int, np.ndarray]:
    """Per-user precision@k = hits in top-k / k (padding counts as a miss). Args as ``recall_at_k``."""
    return _one_metric("precision", retrieved, truth_indptr, truth_items, ks, users)


def per_user_metrics(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[str, np.ndarray]:
    """Every metric for every user from one membership test, e.g. for per-segment reports.

    Args as ``recall_at_k``.

    Returns:
      ``{"recall@10": float64[Q], "ndcg@10": ..., "hitrate@10", "mrr@10", "precision@10", ...}``,
      NaN for users with no held-out item.
    """
    hits, num_truth = hit_matrix(retrieved, truth_indptr, truth_items, users=users)
    table = _per_user(hits, num_truth, _check_ks(ks, hits.shape[1]))
    return {f"{name}@{k}": values for name, by_k in table.items() for k, values in by_k.items()}


def evaluate_rankings(retrieved, truth_indptr, truth_items, ks, *, users=None) -> dict[str, float]:
    """Mean of every metric over users with at least one held-out item.

    Args as ``recall_at_k``.

    Returns:
      ``{"recall@10": mean, "ndcg@10": ..., "hitrate@10", "mrr@10", "precision@10", ..., "num_users": n}``
      where ``num_users`` is the number of users averaged over.

    Raises:
      ValueError: if no user has a held-out item (nothing to average).
    """
    table = per_user_metrics(retrieved, truth_indptr, truth_items, ks, users=users)
    valid = ~np.isnan(next(iter(table.values())))
    if not valid.any():
        raise ValueError("no user has a held-out item, so there is nothing to evaluate; check the split "
                         "and the users passed")
    out = {key: float(values[valid].mean()) for key, values in table.items()}
    out["num_users"] = float(valid.sum())
    return out


def coverage_at_k(retrieved, num_items: int, k: int) -> float:
    """Fraction of the catalogue that appears in at least one user's top-k.

    Args:
      retrieved: int[Q, K] ranked item ids, -1 padded.
      num_items: catalogue size N; ids must be < N.
      k: cut-off in [1, K].

    Returns:
      ``|union of top-k lists| / num_items``.
    """
    retrieved = _check_retrieved(retrieved)
    (k,) = _check_ks(k, retrieved.shape[1])
    if num_items < 1:
        raise ValueError(f"num_items must be >= 1, got {num_items}")
    top = retrieved[:, :k]
    top = top[top != PAD]
    if top.size and top.max() >= num_items:
        raise ValueError(f"retrieved holds item id {top.max()} but num_items={num_items}")
    seen = np.zeros(num_items, dtype=bool)
    seen[top] = True
    return float(seen.mean())
