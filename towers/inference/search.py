"""Top-k search by dot product with per-user exclusions: what eval and serve share, besides the blocked JAX
search of `towers.inference.exact` (this module imports no JAX).

- `exact_topk_host`: exact top-k in numpy, for a mutable corpus searched a few queries at a time with any k
  (the serving index), where compiling per corpus size and k would cost more than the search; it returns what
  `towers.inference.exact.exact_topk` returns.
- `scann_settings` / `build_scann_searcher`: how ScaNN is configured for a corpus, for the serving index and
  the evaluation's ANN metrics alike.
- `topk_excluding`: any approximate search made exact in what it returns: over-fetch, drop excluded items,
  search deeper and wider for users left short, and answer users who would need too deep a search exactly.

One tie rule everywhere: equal scores are ordered by the smaller item id (slot) first.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from data.ids import sorted_unique
from data.types import PAD, csr_pairs, sub_csr


# ---------------------------------------------------------------- exact search on the host (serving index)
_SCORE_BYTES = 1 << 28      # exact_topk_host scores at most this many bytes of [queries, items] at once


def exact_topk_host(queries: np.ndarray, emb: np.ndarray, k: int, ex_indptr: np.ndarray | None = None,
                    ex_items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`exact_topk` in numpy: one matmul per query block and a partial sort, no compilation.

    The tie rule holds at the k-th place too: a partial sort keeps an arbitrary subset of the items tied with
    the k-th score, so rows where more items reach that score than fit are ranked again over those items and
    the smaller slots are the ones kept. (Trained float embeddings rarely tie; a few items with equal vectors
    can.)

    Args:
      queries: float32[Q, D]; emb: float32[N, D]; k in [1, N].
      ex_indptr, ex_items: optional CSR aligned with `queries` of the rows of `emb` never to return.
    Returns:
      (scores float32[Q, k] descending, ids int64[Q, k]), equal scores by smaller id first; -inf / -1 past the
      eligible items.
    """
    n = emb.shape[0]
    rows, cols = (np.zeros(0, np.int64),) * 2 if ex_indptr is None else csr_pairs(ex_indptr, ex_items)[:2]
    block = max(1, _SCORE_BYTES // (4 * n))
    out_s, out_i = np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    for a in range(0, len(queries), block):
        s = queries[a:a + block] @ emb.T
        sel = (rows >= a) & (rows < a + block)
        s[rows[sel] - a, cols[sel]] = -np.inf
        if k < n:
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(s, top, axis=1).min(axis=1)
            for r in np.flatnonzero((s >= kth[:, None]).sum(axis=1) > k):
                cand = np.flatnonzero(s[r] >= kth[r])
                top[r] = cand[np.lexsort((cand, -s[r, cand]))[:k]]
        else:
            top = np.tile(np.arange(n), (len(s), 1))
        vals = np.take_along_axis(s, top, axis=1)
        order = np.lexsort((top, -vals))
        out_s[a:a + block] = np.take_along_axis(vals, order, axis=1)
        out_i[a:a + block] = np.take_along_axis(top, order, axis=1)
    out_i[out_s == -np.inf] = PAD
    return out_s, out_i


# ---------------------------------------------------------------- ScaNN
SCANN_HINT = "pip install 'scann>=1.4.2' (Linux wheels for x86-64 and arm64, no TensorFlow needed)"


def import_scann():
    """`scann.scann_ops_pybind`, or an ImportError that says how to install it."""
    try:
        from scann import scann_ops_pybind
    except ImportError as e:
        raise ImportError(f"ScaNN is not installed: {SCANN_HINT} ({e})") from e
    return scann_ops_pybind


def scann_settings(num_items: int, *, num_leaves: int | None = None, num_leaves_to_search: int | None = None,
                   dimensions_per_block: int = 2, anisotropic_quantization_threshold: float = 0.2,
                   reorder: int = 100, training_sample_size: int = 100_000, brute_force_below: int = 20_000,
                   training_threads: int = 0) -> dict:
    """How ScaNN is configured for a corpus of `num_items`: the one rule the serving index and evaluation share.

    Args:
      num_items: N, the corpus size.
      num_leaves: k-means tree leaves; None = round(sqrt(N)) (at least 2).
      num_leaves_to_search: leaves scanned per query; None = ceil(num_leaves / 10); capped at num_leaves.
      dimensions_per_block, anisotropic_quantization_threshold: asymmetric-hashing settings.
      reorder: candidates rescored exactly (the searcher's default; searches may pass their own).
      training_sample_size: points sampled to train the tree and the AH codebooks (capped at N).
      brute_force_below: corpora smaller than this get {"mode": "brute_force"}.
      training_threads: threads for training; 0 = all cores.

    Returns:
      {"mode": "brute_force"}, or {"mode": "tree_ah", "num_leaves", "num_leaves_to_search",
      "dimensions_per_block", "anisotropic_quantization_threshold", "reorder", "training_sample_size",
      "training_threads"} for `build_scann_searcher`.

    Raises:
      ValueError: a tree with at least as many leaves as items.
    """
    if num_items < brute_force_below:
        return {"mode": "brute_force"}
    leaves = num_leaves or max(2, round(math.sqrt(num_items)))
    if leaves >= num_items:
        raise ValueError(f"num_leaves={leaves} must be smaller than the {num_items} items; lower num_leaves or "
                         "raise brute_force_below so this corpus is searched by brute force")
    search = min(leaves, num_leaves_to_search or max(1, math.ceil(leaves / 10)))
    return {"mode": "tree_ah", "num_leaves": leaves, "num_leaves_to_search": search,
            "dimensions_per_block": dimensions_per_block,
            "anisotropic_quantization_threshold": anisotropic_quantization_threshold, "reorder": reorder,
            "training_sample_size": min(num_items, training_sample_size), "training_threads": training_threads}


def build_scann_searcher(db: np.ndarray, settings: dict, num_neighbors: int = 10):
    """A dot-product ScaNN searcher over `db` as `scann_settings` describes it.

    Args:
      db: float32 [N, D] item embeddings, C-contiguous; row n is datapoint n.
      settings: from `scann_settings(N, ...)`. "tree_ah": k-means tree, anisotropic AH, exact reordering;
        "brute_force": ScaNN's brute-force scorer (for callers that want a ScaNN searcher at any size; the
        serving index searches such corpora with `exact_topk_host` instead).
      num_neighbors: the searcher's default k (searches usually pass their own).

    Returns:
      a ``scann_ops_pybind.ScannSearcher``.
    """
    builder = import_scann().builder(db, num_neighbors, "dot_product")
    if settings["mode"] == "brute_force":
        return builder.score_brute_force().build()
    s = settings
    return (builder.tree(num_leaves=s["num_leaves"], num_leaves_to_search=s["num_leaves_to_search"],
                         training_sample_size=s["training_sample_size"])
            .score_ah(s["dimensions_per_block"],
                      anisotropic_quantization_threshold=s["anisotropic_quantization_threshold"],
                      training_sample_size=s["training_sample_size"])
            .reorder(s["reorder"]).set_n_training_threads(s["training_threads"]).build())


def widened_leaves(base: int, num_leaves: int, attempt: int) -> int:
    """Leaves a tree search probes on its `attempt`-th try (0 = the first): 4x more each retry, at most all."""
    return min(num_leaves, base * 4 ** attempt)


# ---------------------------------------------------------------- approximate search with exclusions
@dataclasses.dataclass
class SearchStats:
    """How the users of a search were answered (summed over batches by `add`)."""
    users: int = 0
    widened: int = 0          # needed another, deeper or wider approximate search
    exact_fallback: int = 0   # would have needed a search past max_fetch / max_attempts: searched exactly
    short: int = 0            # fewer than k eligible items exist in the corpus: got all of them

    def add(self, other: "SearchStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def default_overfetch(excluded_counts: np.ndarray) -> int:
    """The first approximate fetch's margin over k: the 90th percentile of the users' exclusion counts int[U]
    (0 when empty), so about nine users in ten need no second fetch."""
    counts = np.asarray(excluded_counts)
    return int(np.ceil(np.percentile(counts, 90))) if counts.size else 0


def rank_keys(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int64 keys whose ascending order is score descending, then id ascending (one argsort, no lexsort).

    The float32 bits are mapped to integers in the same order as the floats; -inf (excluded) sorts last.
    """
    bits = np.ascontiguousarray(scores, np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)    # monotone in the float value
    return (-ordered << 32) + np.maximum(ids, 0)


def _best_eligible(scores, ids, rows, excluded_keys, num_items: int, k: int):
    """From candidates [m, F] of users `rows` (int64[m]), drop excluded and invalid ones (id < 0 or a NaN
    score, ScaNN's padding) and keep the best k by the tie rule.

    Without exclusions and with F <= k, rows the search already returned in that order (nearly all of them)
    are kept as they are: only the others pay for building and sorting rank keys.

    Returns (scores float32[m, k], ids int64[m, k] with -1 past the valid ones, valid counts int64[m]).
    """
    ids = np.asarray(ids, np.int64)
    scores = np.asarray(scores, np.float32)
    valid = (ids >= 0) & np.isfinite(scores)
    if excluded_keys.size:
        keys = rows[:, None] * num_items + np.maximum(ids, 0)
        pos = np.minimum(np.searchsorted(excluded_keys, keys), excluded_keys.size - 1)
        valid &= excluded_keys[pos] != keys
    masked = np.where(valid, scores, -np.inf).astype(np.float32)
    width = min(k, scores.shape[1])
    if excluded_keys.size or width < scores.shape[1]:
        top_s, top_i = _ranked(masked, ids, width)
    else:
        top_s, top_i = masked, ids.copy()
        unsorted = np.flatnonzero(~_in_rank_order(masked, ids))
        if unsorted.size:
            top_s[unsorted], top_i[unsorted] = _ranked(masked[unsorted], ids[unsorted], width)
    top_i[top_s == -np.inf] = PAD
    if width < k:
        pad = ((0, 0), (0, k - width))
        top_s, top_i = np.pad(top_s, pad, constant_values=-np.inf), np.pad(top_i, pad, constant_values=PAD)
    return top_s, top_i, valid.sum(axis=1)


def _ranked(scores: np.ndarray, ids: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `width` of each row of candidates [m, F] by the tie rule (one argsort of `rank_keys`)."""
    order = np.argsort(rank_keys(scores, ids), axis=1, kind="stable")[:, :width]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _in_rank_order(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """bool[m]: whether each row of candidates [m, F] is already in the tie rule's order (each score below the
    one before it, or equal to it with a larger id), so that sorting it would change nothing."""
    s0, s1, i0, i1 = scores[:, :-1], scores[:, 1:], ids[:, :-1], ids[:, 1:]
    return ((s1 < s0) | ((s1 == s0) & (i1 > i0))).all(axis=1)


def _fetch_depth(need: np.ndarray, num_items: int) -> np.ndarray:
    """The widened fetch of each user: `need` rounded up to a power of two (few distinct searches), <= N."""
    return np.minimum(num_items, 1 << np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))


AnnFn = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
ExactFn = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def topk_excluding(ann: AnnFn, exact: ExactFn, queries: np.ndarray, k: int, ex_indptr: np.ndarray | None,
                   ex_items: np.ndarray | None, *, num_items: int, overfetch: int = 0, max_fetch: int | None = None,
                   max_attempts: int = 8) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Top-k eligible items of each query from an approximate search that knows nothing of exclusions.

    Every user first fetches k + `overfetch` candidates and drops their excluded ones. A user left with fewer
    than k (while more are eligible) searches again, deeper (k + their exclusion count, rounded up to a power of
    two: that many candidates always hold k eligible ones) and wider (`attempt` grows, for the search to probe
    more of its index); a user who would need a fetch past `max_fetch`, or more than `max_attempts` tries, is
    answered by `exact`. So every user gets min(k, eligible items), never fewer. Which search answers a user
    depends only on that user's query and exclusions, not on the other users of the batch.

    Args:
      ann: (queries float32[m, D], fetch, attempt) -> (scores float32[m, fetch], ids int[m, fetch]); ids < 0
        or NaN scores mark missing candidates.
      exact: (query rows int64[m] into `queries`, CSR indptr, items of their exclusions) -> (scores, ids) [m, k]
        as `exact_topk` returns them.
      queries: float32[Q, D]. k: in [1, num_items].
      ex_indptr, ex_items: CSR aligned with `queries` of the item ids never to return (repeats allowed), or None.
      num_items: N, the ids' range.
      overfetch: candidates fetched beyond k in the first round.
      max_fetch: deepest approximate fetch; None = N.
      max_attempts: most approximate searches per user.
    Returns:
      (scores float32[Q, k] descending, ids int64[Q, k] with -1 past the eligible items, stats); equal scores by
      smaller id first among the candidates found.
    """
    n, q = num_items, len(queries)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}] (the corpus holds {n} items)")
    max_fetch = n if max_fetch is None else max_fetch
    if ex_indptr is None:
        keys = np.zeros(0, np.int64)
    else:
        rows, cols, num_rows = csr_pairs(ex_indptr, ex_items, num_cols=n, name="exclusions")
        if num_rows != q:
            raise ValueError(f"the exclusion CSR has {num_rows} rows but there are {q} queries")
        keys = rows * n + cols
        if keys.size and not (keys[1:] > keys[:-1]).all():   # callers usually pass sorted, distinct rows
            keys = sorted_unique(keys)
    counts = np.bincount(keys // n, minlength=q).astype(np.int64) if keys.size else np.zeros(q, np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    items = keys - np.repeat(np.arange(q, dtype=np.int64), counts) * n
    want = np.minimum(k, n - counts)
    stats = SearchStats(users=q, short=int((counts > n - k).sum()))
    scores, ids = np.full((q, k), -np.inf, np.float32), np.full((q, k), PAD, np.int64)
    todo = np.arange(q)
    fetch, attempt = np.full(q, min(n, k + overfetch), np.int64), np.zeros(q, np.int64)
    while todo.size:
        deep = (fetch[todo] > max_fetch) | (attempt[todo] >= max_attempts)
        exact_rows, todo = todo[deep], todo[~deep]
        if exact_rows.size:
            stats.exact_fallback += exact_rows.size
            scores[exact_rows], ids[exact_rows] = exact(exact_rows, *sub_csr(indptr, items, exact_rows))
        short = []
        for depth, tries in sorted(set(zip(fetch[todo].tolist(), attempt[todo].tolist()))):
            group = todo[(fetch[todo] == depth) & (attempt[todo] == tries)]
            cand_s, cand_i = ann(queries[group], depth, tries)
            scores[group], ids[group], got = _best_eligible(cand_s, cand_i, group, keys, n, k)
            short.append(group[got < want[group]])
        todo = np.sort(np.concatenate(short)) if short else todo[:0]
        fetch[todo] = np.maximum(fetch[todo], _fetch_depth(k + counts[todo], n))
        attempt[todo] += 1
        stats.widened += int(((fetch[todo] <= max_fetch) & (attempt[todo] < max_attempts)).sum())
    return scores, ids, stats
