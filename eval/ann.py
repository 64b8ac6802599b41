"""Approximate top-k with ScaNN for the evaluation run, and the overlap of approximate with exact results.

The searcher is configured and built by the rule the serving index follows (`towers.inference.search`'s
`scann_settings` and `build_scann_searcher`: a k-means tree with about sqrt(N) leaves, anisotropic asymmetric
hashing and exact re-scoring of the best candidates), and searched with exclusions as serving searches it
(`topk_excluding`: over-fetch, drop the user's excluded items, widen for users left short, exact past that), so
the ANN metrics measure what serving would return. Below ``brute_force_below`` items ScaNN's brute-force
scorer is used: it is faster there, and the tree needs more items than leaves.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from data.types import PAD, csr_pairs
from towers.inference.search import (build_scann_searcher, default_overfetch, exact_topk_host, import_scann,
                                     scann_settings, topk_excluding, widened_leaves)

INSTALL_HINT = "ScaNN is needed for the ANN metrics; install it, or run with ann.enabled=false"


# The settings recorded in the report (training sample size and threads do not change what is measured).
_REPORTED = ("mode", "num_leaves", "num_leaves_to_search", "dimensions_per_block",
             "anisotropic_quantization_threshold", "reorder")


@dataclasses.dataclass
class AnnIndex:
    """A built ScaNN searcher and how it was configured.

    Attributes:
      searcher: the ``scann_ops_pybind.ScannSearcher``.
      item_emb: float32[N, D] the indexed embeddings (row n is item id n), for users answered exactly.
      num_items: N, the rows indexed.
      params: the settings used (mode "brute_force" or "tree_ah", leaves, reorder, ...), for the report.
      build_seconds: wall time of the build.
    """
    searcher: object
    item_emb: np.ndarray
    num_items: int
    params: dict
    build_seconds: float


def _import_scann():
    try:
        return import_scann()
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e


def build_index(item_emb, k: int = 100, *, brute_force_below: int = 20_000, num_leaves: int | None = None,
                num_leaves_to_search: int | None = None, dimensions_per_block: int = 2,
                anisotropic_quantization_threshold: float = 0.2, reorder: int | None = None,
                training_sample_size: int = 100_000) -> AnnIndex:
    """Builds a dot-product ScaNN index over the item embeddings.

    Args:
      item_emb: float[N, D] item embeddings; row n is item id n.
      k: the searcher's default number of neighbours (each search passes its own).
      brute_force_below: use exact brute-force scoring when N is below this.
      num_leaves: k-means leaves; None = round(sqrt(N)).
      num_leaves_to_search: leaves probed per query; None = a tenth of the leaves (at least 1).
      dimensions_per_block: dimensions per asymmetric-hashing block.
      anisotropic_quantization_threshold: anisotropic quantization threshold.
      reorder: candidates re-scored exactly; None = 4 * k (searches raise it to 2x their own k when larger).
      training_sample_size: items sampled to train the tree and the quantizer.

    Returns:
      the built ``AnnIndex``.
    """
    _import_scann()  # first, for the hint that names ann.enabled=false
    db = np.ascontiguousarray(item_emb, dtype=np.float32)
    if db.ndim != 2 or db.shape[0] < 1:
        raise ValueError(f"item_emb must be a non-empty [N, D] array, got shape {db.shape}")
    n = db.shape[0]
    k = max(1, min(int(k), n))
    t0 = time.perf_counter()
    try:
        settings = scann_settings(n, num_leaves=num_leaves, num_leaves_to_search=num_leaves_to_search,
                                  dimensions_per_block=dimensions_per_block,
                                  anisotropic_quantization_threshold=anisotropic_quantization_threshold,
                                  reorder=reorder or 4 * k, training_sample_size=training_sample_size,
                                  brute_force_below=brute_force_below)
    except ValueError as e:
        raise ValueError(f"ann: {e} (ann.num_leaves, ann.brute_force_below)") from None
    searcher = build_scann_searcher(db, settings, k)
    params = {key: settings[key] for key in _REPORTED if key in settings}
    return AnnIndex(searcher, db, n, params, round(time.perf_counter() - t0, 3))


def ann_topk(index: AnnIndex, user_emb, k: int, *, exclude_indptr=None, exclude_items=None,
             users=None) -> np.ndarray:
    """Approximate top-k item ids per user with the user's excluded items filtered out.

    Args:
      index: from ``build_index``.
      user_emb: float[Q, D] user embeddings.
      k: results per user, in [1, N].
      exclude_indptr: optional int64[R + 1] CSR offsets of the items to exclude (e.g. training items).
      exclude_items: optional int[nnz] excluded item ids.
      users: optional int[Q] CSR row of each user; None = rows align with the CSR (R == Q).

    Returns:
      int32[Q, k] item ids, best first by the index's scores; ``-1`` pads rows with fewer than k results.
    """
    queries = np.ascontiguousarray(user_emb, dtype=np.float32)
    q, n = queries.shape[0], index.num_items
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    ex_indptr = ex_items = None
    if exclude_indptr is not None:
        rows, cols, num_rows = csr_pairs(exclude_indptr, exclude_items, users, num_cols=n, name="exclusions")
        if num_rows != q:
            raise ValueError(f"the exclusion CSR selects {num_rows} rows but user_emb has {q} rows")
        ex_indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=q))]).astype(np.int64)
        ex_items = cols
    tree = index.params["mode"] == "tree_ah"

    def ann(batch, fetch, attempt):
        pre = max(index.params.get("reorder", 0), 2 * fetch) if tree else None
        leaves = widened_leaves(index.params["num_leaves_to_search"], index.params["num_leaves"], attempt) \
            if tree else None
        ids, scores = index.searcher.search_batched_parallel(batch, final_num_neighbors=fetch,
                                                             pre_reorder_num_neighbors=pre, leaves_to_search=leaves)
        return scores, ids

    def exact(rows, sub_indptr, sub_items):
        return exact_topk_host(queries[rows], index.item_emb, int(k), sub_indptr, sub_items)

    counts = np.zeros(q, np.int64) if ex_indptr is None else np.diff(ex_indptr)
    _, ids, _ = topk_excluding(ann, exact, queries, int(k), ex_indptr, ex_items, num_items=n,
                               overfetch=default_overfetch(counts))
    return ids.astype(np.int32)


def overlap_at_k(approx, exact, ks) -> dict[str, float]:
    """Mean fraction of the exact top-k that the approximate top-k also returns ("ANN recall" against exact).

    Args:
      approx: int[Q, K] approximate ids (-1 padded).
      exact: int[Q, K'] exact ids (-1 padded), K' >= max(ks).
      ks: cut-offs.

    Returns:
      ``{"overlap@k": mean over users with a non-empty exact top-k}`` per k.
    """
    approx, exact = np.asarray(approx, dtype=np.int64), np.asarray(exact, dtype=np.int64)
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"approx {approx.shape} and exact {exact.shape} must have the same number of rows")
    width = int(max(approx.max(initial=0), exact.max(initial=0))) + 1
    rows = np.arange(exact.shape[0], dtype=np.int64)[:, None]
    out = {}
    for k in ks:
        a, e = approx[:, :k], exact[:, :k]
        # Membership by sorted (row, id) keys: a [Q, k, k] comparison would take Q * k² bytes.
        exact_keys = np.sort((rows * width + e)[e != PAD])
        keys = rows * width + a
        pos = np.minimum(np.searchsorted(exact_keys, keys), max(exact_keys.size - 1, 0))
        found = (a != PAD) & (exact_keys[pos] == keys) if exact_keys.size else np.zeros(a.shape, bool)
        size = (e != PAD).sum(axis=1)
        keep = size > 0
        out[f"overlap@{k}"] = float((found.sum(axis=1)[keep] / size[keep]).mean()) if keep.any() else float("nan")
    return out
