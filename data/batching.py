"""Training batches: shuffled train interactions with features, history, negatives and log q.

One example is one train interaction. Each epoch visits every example once in an order seeded by
(seed, epoch); a batch that reaches the end of an epoch continues into the next epoch's order, so every batch
has the same shape and no example is skipped. The iterator is exactly resumable from `state()`: the batch at
(epoch, position) depends only on those two numbers and the seed (negatives and sampled histories use a
generator seeded by (seed, epoch, position)).

History rows hold item rows, most recent first, -1 padded at the end. "causal": the up-to-H train items the
user had just before this interaction; "sample": up to H other train items of the user, drawn without
replacement. Either way an entry equal to the positive item (a repeated interaction) is removed.

Item audiences (`item_history_len` > 0) hold user rows: up to that many other train users of the positive item
(never the example's own user) and of each negative, sampled the same way. They let the item tower pool its
users' ID rows, the item-side half of a one-hop graph aggregation (LightGCN, He et al. 2020).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse

from data.config import HISTORY_MODES
from data.errors import DataError
from data.types import Dataset, sub_csr

# Sample mode: users with at most this many times H other items are sampled exactly without replacement
# (random keys over all their items); heavier users draw 2H with replacement and keep the distinct ones.
_EXACT_FACTOR = 4


def _last_items(indptr: np.ndarray, items: np.ndarray, end: np.ndarray, count: np.ndarray, h: int) -> np.ndarray:
    """int32 [n, h]: items[end-1], items[end-2], ... for up to `count` entries, -1 padded."""
    j = np.arange(h)
    idx = end[:, None] - 1 - j[None, :]
    valid = j[None, :] < count[:, None]
    return np.where(valid, items[np.where(valid, idx, 0)], -1).astype(np.int32)


def user_history(ds: Dataset, users: np.ndarray, history_len: int) -> np.ndarray:
    """The last `history_len` train items of each user (for evaluation and serving).

    Args:
      ds: the dataset.
      users: int [n] user rows.
      history_len: H.

    Returns:
      int32 [n, H] item rows, most recent first, -1 padded at the end.
    """
    indptr, items = ds.train_csr()
    users = np.asarray(users, dtype=np.int64)
    if users.size and (users.min() < 0 or users.max() >= ds.num_users):
        raise DataError(f"user rows must lie in [0, {ds.num_users}), got [{users.min()}, {users.max()}]")
    end = indptr[users + 1]
    return _last_items(indptr, items, end, end - indptr[users], history_len)


def item_audience_mean(ds: Dataset, user_table: np.ndarray, items: np.ndarray | None = None) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
    """Each item's mean user-table row over ALL its train users (for evaluation, export and serving).

    Training pools a sample of up to `item_history_len` users; inference pools every one (the sample mean's
    expectation).

    Args:
      ds: the dataset.
      user_table: float [num_users, d] user ID table (one row per user row).
      items: int [n] item rows (-1 = an item outside the dataset: no audience), or None for all items.

    Returns:
      (float32 [n, d] means, bool [n] has-audience); an item without train users gets zeros and False.
    """
    indptr, users, _ = ds.item_audience_csr()
    table = np.asarray(user_table, np.float32)
    if table.shape[0] < ds.num_users:
        raise DataError(f"user table has {table.shape[0]} rows but the dataset has {ds.num_users} users")
    items = np.arange(ds.num_items) if items is None else np.asarray(items, np.int64)
    known = np.flatnonzero(items >= 0)
    sub_indptr, sub_users = sub_csr(indptr, users, items[known])   # only the requested items' audiences
    counts = np.diff(sub_indptr)
    ones = np.ones(len(sub_users), np.float32)
    sums = scipy.sparse.csr_matrix((ones, sub_users, sub_indptr), shape=(len(known), table.shape[0])) @ table
    means = np.zeros((len(items), table.shape[1]), np.float32)
    has = np.zeros(len(items), bool)
    means[known] = sums / np.maximum(counts, 1)[:, None]
    has[known] = counts > 0
    return means, has


def _sample_entries(values: np.ndarray, start: np.ndarray, count: np.ndarray, skip: np.ndarray | None, h: int,
                    rng: np.random.Generator, newest_first: bool = False) -> np.ndarray:
    """Per row, up to h distinct entries of `values[start:start + count]`, drawn without replacement, never the
    one at relative position `skip` (None = skip none); `newest_first` orders them by position, last first.

    Returns:
      int32 [n, h] values, -1 padded at the end.
    """
    offsets = _sample_offsets(count - (skip is not None), h, rng)
    if newest_first:
        offsets = -np.sort(-offsets, axis=1)   # -1 padding last
    seq = offsets if skip is None else offsets + (offsets >= skip[:, None])
    return np.where(offsets >= 0, values[np.where(offsets >= 0, start[:, None] + seq, 0)], -1).astype(np.int32)


def _drop_positive(hist: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Removes entries equal to the row's positive item and closes the gaps (padding stays at the end)."""
    hit = hist == item[:, None]
    if hit.any():
        hist = hist.copy()
        hist[hit] = -1
        order = np.argsort(hist < 0, axis=1, kind="stable")
        hist = np.take_along_axis(hist, order, axis=1)
    return hist


def _sample_offsets(others: np.ndarray, h: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, up to h distinct offsets in [0, others) drawn without replacement; int64 [n, h], -1 padded."""
    n = others.shape[0]
    out = np.full((n, h), -1, dtype=np.int64)
    exact = others <= _EXACT_FACTOR * h
    rows = np.flatnonzero(exact)
    if rows.size:
        width = max(int(others[rows].max()), h)
        keys = rng.random((rows.size, width))
        keys[np.arange(width)[None, :] >= others[rows, None]] = np.inf
        pick = np.argpartition(keys, h - 1, axis=1)[:, :h]
        picked_keys = np.take_along_axis(keys, pick, axis=1)
        out[rows] = np.where(np.isfinite(picked_keys), pick, -1)
    rows = np.flatnonzero(~exact)
    if rows.size:
        draws = np.floor(rng.random((rows.size, 2 * h)) * others[rows, None]).astype(np.int64)
        srt = np.argsort(draws, axis=1, kind="stable")
        vals = np.take_along_axis(draws, srt, axis=1)
        dup_sorted = np.zeros(vals.shape, dtype=bool)
        dup_sorted[:, 1:] = vals[:, 1:] == vals[:, :-1]
        dup = np.empty_like(dup_sorted)
        np.put_along_axis(dup, srt, dup_sorted, axis=1)
        first = np.argsort(dup, axis=1, kind="stable")[:, :h]  # the first h distinct draws, in draw order
        out[rows] = np.where(np.take_along_axis(dup, first, axis=1), -1, np.take_along_axis(draws, first, axis=1))
    return out


def negative_pool(ds: Dataset) -> np.ndarray:
    """int32 item rows that uniform negatives are drawn from: every item except the cold ones.

    Cold items (held out of training entirely) are never drawn, so nothing about them leaks into the towers;
    the step's uniform log q is log(M / len(pool)).
    """
    return np.setdiff1d(np.arange(ds.num_items, dtype=np.int32), np.asarray(ds.cold_items, np.int32))


class Batches:
    """Infinite, resumable iterator of fixed-shape training batches.

    Args:
      ds: the dataset (its train split is iterated).
      batch_size: B, examples per batch.
      num_negatives: M, items drawn uniformly from all items per batch (shared by the batch; may be 0).
      history_len: H, history slots per example (may be 0).
      history_mode: "causal" or "sample" (see module docstring).
      seed: shuffling, negatives and sampled-history seed.
      item_history_len: HI, audience slots per item (0 = none; see module docstring).
      negatives_per_row: M_r, items drawn uniformly (from the same pool) for each example on its own
        (0 = none); drawn after everything else, so the other arrays are the same with or without them.

    Each batch: user int32 [B], item int32 [B], neg_item int32 [M], history int32 [B, H],
    item_history int32 [B, HI] and neg_item_history int32 [M, HI] (user rows, -1 padded; only when HI > 0),
    user_feat {name: [B, ...]}, item_feat {name: [B, ...]}, neg_item_feat {name: [M, ...]},
    item_logq float32 [B], neg_item_logq float32 [M] (log p(item) under the training data); with M_r > 0 also
    row_neg_item int32 [B, M_r], row_neg_item_feat {name: [B, M_r, ...]} and row_neg_item_logq float32 [B, M_r].
    """

    def __init__(self, ds: Dataset, *, batch_size: int, num_negatives: int, history_len: int,
                 history_mode: str = "causal", seed: int = 0, item_history_len: int = 0,
                 negatives_per_row: int = 0):
        if (batch_size < 1 or num_negatives < 0 or history_len < 0 or item_history_len < 0
                or negatives_per_row < 0):
            raise DataError(f"need batch_size >= 1, num_negatives >= 0, history_len >= 0, item_history_len >= 0, "
                            f"negatives_per_row >= 0; got {batch_size}, {num_negatives}, {history_len}, "
                            f"{item_history_len}, {negatives_per_row}")
        if history_mode not in HISTORY_MODES:
            raise DataError(f"history_mode must be one of {HISTORY_MODES}, got {history_mode!r}")
        self.ds = ds
        self.batch_size, self.num_negatives = batch_size, num_negatives
        self.history_len, self.history_mode, self.seed = history_len, history_mode, seed
        self.item_history_len = item_history_len
        self.negatives_per_row = negatives_per_row
        self._indptr, self._items = ds.train_csr()
        self.examples_per_epoch = int(self._items.shape[0])
        if self.examples_per_epoch == 0:
            raise DataError(f"{ds.name}: the train split is empty; nothing to batch")
        counts = np.diff(self._indptr)
        self._users = np.repeat(np.arange(ds.num_users, dtype=np.int32), counts)
        self._logq = ds.item_log_prob()
        self._negative_pool = negative_pool(ds)
        self.num_negative_candidates = len(self._negative_pool)
        self._epoch, self._position = 0, 0
        self._perms: dict[int, np.ndarray] = {}

    def state(self) -> dict:
        """{"epoch", "position"} of the next batch; `restore` of it resumes exactly."""
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: dict) -> None:
        """Continues from a `state()`; the next batches equal those of the uninterrupted iterator."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.examples_per_epoch:
            raise DataError(f"iterator state {state} is out of range for {self.examples_per_epoch} examples "
                            "per epoch; was it saved for another dataset?")
        self._epoch, self._position = epoch, position

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_batch()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.examples_per_epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # current and next only
            self._perms[epoch] = perm.astype(np.int32 if self.examples_per_epoch < 2**31 else np.int64)
        return self._perms[epoch]

    def _take_examples(self) -> np.ndarray:
        parts, need = [], self.batch_size
        while need:
            perm = self._perm(self._epoch)
            chunk = perm[self._position:self._position + need]
            parts.append(chunk)
            need -= chunk.shape[0]
            self._position += chunk.shape[0]
            if self._position == self.examples_per_epoch:
                self._epoch, self._position = self._epoch + 1, 0
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def next_batch(self) -> dict:
        """The next batch (see class docstring for keys and shapes)."""
        rng = np.random.default_rng([self.seed, self._epoch, self._position, 1])
        ex = self._take_examples().astype(np.int64)
        user, item = self._users[ex], self._items[ex]
        neg = self._negative_pool[rng.integers(0, self.num_negative_candidates, self.num_negatives)]
        batch = {
            "user": user,
            "item": item,
            "neg_item": neg,
            "history": self._history(ex, user, item, rng),
            "user_feat": {k: v[user] for k, v in self.ds.user_features.items()},
            "item_feat": {k: v[item] for k, v in self.ds.item_features.items()},
            "neg_item_feat": {k: v[neg] for k, v in self.ds.item_features.items()},
            "item_logq": self._logq[item],
            "neg_item_logq": self._logq[neg],
        }
        if self.item_history_len:
            batch["item_history"], batch["neg_item_history"] = self._audiences(ex, user, item, neg, rng)
        if self.negatives_per_row:
            batch.update(self._row_negatives(len(ex), rng))
        return batch

    def _row_negatives(self, batch_size: int, rng) -> dict:
        """Each example's own `negatives_per_row` uniform draws from the negative pool, their features and log p."""
        draws = rng.integers(0, self.num_negative_candidates, (batch_size, self.negatives_per_row))
        neg = self._negative_pool[draws]
        return {"row_neg_item": neg,
                "row_neg_item_feat": {k: v[neg] for k, v in self.ds.item_features.items()},
                "row_neg_item_logq": self._logq[neg]}

    def _audiences(self, ex, user, item, neg, rng) -> tuple[np.ndarray, np.ndarray]:
        """Sampled audiences of the positives (without the example's user) and of the negatives."""
        indptr, users, slot = self.ds.item_audience_csr()
        h, start = self.item_history_len, indptr[item]
        aud = _sample_entries(users, start, indptr[item + 1] - start, slot[ex] - start, h, rng)
        aud = _drop_positive(aud, user)  # a repeated (user, item) pair leaves the user in the audience
        start = indptr[neg]
        return aud, _sample_entries(users, start, indptr[neg + 1] - start, None, h, rng)

    def _history(self, ex: np.ndarray, user: np.ndarray, item: np.ndarray, rng) -> np.ndarray:
        h = self.history_len
        if h == 0:
            return np.zeros((ex.shape[0], 0), dtype=np.int32)
        start = self._indptr[user]
        if self.history_mode == "causal":
            hist = _last_items(self._indptr, self._items, ex, ex - start, h)
        else:
            hist = _sample_entries(self._items, start, self._indptr[user + 1] - start, ex - start, h, rng,
                                   newest_first=True)
        return _drop_positive(hist, item)
