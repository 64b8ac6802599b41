"""Approximate top-k with ScaNN for the evaluation run, and the overlap of approximate with exact results.

The searcher is configured and built by the serving index's rule (`serve.index.scann_settings` and
`build_scann_searcher`: a k-means tree with about sqrt(N) leaves, anisotropic asymmetric hashing and exact
re-scoring of the best candidates), so the ANN metrics measure the index that serving would build. Below
``brute_force_below`` items ScaNN's brute-force scorer is used: it is faster there, and the tree needs more
items than leaves.

Searching with exclusions: the index knows nothing of a user's training items, so each user asks for k plus the
number of items they exclude and the excluded ones are dropped afterwards. Users are grouped by that count
(rounded up to a power of two) so that one heavy user does not make every query fetch hundreds of neighbours.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from eval.metrics import PAD, csr_pairs, sorted_unique
from serve.scann_index import build_scann_searcher, scann_settings

INSTALL_HINT = ("ScaNN is needed for the ANN metrics: `pip install 'scann>=1.4.2'` (Linux wheels for x86-64 "
                "and arm64, no TensorFlow needed), or run with ann.enabled=false")


# The settings recorded in the report (training sample size and threads do not change what is measured).
_REPORTED = ("mode", "num_leaves", "num_leaves_to_search", "dimensions_per_block",
             "anisotropic_quantization_threshold", "reorder")


@dataclasses.dataclass
class AnnIndex:
    """A built ScaNN searcher and how it was configured.

    Attributes:
      searcher: the ``scann_ops_pybind.ScannSearcher``.
      num_items: N, the rows indexed (row n is item id n).
      params: the settings used (mode "brute_force" or "tree_ah", leaves, reorder, ...), for the report.
      build_seconds: wall time of the build.
    """
    searcher: object
    num_items: int
    params: dict
    build_seconds: float


def _import_scann():
    try:
        import scann  # noqa: PLC0415 - optional at import time of this package
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return scann


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
    return AnnIndex(searcher, n, params, round(time.perf_counter() - t0, 3))


def _fetch_sizes(counts: np.ndarray, k: int, n: int) -> np.ndarray:
    """Neighbours to fetch per user: k plus the exclusion count rounded up to a power of two, at most N."""
    extra = np.where(counts > 0, 2 ** np.ceil(np.log2(np.maximum(counts, 1))), 0).astype(np.int64)
    return np.minimum(k + extra, n)


def _drop_excluded(found: np.ndarray, rows: np.ndarray, ex_keys: np.ndarray, n: int, k: int) -> np.ndarray:
    """Keeps the first k found ids of each row that are not excluded; -1 pads short rows.

    found: int64[G, F] ids (-1 = nothing found); rows: int64[G] the users' positions; ex_keys: sorted
    position * n + item keys of the excluded pairs.
    """
    keys = rows[:, None] * n + found
    pos = np.minimum(np.searchsorted(ex_keys, keys), max(ex_keys.size - 1, 0))
    bad = (found < 0) | ((ex_keys[pos] == keys) if ex_keys.size else False)
    order = np.argsort(bad, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(found, order, axis=1)
    return np.where(np.take_along_axis(bad, order, axis=1), PAD, kept)


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
    if exclude_indptr is None:
        rows, cols = np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        rows, cols, num_rows = csr_pairs(exclude_indptr, exclude_items, users, num_cols=n, name="exclusions")
        if num_rows != q:
            raise ValueError(f"the exclusion CSR selects {num_rows} rows but user_emb has {q} rows")
    ex_keys = sorted_unique(rows * n + cols)
    counts = np.bincount(ex_keys // n, minlength=q) if ex_keys.size else np.zeros(q, np.int64)
    fetch = _fetch_sizes(counts, int(k), n)
    out = np.full((q, k), PAD, np.int32)
    for size in np.unique(fetch):
        group = np.flatnonzero(fetch == size)
        pre = max(index.params.get("reorder", 0), 2 * int(size)) if index.params["mode"] == "tree_ah" else None
        found, scores = index.searcher.search_batched_parallel(queries[group], final_num_neighbors=int(size),
                                                               pre_reorder_num_neighbors=pre)
        # When the probed leaves hold fewer than `size` items, ScaNN pads with id 0 and a NaN score.
        found = np.where(np.isnan(scores), PAD, np.asarray(found, dtype=np.int64))
        out[group, :] = _drop_excluded(found, group.astype(np.int64), ex_keys, n, int(k))
    return out


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
