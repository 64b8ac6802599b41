"""Per-segment metrics and popularity bias, in pure numpy.

Segments answer "for whom and for which items does the model work":

- User activity: users bucketed by the number of training interactions, with fixed edges (default
  ``[1, 5, 10, 20, 50]`` gives buckets 0, 1-4, 5-9, 10-19, 20-49 and 50+); each bucket reports the mean of the
  usual per-user metrics over its users.
- Item popularity: items ranked by training interactions (ties by item id) and cut by cumulative share of the
  training interactions. With the default share edges ``[0.5, 0.8]``: *head* = the most popular items that make
  up the first 50% of interactions (the item that crosses 50% is head), *torso* = the next 30% (up to 80%),
  *tail* = the remaining 20%. Items with no training interaction form a separate *cold* segment. A segment's
  recall@k is computed on the held-out items of that segment only: |top-k ∩ H_seg| / |H_seg|, averaged over
  users with at least one held-out item in the segment.

Popularity bias compares the popularity percentile of what is recommended with that of what users actually
interacted with in the held-out split. An item's percentile is its mid-rank among all items by training count
(0 = least popular, 100 = most popular; ties share the mean rank).
"""
from __future__ import annotations

import numpy as np

from eval.metrics import PAD, evaluate_rankings, per_user_metrics

ITEM_SEGMENTS = ("head", "torso", "tail", "cold")


def activity_buckets(lengths, edges) -> tuple[list[str], np.ndarray]:
    """Buckets users by training-history length.

    Args:
      lengths: int[Q] training interactions per user.
      edges: increasing positive ints; bucket i holds lengths in [edges[i-1], edges[i]), with a leading bucket
        for lengths below edges[0] (``"0"`` when edges[0] == 1) and a trailing open bucket ``"{last}+"``.

    Returns:
      (labels, bucket int64[Q]): one label per bucket (len(edges) + 1) and each user's bucket index.
    """
    edges = [int(e) for e in edges]
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"activity edges must be increasing ints >= 1, got {edges}")
    bounds = [0] + edges
    labels = [str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(bounds, bounds[1:])]
    labels.append(f"{edges[-1]}+")
    return labels, np.searchsorted(np.asarray(edges), np.asarray(lengths), side="right").astype(np.int64)


def popularity_segments(item_counts, share_edges=(0.5, 0.8)) -> np.ndarray:
    """Item segment ids by cumulative interaction share: 0 head, 1 torso, 2 tail, 3 cold (no training data).

    Args:
      item_counts: int[N] training interactions per item.
      share_edges: two increasing cut-offs in (0, 1) of the cumulative share (head/torso, torso/tail).

    Returns:
      int8[N] segment id per item (names in ``ITEM_SEGMENTS``).
    """
    counts = np.asarray(item_counts, dtype=np.float64)
    lo, hi = (float(x) for x in share_edges)
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"share edges must satisfy 0 < head < torso < 1, got {list(share_edges)}")
    order = np.argsort(-counts, kind="stable")
    total = counts.sum()
    # Share of interactions held by the items ranked strictly before each item.
    before = (np.cumsum(counts[order]) - counts[order]) / max(total, 1.0)
    seg_sorted = np.where(before < lo, 0, np.where(before < hi, 1, 2))
    seg = np.empty(counts.size, np.int8)
    seg[order] = seg_sorted
    seg[counts == 0] = 3
    return seg


def restrict_csr(indptr, items, keep) -> tuple[np.ndarray, np.ndarray]:
    """The CSR with only the items where ``keep[item]`` is true (rows kept, possibly emptied).

    Args:
      indptr: int64[R + 1]. items: int[nnz]. keep: bool[N].

    Returns:
      (indptr int64[R + 1], items int32[nnz'])
    """
    indptr, items = np.asarray(indptr, dtype=np.int64), np.asarray(items)
    mask = np.asarray(keep)[items]
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    new_indptr = np.zeros_like(indptr)
    np.cumsum(np.bincount(rows[mask], minlength=indptr.size - 1), out=new_indptr[1:])
    return new_indptr, items[mask].astype(np.int32)


def user_segment_metrics(rankings: dict, truth_indptr, truth_items, ks, lengths, edges) -> list[dict]:
    """Mean recall@k / ndcg@k / hitrate@k per user-activity bucket for each ranking.

    Args:
      rankings: {method: int[Q, K] ranked ids}, rows aligned with the truth CSR.
      truth_indptr: int64[Q + 1] held-out CSR. truth_items: int[nnz].
      ks: cut-offs. lengths: int[Q] training interactions per user. edges: bucket edges (``activity_buckets``).

    Returns:
      one dict per non-empty bucket: {"name", "num_users", "metrics": {method: {"recall@10": ...}}}.
    """
    labels, bucket = activity_buckets(lengths, edges)
    wanted = [f"{m}@{k}" for m in ("recall", "ndcg", "hitrate") for k in ks]
    per_method = {name: per_user_metrics(r, truth_indptr, truth_items, ks) for name, r in rankings.items()}
    has_truth = np.diff(np.asarray(truth_indptr)) > 0  # metrics are NaN for users without held-out items
    out = []
    for i, label in enumerate(labels):
        valid = (bucket == i) & has_truth
        if not valid.any():
            continue
        metrics = {name: {key: float(table[key][valid].mean()) for key in wanted}
                   for name, table in per_method.items()}
        out.append({"name": label, "num_users": int(valid.sum()), "metrics": metrics})
    return out


def item_segment_metrics(rankings: dict, truth_indptr, truth_items, ks, item_counts, share_edges) -> list[dict]:
    """Recall@k on the held-out items of each item-popularity segment, for each ranking.

    Args:
      rankings: {method: int[Q, K]}, rows aligned with the truth CSR.
      truth_indptr: int64[Q + 1]. truth_items: int[nnz].
      ks: cut-offs. item_counts: int[N] training interactions per item. share_edges: see ``popularity_segments``.

    Returns:
      one dict per segment with held-out items: {"name", "num_items", "train_share", "num_heldout",
      "num_users", "metrics": {method: {"recall@k": ...}}}.
    """
    counts = np.asarray(item_counts)
    seg = popularity_segments(counts, share_edges)
    truth_items = np.asarray(truth_items)
    total = max(int(counts.sum()), 1)
    out = []
    for sid, name in enumerate(ITEM_SEGMENTS):
        keep = seg == sid
        sub_indptr, sub_items = restrict_csr(truth_indptr, truth_items, keep)
        if sub_items.size == 0:
            continue
        metrics = {}
        for method, ranked in rankings.items():
            full = evaluate_rankings(ranked, sub_indptr, sub_items, ks)
            metrics[method] = {f"recall@{k}": full[f"recall@{k}"] for k in ks}
        out.append({"name": name, "num_items": int(keep.sum()), "train_share": float(counts[keep].sum() / total),
                    "num_heldout": int(sub_items.size), "num_users": int((np.diff(sub_indptr) > 0).sum()),
                    "metrics": metrics})
    return out


def popularity_percentile(item_counts) -> np.ndarray:
    """float64[N] mid-rank percentile of each item by training count, in [0, 100]."""
    counts = np.asarray(item_counts)
    n = counts.size
    ordered = np.sort(counts)
    below = np.searchsorted(ordered, counts, side="left")
    equal = np.searchsorted(ordered, counts, side="right") - below
    return 100.0 * (below + 0.5 * (equal - 1)) / max(n - 1, 1)


def popularity_bias(rankings: dict, truth_items, item_counts, ks, bins: int = 10) -> dict:
    """Popularity percentile of recommended items (per method and k) against held-out items.

    Args:
      rankings: {method: int[Q, K]}. truth_items: int[nnz] held-out items of the evaluated users.
      item_counts: int[N] training interactions per item. ks: cut-offs. bins: histogram bins over [0, 100].

    Returns:
      {"heldout": {"mean_percentile", "histogram"}, "methods": {method: {"mean_percentile@k": ...,
      "histogram@k": [...] }}}; histograms are fractions per bin.
    """
    pct = popularity_percentile(item_counts)
    edges = np.linspace(0.0, 100.0, bins + 1)

    def describe(values: np.ndarray) -> tuple[float, list[float]]:
        hist, _ = np.histogram(values, bins=edges)
        return float(values.mean()) if values.size else float("nan"), (hist / max(values.size, 1)).tolist()

    held_mean, held_hist = describe(pct[np.asarray(truth_items)])
    methods = {}
    for name, ranked in rankings.items():
        entry = {}
        for k in ks:
            top = np.asarray(ranked)[:, :k]
            mean, hist = describe(pct[top[top != PAD]])
            entry[f"mean_percentile@{k}"], entry[f"histogram@{k}"] = mean, hist
        methods[name] = entry
    return {"bin_edges": edges.tolist(), "heldout": {"mean_percentile": held_mean, "histogram": held_hist},
            "methods": methods}
