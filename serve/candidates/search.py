"""Top-k of unseen items for a batch of users: the search behind batch candidates.

The corpus is an index's items in slot order (slot i holds `index.ids()[i]`; for an index written by
`python -m serve.export`, slot i is item row i of the run's vocabulary). Two ways to search it:

- exact: `towers.inference.exact.exact_topk` (blocked JAX matmul + top_k) over the index's embeddings, each
  user's seen items masked inside the search, so nothing needs over-fetching;
- index: the index's own batched search (ScaNN's parallel batched search for a tree index), which cannot mask
  per user, made exact in what it returns by `towers.inference.search.topk_excluding`: over-fetch
  `k + overfetch` candidates and drop the seen ones, search again deeper for users left short, and search
  exactly past `max_fetch`. So every user gets min(k, unseen items in the corpus) items, never fewer.

Ties are broken the same way in both: score descending, then slot ascending (for the index search, among the
candidates it returned). Which search answers a user (first fetch, deeper fetch, exact) depends only on that
user's embedding and seen items, not on which other users share the batch; the same batch always gives the
same result, which is what makes resumed jobs byte-identical.
"""
from __future__ import annotations

import numpy as np

from data.ids import sorted_unique
from data.types import Vocab, sub_csr
from towers.inference.search import SearchStats, topk_excluding


class Corpus:
    """The items of an index and the search run over them.

    Args:
      index: a `serve.index.TopK` (as loaded by `serve.manifest.load_index`).
      mode: "exact", "index", or "auto" (exact when the index itself is exact, else the index's search).
      user_block, item_block: block sizes of the exact search (see `towers.inference.exact.exact_topk`).
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
        from towers.inference.exact import exact_topk   # JAX: imported once a search runs

        scores, slots = exact_topk(queries, self.embeddings(), k, exclude_indptr=ex_indptr,
                                   exclude_items=ex_slots, user_block=self.user_block, item_block=self.item_block)
        return np.asarray(scores), np.asarray(slots).astype(np.int64)

    def ann_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's own top-`fetch` (no exclusions): (scores float32[Q, fetch], slots int64[Q, fetch])."""
        scores, ids = self.index.search(queries, fetch)
        return scores, self.slots_of(ids)


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
    q = np.ascontiguousarray(queries, np.float32)
    if corpus.exact or not len(q):
        n = corpus.num_items
        if not 1 <= k <= n:
            raise ValueError(f"k={k} must lie in [1, {n}] (the index holds {n} items)")
        scores, slots = corpus.exact_search(q, k, ex_indptr, ex_slots)
        return scores, slots, SearchStats(users=len(q), short=int((np.diff(ex_indptr) > n - k).sum()))

    def exact(rows, sub_indptr, sub_slots):
        return corpus.exact_search(q[rows], k, sub_indptr, sub_slots)

    return topk_excluding(lambda batch, fetch, attempt: corpus.ann_search(batch, fetch), exact, q, k, ex_indptr,
                          ex_slots, num_items=corpus.num_items, overfetch=overfetch, max_fetch=max_fetch)


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
