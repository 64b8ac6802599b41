"""Top-k of unseen items for a batch of users: the search behind batch candidates.

The corpus is an index's items in slot order (slot i holds `index.ids()[i]`; for an index written by
`python -m serve.export`, slot i is item row i of the run's vocabulary). Two ways to search it:

- exact: `eval.topk.exact_topk` (blocked JAX matmul + top_k) over the index's embeddings, each user's seen
  items masked inside the search, so nothing needs over-fetching;
- index: the index's own batched search (ScaNN's parallel batched search for a tree index). It cannot mask
  per user, so it over-fetches `k + overfetch` candidates and drops the seen ones. A user left with fewer than
  k is searched again with a fetch deep enough to be sure (k + the user's seen count, rounded up to a power
  of two), and a user who would need more than `max_fetch` is searched exactly. So every user gets
  min(k, unseen items in the corpus) items, never fewer.

Ties are broken the same way in both: score descending, then slot ascending (for the index search, among the
candidates it returned). Which search answers a user (first fetch, deeper fetch, exact) depends only on that
user's embedding and seen items, not on which other users share the batch; the same batch always gives the
same result, which is what makes resumed jobs byte-identical.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data.ids import sorted_unique
from data.types import Vocab


@dataclasses.dataclass
class SearchStats:
    """How the users of a search were answered (summed over batches by `add`)."""
    users: int = 0
    widened: int = 0          # needed a second, deeper ANN fetch
    exact_fallback: int = 0   # would have needed a fetch above max_fetch: searched exactly
    short: int = 0            # fewer than k unseen items exist in the corpus: got all of them

    def add(self, other: "SearchStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Corpus:
    """The items of an index and the search run over them.

    Args:
      index: a `serve.index.TopK` (as loaded by `serve.manifest.load_index`).
      mode: "exact", "index", or "auto" (exact when the index itself is exact, else the index's search).
      user_block, item_block: block sizes of the exact search (see `eval.topk.exact_topk`).
    """

    def __init__(self, index, mode: str = "auto", *, user_block: int = 1024, item_block: int = 65536):
        if mode not in ("auto", "exact", "index"):
            raise ValueError(f"mode must be auto, exact or index, got {mode!r}")
        self.index = index
        self.ids = index.ids()
        self.num_items = len(self.ids)
        self.exact = mode == "exact" or (mode == "auto" and index.is_exact)
        self.user_block, self.item_block = user_block, item_block
        self._slots = Vocab(self.ids)   # raw item id -> slot
        self._emb = None

    def tune(self, leaves_to_search: int | None = None, reorder: int | None = None) -> dict:
        """Sets the ScaNN search-time settings of this job (the index directory is unchanged); None keeps the
        index's own. Returns the settings in force, {"leaves_to_search", "reorder"}, or {} for an exact search.

        Raises:
          ValueError: a setting given for an index that has no ScaNN tree.
        """
        tree = getattr(self.index, "num_leaves", None) is not None and not self.index.is_exact
        if not tree:
            if leaves_to_search is not None or reorder is not None:
                raise ValueError("leaves_to_search / reorder tune a ScaNN tree index, and this index is searched "
                                 "exactly (brute force); leave them null")
            return {}
        if leaves_to_search is not None:
            self.index.num_leaves_to_search = min(self.index.num_leaves, leaves_to_search)
        if reorder is not None:
            # ScaNNIndex reads config["reorder"] at every search (scaled by fetch / 10).
            self.index.config["reorder"] = reorder
        return {} if self.exact else {"leaves_to_search": self.index.num_leaves_to_search,
                                      "reorder": self.index.config["reorder"]}

    def slots_of(self, ids) -> np.ndarray:
        """int64 slots of raw item ids of the index's kind; -1 for ids it does not hold."""
        return self._slots.lookup(np.asarray(ids), missing="minus_one").astype(np.int64)

    def embeddings(self):
        """The item embeddings [N, D] as a device array (copied out of the index once)."""
        if self._emb is None:
            import jax.numpy as jnp
            self._emb = jnp.asarray(self.index.embeddings())
        return self._emb

    def exact_search(self, queries: np.ndarray, k: int, ex_indptr: np.ndarray,
                     ex_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k with exclusions. queries: float32[Q, D]; CSR rows align with queries.
        Returns (scores float32[Q, k], slots int64[Q, k]), -inf / -1 past the eligible items."""
        from eval.topk import exact_topk

        scores, slots = exact_topk(queries, self.embeddings(), k, exclude_indptr=ex_indptr,
                                   exclude_items=ex_slots, user_block=self.user_block, item_block=self.item_block)
        return np.asarray(scores), np.asarray(slots).astype(np.int64)

    def ann_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's own top-`fetch` (no exclusions): (scores float32[Q, fetch], slots int64[Q, fetch])."""
        scores, ids = self.index.search(queries, fetch)
        return scores, self.slots_of(ids)


def _rank_keys(scores: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """int64 keys whose ascending order is score descending, then slot ascending (one argsort, no lexsort).

    The float32 bits are mapped to integers in the same order as the floats; -inf (excluded) sorts last.
    """
    bits = np.ascontiguousarray(scores, np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)    # monotone in the float value
    return (-ordered << 32) + np.maximum(slots, 0)


def _best_unseen(scores, slots, rows, seen_keys, num_items: int, k: int):
    """From candidates [m, F] of users `rows` (int64[m]), drop seen and invalid ones and keep the best k.

    Returns (scores float32[m, k], slots int64[m, k] with -1 past the valid ones, valid counts int64[m]).
    """
    valid = (slots >= 0) & np.isfinite(scores)
    if seen_keys.size:
        keys = rows[:, None] * num_items + np.maximum(slots, 0)
        pos = np.minimum(np.searchsorted(seen_keys, keys), seen_keys.size - 1)
        valid &= seen_keys[pos] != keys
    masked = np.where(valid, scores, -np.inf).astype(np.float32)
    width = min(k, scores.shape[1])
    order = np.argsort(_rank_keys(masked, slots), axis=1, kind="stable")[:, :width]
    top_s = np.take_along_axis(masked, order, axis=1)
    top_i = np.where(top_s > -np.inf, np.take_along_axis(slots, order, axis=1), -1)
    if width < k:
        pad = ((0, 0), (0, k - width))
        top_s, top_i = np.pad(top_s, pad, constant_values=-np.inf), np.pad(top_i, pad, constant_values=-1)
    return top_s, top_i, valid.sum(axis=1)


def default_overfetch(seen_counts: np.ndarray) -> int:
    """The first ANN fetch's margin over k: the 90th percentile of the seen counts int[U] (0 when empty), so
    about nine users in ten need no second fetch."""
    counts = np.asarray(seen_counts)
    return int(np.ceil(np.percentile(counts, 90))) if counts.size else 0


def _fetch_depth(need: np.ndarray, num_items: int) -> np.ndarray:
    """The widened fetch of each user: `need` rounded up to a power of two (few distinct searches), <= N."""
    return np.minimum(num_items, 1 << np.ceil(np.log2(np.maximum(need, 1))).astype(np.int64))


def topk_unseen(corpus: Corpus, queries: np.ndarray, k: int, ex_indptr: np.ndarray, ex_slots: np.ndarray, *,
                overfetch: int = 0, max_fetch: int = 4096) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Top-k unseen items of each user.

    Args:
      corpus: the items and the search mode.
      queries: float32[Q, D] user embeddings.
      k: items per user, in [1, N].
      ex_indptr: int64[Q + 1] CSR offsets of each user's seen slots.
      ex_slots: int64[nnz] seen slots, sorted and distinct within each row, each in [0, N).
      overfetch: index search: candidates fetched beyond k in the first round.
      max_fetch: index search: a user needing a deeper fetch than this is searched exactly.
    Returns:
      (scores float32[Q, k] descending, slots int64[Q, k], stats). Row i holds min(k, N - seen_i) items; the
      tail past them is -inf / -1.
    """
    n = corpus.num_items
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie in [1, {n}] (the index holds {n} items)")
    q = np.ascontiguousarray(queries, np.float32)
    stats = SearchStats(users=len(q), short=int((np.diff(ex_indptr) > n - k).sum()))
    if corpus.exact or not len(q):
        scores, slots = corpus.exact_search(q, k, ex_indptr, ex_slots)
        return scores, slots, stats
    return (*_ann_rounds(corpus, q, k, ex_indptr, ex_slots, overfetch, max_fetch, stats), stats)


def _ann_rounds(corpus: Corpus, q, k: int, ex_indptr, ex_slots, overfetch: int, max_fetch: int,
                stats: SearchStats) -> tuple[np.ndarray, np.ndarray]:
    """The index search of `topk_unseen`: a first fetch of k + overfetch for everyone, then deeper fetches
    (one batched search per depth) for users left short, and exact search past max_fetch."""
    n, counts = corpus.num_items, np.diff(ex_indptr).astype(np.int64)
    want = np.minimum(k, n - counts)
    seen_keys = np.repeat(np.arange(len(q), dtype=np.int64), counts) * n + ex_slots   # sorted
    scores, slots = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    todo, fetch = np.arange(len(q)), np.full(len(q), min(n, k + overfetch), np.int64)
    while todo.size:
        deep = fetch[todo] > max_fetch
        exact_rows, todo = todo[deep], todo[~deep]
        if exact_rows.size:
            stats.exact_fallback += exact_rows.size
            scores[exact_rows], slots[exact_rows] = _exact_rows(corpus, q, k, ex_indptr, ex_slots, exact_rows)
        short = []
        for depth in np.unique(fetch[todo]):
            group = todo[fetch[todo] == depth]
            cand_s, cand_i = corpus.ann_search(q[group], int(depth))
            scores[group], slots[group], got = _best_unseen(cand_s, cand_i, group, seen_keys, n, k)
            short.append(group[got < want[group]])
        todo = np.sort(np.concatenate(short)) if short else todo[:0]
        # k + seen candidates always hold k unseen ones, whatever the ANN ranks first.
        grown = _fetch_depth(k + counts[todo], n)
        if todo.size and (grown <= fetch[todo]).any():
            raise RuntimeError("the index returned fewer candidates than asked for; rebuild the index")
        fetch[todo] = grown
        stats.widened += int((grown <= max_fetch).sum())
    return scores, slots


def _exact_rows(corpus: Corpus, q, k, ex_indptr, ex_slots, rows: np.ndarray):
    """Exact search for the users `rows` with their seen slots."""
    from data.types import sub_csr
    sub_indptr, sub_slots = sub_csr(ex_indptr, ex_slots, rows)
    return corpus.exact_search(q[rows], k, sub_indptr, sub_slots)


def seen_csr(csrs: list[tuple[np.ndarray, np.ndarray]], users: np.ndarray,
             slot_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's seen items as corpus slots.

    Args:
      csrs: per-user item-row CSRs (indptr int64[R + 1], item rows int[nnz]) of the splits that count as seen.
      users: int[Q] user rows.
      slot_of_row: int64[num_item_rows] the slot of each vocabulary item row, -1 when the index lacks it.
    Returns:
      (indptr int64[Q + 1], slots int64[nnz]) aligned with `users`; slots sorted and distinct per user.
    """
    from data.types import sub_csr

    n = max(int(slot_of_row.max(initial=-1)) + 1, 1)
    keys = []
    for indptr, items in csrs:
        sub_indptr, sub_items = sub_csr(indptr, items, np.asarray(users, np.int64))
        rows = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(sub_indptr))
        slots = slot_of_row[sub_items]
        keys.append(rows[slots >= 0] * n + slots[slots >= 0])
    keys = sorted_unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    indptr = np.zeros(len(users) + 1, np.int64)
    np.cumsum(np.bincount(keys // n, minlength=len(users)), out=indptr[1:])
    return indptr, keys % n
