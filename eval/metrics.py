"""Ranking metrics for offline retrieval evaluation, in pure numpy (no JAX, no I/O).

Inputs are ranked item ids per user, ``retrieved[Q, K]`` (best first, ``-1`` = "no item", never a hit), and the
held-out items per user as a CSR matrix ``(indptr int64[R+1], items int32[nnz])``, the layout ``data`` uses.

Row selection (`data.types.csr_pairs`), shared by every function here, ``eval.baselines`` and the search of
``towers.inference.search``: pass the full CSR plus
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

from data.types import PAD, csr_pairs

_METRICS = ("recall", "ndcg", "hitrate", "mrr", "precision")


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique for 1-D int arrays by sort + neighbour compare; numpy 2's hash-based unique is ~5x slower here."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if values.size else values


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


def intra_list_distance(retrieved, item_emb, k: int, *, user_block: int = 4096) -> np.ndarray:
    """Per-user mean pairwise cosine distance ``1 - cos(e_a, e_b)`` over the distinct pairs of its top-k items.

    Args:
      retrieved: int[Q, K] ranked item ids, -1 padded (padding takes part in no pair).
      item_emb: float[N, d] item embeddings (normalised here).
      k: cut-off in [1, K].
      user_block: users per block (the block's [users, k, k] cosines are held at once).
    Returns:
      float64[Q]; NaN for a user with fewer than 2 items in its top-k.
    """
    retrieved = _check_retrieved(retrieved)
    (k,) = _check_ks(k, retrieved.shape[1])
    emb = np.asarray(item_emb, np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = np.full(len(retrieved), np.nan)
    for a in range(0, len(retrieved), user_block):
        top = retrieved[a:a + user_block, :k]
        valid = top != PAD
        e = emb[np.maximum(top, 0)] * valid[..., None]
        cos = np.einsum("qid,qjd->qij", e, e)
        n = valid.sum(axis=1).astype(np.float64)
        pairs = n * (n - 1)
        # Each valid item's self-cosine is 1 (padding rows are zero): off-diagonal sum = total - n.
        off = cos.sum(axis=(1, 2)) - n
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + user_block] = np.where(pairs > 0, 1.0 - off / np.where(pairs > 0, pairs, 1), np.nan)
    return out


def distinct_categories(retrieved, item_categories, k: int) -> np.ndarray:
    """Per-user number of distinct categories among its top-k items.

    Args:
      retrieved: int[Q, K] ranked item ids, -1 padded.
      item_categories: int[N] or int[N, L] category ids of each item, -1 padded (e.g. a multi-hot genre bag).
      k: cut-off in [1, K].
    Returns:
      int64[Q].
    """
    retrieved = _check_retrieved(retrieved)
    (k,) = _check_ks(k, retrieved.shape[1])
    cats = np.asarray(item_categories)
    cats = cats[:, None] if cats.ndim == 1 else cats
    top = retrieved[:, :k]
    c = np.where((top != PAD)[..., None], cats[np.maximum(top, 0)], PAD).reshape(len(top), -1)
    c = np.sort(c, axis=1)
    new = np.ones_like(c, bool)
    new[:, 1:] = c[:, 1:] != c[:, :-1]
    return (new & (c != PAD)).sum(axis=1).astype(np.int64)


def diversity_metrics(retrieved, item_emb, k: int, item_categories=None) -> dict[str, float]:
    """Beyond-accuracy metrics of the top-k lists: ``coverage@k`` (`coverage_at_k`), ``ild@k`` (mean over users of
    `intra_list_distance`) and, with `item_categories`, ``categories@k`` (mean of `distinct_categories`)."""
    out = {f"coverage@{k}": coverage_at_k(retrieved, len(item_emb), k),
           f"ild@{k}": float(np.nanmean(intra_list_distance(retrieved, item_emb, k)))}
    if item_categories is not None:
        out[f"categories@{k}"] = float(distinct_categories(retrieved, item_categories, k).mean())
    return out
