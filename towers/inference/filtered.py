"""Filtered top-k for conditional retrieval: each query asks only for the items holding its condition value (a
code of one item categorical or multihot feature, e.g. a genre). Host numpy, no JAX import.

ScaNN's Python API takes no filter (restricts exist only in its C++ config), so the filter is ours. The options:

- one ANN index per value: as many builds, trees and copies of the vectors as values (times the values per
  item for a multihot feature), and every upsert touches several indexes;
- the ANN over the whole corpus, keeping only the value's items (post-filtering): a value holding a share s of
  the corpus needs about k / s candidates, cheap for large values, hopeless for a value of a few hundred items
  in a million;
- exact search over the value's items (gather and one matmul): cost proportional to the value's size, cheap
  for small values, the whole corpus for large ones.

We combine the last two at a size threshold, over one inverted list value -> sorted item slots
(`ConditionLists`) and one ANN index shared with unfiltered search. Values with at most `exact_below` items are
searched exactly over their items: every query of one value in one matmul, the gathered vectors of a value kept
(up to `cache_bytes`) so a single query does not pay for the gather again. Larger values go through
`towers.inference.search.topk_excluding` in the value's own numbering (position in its sorted slot list): the
ANN over the whole corpus fetches `overfetch` / share times the candidates the value needs, doubled on each
retry while the ANN probes wider, keeps the value's items, and queries still short (the value's items are rarer
near the query than in the corpus) or needing a fetch past `max_ann_fetch` are answered exactly over the
value's items. So `k` is always filled when the value holds >= k eligible items; fewer come back only when
fewer exist. The ANN is told the value's share: a rare value's best items lie further out among the query's
neighbours than the unfiltered top k, so a tree probes more leaves for it (`serve.scann_index`), or they are
missed without the search ever coming back short. Because a value's slot list is sorted, its numbering keeps
the slot order: equal scores come by smaller slot first, the tie rule of `towers.inference.search`.

Where the threshold lies: exactly, a value costs its size; through the ANN, the probed leaves plus the exact
rescoring of about 10 k / share candidates (the whole-corpus neighbours the value's k best hide among). The
second grows as the value shrinks: on 1M x 64 items with k = 20 (2 shared cores, one BLAS thread) a single
query costs about the same both ways near 50,000 items (5% of the corpus); a value of 28,000 took 0.5 ms
exactly against 3-8 ms through the ANN, one of 424,000 took 15 ms exactly against 0.7-0.9 ms. An over-fetch
of 4 leaves almost no query short (a retry probes 4x the leaves: dearer than fetching deeper at once). Both
defaults come from `scripts/bench_serve.py --filtered` (BENCHMARKS.md, "Filtered search for conditional
retrieval").
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Callable

import numpy as np

from data.types import PAD, csr_pairs
from towers.inference.search import exact_topk_host, topk_excluding



# (queries float32[m, D], fetch, attempt, share) -> (scores float32[m, fetch], slots int[m, fetch]) over the whole
# corpus: `share` is the fraction of the corpus the queries' value holds, so a partitioned ANN can probe more of
# its partitions for a rare value (its top items lie further out among the query's neighbours).
FilteredAnnFn = Callable[[np.ndarray, int, int, float], tuple[np.ndarray, np.ndarray]]


class ConditionValueError(ValueError):
    """A condition value outside the vocabulary of the filtering feature (or filtering without one)."""


def as_codes(codes, num_values: int, what: str = "codes") -> np.ndarray:
    """Per-item condition codes as int32[N, L]: categorical int[N] (values 0..num_values-1) becomes L = 1;
    multihot int[N, L] keeps its width, -1 marking empty slots.

    Raises:
      ValueError: not an integer array of 1 or 2 dimensions, or values outside [-1, num_values) (outside
        [0, num_values) for a 1-D array).
    """
    arr = np.asarray(codes)
    if arr.ndim not in (1, 2) or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ValueError(f"{what} must be an integer array int[N] (categorical) or int[N, L] (multihot, -1 = "
                         f"padding), got shape {arr.shape} dtype {arr.dtype}")
    lo = 0 if arr.ndim == 1 else -1
    if arr.size and (arr.min() < lo or arr.max() >= num_values):
        raise ValueError(f"{what} must lie in [{lo}, {num_values}) (the feature's vocabulary), got "
                         f"[{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr.reshape(len(arr), -1), dtype=np.int32)


class ConditionLists:
    """The inverted list condition value -> item slots (ascending) of a corpus, and the corpus's vectors.

    Built once per corpus state: any change of the codes or of the vectors needs a new one (the serving index
    builds one lazily after each change). Thread-safe for concurrent searches.

    Args:
      codes: per-item codes, int[N] (categorical) or int[N, L] (multihot, -1 = padding); an item may hold a
        value twice (counted once).
      num_values: V, the feature's vocabulary size.
      emb: float32[N, D], row n = slot n, not modified while this object is used.
      cache_bytes: most bytes of gathered vectors kept for the values searched exactly.
    """

    def __init__(self, codes, num_values: int, emb: np.ndarray, cache_bytes: int = 1 << 28):
        codes = as_codes(codes, num_values)
        if len(codes) != len(emb):
            raise ValueError(f"codes hold {len(codes)} items but the embeddings {len(emb)}")
        n, width = codes.shape
        flat = codes.reshape(-1)
        # A stable sort of the values keeps each value's slots ascending (slot-major flattening); 16-bit keys
        # take numpy's radix sort.
        keys = (flat + 1).astype(np.int16 if num_values < 32767 else np.int64)
        order = np.argsort(keys, kind="stable")
        values, slots = flat[order].astype(np.int64), order.astype(np.int64) // width
        keep = values >= 0
        if width > 1:   # a value repeated within an item: the copies are adjacent after the sort
            keep[1:] &= (values[1:] != values[:-1]) | (slots[1:] != slots[:-1])
        values, self.slots = values[keep], slots[keep]
        self.counts = np.bincount(values, minlength=num_values).astype(np.int64)
        self.indptr = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.num_values, self.num_items, self.emb = num_values, n, emb
        self._cache: dict[int, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._lock = threading.Lock()

    def items(self, value: int) -> np.ndarray:
        """int64[count] the slots holding `value`, ascending."""
        return self.slots[self.indptr[value]:self.indptr[value + 1]]

    def vectors(self, value: int) -> np.ndarray:
        """float32[count, D] the vectors of `items(value)`; kept for the next call while the budget lasts."""
        got = self._cache.get(value)
        if got is not None:
            return got
        rows = self.emb[self.items(value)]
        with self._lock:
            if rows.nbytes <= self._cache_left and value not in self._cache:
                self._cache[value], self._cache_left = rows, self._cache_left - rows.nbytes
        return rows


@dataclasses.dataclass
class FilterStats:
    """How the queries of filtered searches were answered (summed over calls by `add`)."""
    queries: int = 0
    exact: int = 0            # their value holds <= exact_below items (or no ANN): searched exactly
    ann: int = 0              # searched by the ANN over the whole corpus, filtered
    widened: int = 0          # of those: needed another, deeper and wider ANN search
    exact_fallback: int = 0   # of those: still short, or too deep a fetch: searched exactly over the value
    short: int = 0            # fewer than k eligible items hold the value: got all of them

    def add(self, other: "FilterStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def check_conditions(conditions, num_queries: int, num_values: int) -> np.ndarray:
    """int64[Q] condition values, or `ConditionValueError` naming what is wrong (shape, type, range)."""
    arr = np.asarray(conditions)
    if arr.shape != (num_queries,) or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ConditionValueError(f"conditions must be one integer code per query, int[{num_queries}], got shape "
                                  f"{arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= num_values)]
    if bad.size:
        raise ConditionValueError(f"condition value(s) {sorted(set(bad.tolist()))[:5]} outside the feature's "
                                  f"{num_values} codes [0, {num_values})")
    return arr


def filtered_topk(queries: np.ndarray, k: int, conditions, lists: ConditionLists,
                  ex_indptr: np.ndarray | None = None, ex_items: np.ndarray | None = None, *,
                  ann: FilteredAnnFn | None = None, exact_below: int = 50_000, overfetch: float = 4.0,
                  max_ann_fetch: int | None = None, max_attempts: int = 3,
                  stats: FilterStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k items by dot product among the items holding each query's condition value.

    Args:
      queries: float32[Q, D].
      k: results per query, >= 1 (a value with fewer eligible items pads its tail).
      conditions: int[Q], each query's value in [0, lists.num_values).
      lists: the corpus's `ConditionLists` (its vectors are what is scored exactly).
      ex_indptr, ex_items: optional CSR aligned with `queries` of the slots never to return (repeats allowed).
      ann: (queries float32[m, D], fetch, attempt, share) -> (scores float32[m, fetch], slots int[m, fetch]) over
        the whole corpus, -1 / NaN marking missing candidates, wider on later attempts and for smaller shares
        (`FilteredAnnFn`); None = exact only.
      exact_below: values with at most this many items are searched exactly, never by the ANN.
      overfetch: the first ANN fetch of a value holding a share s of the corpus is overfetch / s times the
        candidates the value needs (k plus the query's exclusions in it); doubled on each retry.
      max_ann_fetch: deepest ANN fetch (whole-corpus candidates); queries needing more are searched exactly
        over their value's items. None = the corpus size.
      max_attempts: most ANN searches per query before the exact search answers it.
      stats: if given, how the queries were answered is added to it.
    Returns:
      (scores float32[Q, k] descending, slots int64[Q, k]) as `exact_topk_host` returns them: equal scores by
      smaller slot first (at the k-th place too on the exact path: `exact_topk_host`); -inf / -1 past the
      eligible items of the value.
    Raises:
      ConditionValueError: a condition outside [0, num_values) or of the wrong shape.
    """
    queries = np.asarray(queries, np.float32)
    nq, n = len(queries), lists.num_items
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    cond = check_conditions(conditions, nq, lists.num_values)
    if ex_indptr is None:
        ex_rows = ex_slots = np.zeros(0, np.int64)
    else:
        ex_rows, ex_slots, num_rows = csr_pairs(ex_indptr, ex_items, num_cols=n, name="exclusions")
        if num_rows != nq:
            raise ValueError(f"the exclusion CSR has {num_rows} rows but there are {nq} queries")
    run = FilterStats(queries=nq)
    scores, slots = np.full((nq, k), -np.inf, np.float32), np.full((nq, k), PAD, np.int64)
    max_fetch = n if max_ann_fetch is None else max_ann_fetch
    for value in np.unique(cond).tolist():
        rows = np.flatnonzero(cond == value)
        items = lists.items(value)
        m = len(items)
        indptr, local = _local_exclusions(rows, items, ex_rows[cond[ex_rows] == value],
                                          ex_slots[cond[ex_rows] == value])
        run.short += int((np.diff(indptr) > m - k).sum())
        if m == 0:
            continue
        kk, qv = min(k, m), queries[rows]
        if ann is None or m <= exact_below:
            run.exact += len(rows)
            s, i = exact_topk_host(qv, lists.vectors(value), kk, indptr, local)
        else:
            run.ann += len(rows)
            share = m / n

            def value_ann(q, fetch, attempt, items=items, share=share):
                depth = min(n, math.ceil(fetch * overfetch * 2 ** attempt / share))
                return _keep_value(*ann(q, depth, attempt, share), items)

            def value_exact(r, sub_indptr, sub_items, qv=qv, value=value, kk=kk):
                return exact_topk_host(qv[r], lists.vectors(value), kk, sub_indptr, sub_items)

            # The ANN's whole-corpus fetch for a value fetch f is f * overfetch / share: cap f accordingly.
            s, i, got = topk_excluding(value_ann, value_exact, qv, kk, indptr, local, num_items=m,
                                       overfetch=int(np.diff(indptr).max(initial=0)),
                                       max_fetch=int(max_fetch * share / overfetch), max_attempts=max_attempts)
            run.widened += got.widened
            run.exact_fallback += got.exact_fallback
        scores[rows, :kk] = s
        slots[rows, :kk] = np.where(i >= 0, items[np.maximum(i, 0)], PAD)
    if stats is not None:
        stats.add(run)
    return scores, slots


def _local_exclusions(rows: np.ndarray, items: np.ndarray, ex_rows: np.ndarray,
                      ex_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exclusions of query rows `rows` (ascending) as a CSR aligned with them, in the value's numbering
    (positions in its sorted slot list `items`), each row's ascending and distinct; excluded slots without the
    value are dropped."""
    pos = np.minimum(np.searchsorted(items, ex_slots), max(len(items) - 1, 0))
    hit = (items[pos] == ex_slots) if len(items) else np.zeros(len(ex_slots), bool)
    width = max(len(items), 1)
    keys = np.unique(np.searchsorted(rows, ex_rows[hit]) * width + pos[hit])   # sorted, repeats dropped
    r = keys // width
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=len(rows)))]).astype(np.int64)
    return indptr, (keys - r * width).astype(np.int64)


def _keep_value(scores: np.ndarray, slots: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole-corpus candidates [m, F] -> those among `items` (sorted slots), moved to the front in their
    order, in the value's numbering; NaN / -1 fill the rest (at least one column)."""
    slots = np.asarray(slots, np.int64)
    scores = np.asarray(scores, np.float32)
    pos = np.minimum(np.searchsorted(items, np.maximum(slots, 0)), len(items) - 1)
    keep = (slots >= 0) & np.isfinite(scores) & (items[pos] == slots)
    width = max(1, int(keep.sum(axis=1).max(initial=0)))
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    kept = np.take_along_axis(keep, order, axis=1)
    return (np.where(kept, np.take_along_axis(scores, order, axis=1), np.nan).astype(np.float32),
            np.where(kept, np.take_along_axis(pos, order, axis=1), PAD))
