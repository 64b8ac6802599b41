"""The data layer's value types: feature specs, columnar interactions, vocabularies and the Dataset.

Every other package codes against these. Rows are vocabulary rows (0..num-1), never raw ids: a `Vocab` maps
raw ids (int64 or str) to rows and back, and is saved with checkpoints so serving can map requests.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from data.errors import DataError
from data.ids import as_id_array, sorted_unique

FEATURE_KINDS = ("categorical", "multihot", "dense")



def sub_csr(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR rows `rows` of (indptr, items), as a new CSR aligned with `rows`."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    new_indptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    idx = np.repeat(starts - new_indptr[:-1], lengths) + np.arange(new_indptr[-1])
    return new_indptr, items[idx]


PAD = -1  # id meaning "no item" in ranked lists
# Key of a conditional user tower's condition in a batch's user features: int32 [B] codes of the item feature
# named by `model.user.condition` (-1 = no condition). "@" keeps it apart from any data feature's name.
CONDITION = "@condition"


def log_prob(counts: np.ndarray, total: int) -> np.ndarray:
    """float32 log(count / total) per item, counts floored at 1 so unseen items stay finite (the log q of the
    in-batch sampler, for `Dataset` and prepared datasets alike)."""
    return np.log(np.maximum(counts, 1).astype(np.float64) / max(total, 1)).astype(np.float32)


def check_csr(indptr, indices, num_cols: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
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
    indptr, indices = check_csr(indptr, indices, num_cols, name)
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


@dataclass(frozen=True)
class FeatureSpec:
    """What one side feature is, so a tower can build its embedding.

    Attributes:
      name: key in `Dataset.user_features` / `item_features` and in batches.
      kind: "categorical" (int32 [N], values 0..size-1), "multihot" (int32 [N, max_len], -1 = padding at the
        end) or "dense" (float32 [N, size]).
      size: vocabulary size for categorical/multihot; width for dense.
      max_len: multihot only: number of slots per row.
    """

    name: str
    kind: str
    size: int
    max_len: int = 1

    def __post_init__(self):
        if self.kind not in FEATURE_KINDS:
            raise DataError(f"feature {self.name!r}: kind must be one of {FEATURE_KINDS}, got {self.kind!r}")
        if self.size < 1 or self.max_len < 1:
            raise DataError(f"feature {self.name!r}: size and max_len must be >= 1, got {self.size}, {self.max_len}")

    def check(self, values: np.ndarray, rows: int, where: str) -> None:
        """Raises `DataError` unless `values` has this spec's dtype, shape [rows, ...] and value range."""
        shape = {"categorical": (rows,), "multihot": (rows, self.max_len), "dense": (rows, self.size)}[self.kind]
        dtype = np.float32 if self.kind == "dense" else np.int32
        if values.shape != shape or values.dtype != dtype:
            raise DataError(f"{where} feature {self.name!r}: expected {np.dtype(dtype).name}{list(shape)}, "
                            f"got {values.dtype.name}{list(values.shape)}")
        if self.kind != "dense" and values.size:
            lo = -1 if self.kind == "multihot" else 0
            if values.min() < lo or values.max() >= self.size:
                raise DataError(f"{where} feature {self.name!r}: values must lie in [{lo}, {self.size}), got "
                                f"[{values.min()}, {values.max()}]")


@dataclass
class Interactions:
    """Columnar (user row, item row, timestamp) triples; all arrays have length N.

    Attributes:
      user: int32 [N] user rows.
      item: int32 [N] item rows.
      timestamp: int64 [N] (zeros when the source has no time).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray | None = None

    def __post_init__(self):
        self.user = np.asarray(self.user, dtype=np.int32)
        self.item = np.asarray(self.item, dtype=np.int32)
        if self.timestamp is None:
            self.timestamp = np.zeros(self.user.shape, dtype=np.int64)
        self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
        if not (self.user.ndim == 1 and self.user.shape == self.item.shape == self.timestamp.shape):
            raise DataError("Interactions: user, item and timestamp must be 1-D arrays of one length, got "
                            f"{self.user.shape}, {self.item.shape}, {self.timestamp.shape}")

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, index: np.ndarray) -> "Interactions":
        """The rows at `index` (int array or bool mask), as a new `Interactions`."""
        return Interactions(self.user[index], self.item[index], self.timestamp[index])


class Vocab:
    """Raw ids <-> rows: row i is `raw_ids[i]`.

    Args:
      raw_ids: int or str array [n] of distinct ids (duplicates raise `DataError`, a `ValueError`).
    """

    def __init__(self, raw_ids):
        self.raw_ids = as_id_array(raw_ids, "Vocab raw_ids")
        n = self.raw_ids.shape[0]
        self._start = None
        if self.raw_ids.dtype.kind == "i" and n and np.array_equal(
                self.raw_ids, np.arange(self.raw_ids[0], self.raw_ids[0] + n)):
            # Consecutive integer ids (MovieLens, LightGCN, synthetic): lookup is a subtraction.
            self._start = int(self.raw_ids[0])
            return
        self._order = np.argsort(self.raw_ids, kind="stable").astype(np.int32)
        self._sorted = self.raw_ids[self._order]
        dup = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if dup.size:
            shown = self._sorted[dup[:5]].tolist()
            raise DataError(f"Vocab raw_ids has {dup.size} duplicate id(s), e.g. {shown}; ids must be distinct")

    def __len__(self) -> int:
        return int(self.raw_ids.shape[0])

    def __repr__(self) -> str:
        return f"Vocab(n={len(self)}, dtype={self.raw_ids.dtype})"

    def lookup(self, raw, *, missing: str = "error") -> np.ndarray:
        """Maps raw ids to rows.

        Args:
          raw: ids of the vocabulary's kind (int or str), any shape.
          missing: "error" raises `DataError` naming unknown ids; "minus_one" maps them to -1.

        Returns:
          int32 array of rows, same shape as `raw`.
        """
        if missing not in ("error", "minus_one"):
            raise ValueError(f"missing must be 'error' or 'minus_one', got {missing!r}")
        raw_arr = np.asarray(raw)
        query = as_id_array(raw_arr.reshape(-1), "lookup ids")
        if query.size and (query.dtype.kind == "U") != (self.raw_ids.dtype.kind == "U"):
            raise DataError(f"this vocabulary holds {self.raw_ids.dtype} ids but lookup got {query.dtype}; "
                            "convert the ids to the vocabulary's type first")
        rows, found = self._rows(query)
        if missing == "error" and not found.all():
            bad = query[~found]
            raise DataError(f"{bad.size} id(s) not in the vocabulary, e.g. {bad[:5].tolist()}; "
                            "use missing='minus_one' to map unknown ids to -1")
        return np.where(found, rows, -1).astype(np.int32).reshape(raw_arr.shape)

    def _rows(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if n == 0:
            return np.zeros(query.shape, np.int64), np.zeros(query.shape, bool)
        if self._start is not None:
            rows = query - self._start
            return rows, (rows >= 0) & (rows < n)
        pos = np.minimum(np.searchsorted(self._sorted, query), n - 1)
        return self._order[pos], self._sorted[pos] == query

    def save(self, path: str | os.PathLike) -> None:
        """Writes the raw ids to `path` as .npy (no pickle; strings as a unicode array)."""
        with open(path, "wb") as f:
            np.save(f, self.raw_ids, allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Reads a vocabulary written by `save`."""
        return cls(np.load(path, allow_pickle=False))


def _csr(inter: Interactions, num_users: int) -> tuple[np.ndarray, np.ndarray]:
    user, ts = inter.user, inter.timestamp
    in_order = len(inter) < 2 or bool(np.all(
        (user[1:] > user[:-1]) | ((user[1:] == user[:-1]) & (ts[1:] >= ts[:-1]))))
    # Loaders store rows already in (user, time) order, so the sort is usually skipped; stable keeps the
    # dataset's tie order (the split's seeded tie-break) when it is needed.
    order = None if in_order else np.lexsort((ts, user))
    items = inter.item if order is None else inter.item[order]
    indptr = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=num_users), out=indptr[1:])
    return indptr, np.ascontiguousarray(items, dtype=np.int32)


def _pair_keys(indptr: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
    """int64 key user * num_items + item of every entry of a per-user CSR, in CSR order."""
    users = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return users * num_items + items


@dataclass
class Dataset:
    """A loaded, split dataset with vocabularies and side features.

    `user_features[name]` is indexed by user row (length `num_users`), `item_features[name]` by item row.
    `feature_vocabs` maps a feature name to the `Vocab` of its raw values (e.g. genre names, title tokens) so
    new items can be featurised the same way at serving time. `stats` holds counts reported to the user: rows
    read, rows filtered by reason, duplicates, split sizes. `cold_items` (int32 [C], sorted) are the items held
    out of training entirely by `cold_item_fraction`: they keep their vocabulary rows and features, have no
    train or valid interactions, and all their interactions are in test.
    """

    name: str
    train: Interactions
    test: Interactions
    valid: Interactions | None
    user_vocab: Vocab
    item_vocab: Vocab
    user_features: dict[str, np.ndarray]
    item_features: dict[str, np.ndarray]
    user_feature_specs: list[FeatureSpec]
    item_feature_specs: list[FeatureSpec]
    stats: dict
    feature_vocabs: dict[str, Vocab] = field(default_factory=dict)
    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_users(self) -> int:
        return len(self.user_vocab)

    @property
    def num_items(self) -> int:
        return len(self.item_vocab)

    def item_counts(self) -> np.ndarray:
        """int64 [num_items]: training interactions per item."""
        if "item_counts" not in self._cache:
            self._cache["item_counts"] = np.bincount(self.train.item, minlength=self.num_items).astype(np.int64)
        return self._cache["item_counts"]

    def item_log_prob(self) -> np.ndarray:
        """float32 [num_items]: log(count / N_train), counts floored at 1 so unseen items stay finite."""
        if "item_log_prob" not in self._cache:
            self._cache["item_log_prob"] = log_prob(self.item_counts(), len(self.train))
        return self._cache["item_log_prob"]

    def split_csr(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-user items of one split in time order (cached).

        Args:
          split: "train", "valid" or "test".

        Returns:
          (indptr int64 [num_users + 1], items int32 [nnz]); user u's items are `items[indptr[u]:indptr[u+1]]`.
        """
        if split not in ("train", "valid", "test"):
            raise DataError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        inter = getattr(self, split)
        if inter is None:
            raise DataError(f"no {split!r} split in dataset {self.name!r}; set valid_fraction > 0 for 'valid'")
        key = f"csr/{split}"
        if key not in self._cache:
            self._cache[key] = _csr(inter, self.num_users)
        return self._cache[key]

    def train_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """`split_csr("train")`."""
        return self.split_csr("train")

    def seen_splits(self, split: str) -> list[str]:
        """The splits whose items a ranking for `split` excludes: train, and valid too when ranking for test.

        This is the evaluation protocol (full ranking, as in LightGCN and RecBole): items the user interacted
        with before the held-out period are never ranked, and with a validation slice the test ranking also
        skips the validation items, since they precede the test period and were used for model selection.
        """
        if split not in ("valid", "test"):
            raise DataError(f"held-out split must be 'valid' or 'test', got {split!r}")
        self.split_csr(split)  # raises when the split is absent
        return ["train", "valid"] if split == "test" and self.valid is not None else ["train"]

    def seen_csr(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-user items excluded when ranking for `split` (the `seen_splits`), cached.

        Returns:
          (indptr int64 [num_users + 1], items int32 [nnz]); the train CSR itself when only train is excluded,
          else the union of the splits' items, sorted and distinct within each user.
        """
        splits = self.seen_splits(split)
        if splits == ["train"]:
            return self.train_csr()
        key = "seen/" + "+".join(splits)
        if key not in self._cache:
            keys = np.concatenate([_pair_keys(*self.split_csr(s), self.num_items) for s in splits])
            keys = sorted_unique(keys)
            indptr = np.zeros(self.num_users + 1, np.int64)
            np.cumsum(np.bincount(keys // self.num_items, minlength=self.num_users), out=indptr[1:])
            self._cache[key] = indptr, (keys % self.num_items).astype(np.int32)
        return self._cache[key]

    def heldout_csr(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The ground truth of `split`: each user's `split` items except those in `seen_csr(split)`, cached.

        With `drop_duplicates: false` a user can consume a training (or, for test, a validation) item again in
        the held-out period. The ranking excludes that item, so it could never be retrieved; it is dropped from
        the truth rather than counted as a certain miss, and a user left without held-out items is not evaluated.

        Returns:
          (indptr int64 [num_users + 1], items int32 [nnz]) in the split's time order.
        """
        key = f"heldout/{split}"
        if key not in self._cache:
            indptr, items = self.split_csr(split)
            seen = np.sort(_pair_keys(*self.seen_csr(split), self.num_items))
            keys = _pair_keys(indptr, items, self.num_items)
            # Membership by binary search: np.isin takes seconds where this takes 0.1 s (1.4M in 6.6M keys).
            pos = np.minimum(np.searchsorted(seen, keys), max(seen.size - 1, 0))
            keep = seen[pos] != keys if seen.size else np.ones(keys.size, bool)
            users = np.repeat(np.arange(self.num_users), np.diff(indptr))
            new_indptr = np.zeros(self.num_users + 1, np.int64)
            np.cumsum(np.bincount(users[keep], minlength=self.num_users), out=new_indptr[1:])
            self._cache[key] = new_indptr, items[keep]
        return self._cache[key]

    def item_audience_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The train split by item: each item's users (its audience), in train-CSR order (cached).

        Returns:
          (indptr int64 [num_items + 1], users int32 [nnz], slot int64 [nnz]): item i's users are
          `users[indptr[i]:indptr[i+1]]`, and train example e (an index into `train_csr()`'s items) is entry
          `slot[e]` of that array.
        """
        if "audience" not in self._cache:
            indptr, items = self.train_csr()
            owners = np.repeat(np.arange(self.num_users, dtype=np.int32), np.diff(indptr))
            order = np.argsort(items, kind="stable")
            item_indptr = np.zeros(self.num_items + 1, np.int64)
            np.cumsum(np.bincount(items, minlength=self.num_items), out=item_indptr[1:])
            slot = np.empty(len(items), np.int64)
            slot[order] = np.arange(len(items))
            self._cache["audience"] = (item_indptr, owners[order], slot)
        return self._cache["audience"]

    def test_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """`split_csr("test")`."""
        return self.split_csr("test")

    def valid_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """`split_csr("valid")`."""
        return self.split_csr("valid")

    def validate(self) -> None:
        """Checks shapes, dtypes and ranges of everything; raises `DataError` on the first problem."""
        for split in ("train", "valid", "test"):
            inter = getattr(self, split)
            if inter is None:
                continue
            for col, hi in (("user", self.num_users), ("item", self.num_items)):
                arr = getattr(inter, col)
                if arr.size and (arr.min() < 0 or arr.max() >= hi):
                    raise DataError(f"{self.name} {split}.{col} rows must lie in [0, {hi}), got "
                                    f"[{arr.min()}, {arr.max()}]")
        self._validate_cold_items()
        for side, specs, feats, rows in (("user", self.user_feature_specs, self.user_features, self.num_users),
                                         ("item", self.item_feature_specs, self.item_features, self.num_items)):
            if sorted(s.name for s in specs) != sorted(feats):
                raise DataError(f"{self.name} {side} feature specs {[s.name for s in specs]} do not match "
                                f"feature arrays {sorted(feats)}")
            for spec in specs:
                spec.check(feats[spec.name], rows, f"{self.name} {side}")

    def _validate_cold_items(self) -> None:
        cold = np.asarray(self.cold_items)
        if cold.ndim != 1 or (cold.size and (cold.min() < 0 or cold.max() >= self.num_items
                                             or np.any(cold[1:] <= cold[:-1]))):
            raise DataError(f"{self.name} cold_items must be sorted distinct item rows in [0, {self.num_items}), "
                            f"got shape {cold.shape}")
        for split in ("train", "valid"):
            inter = getattr(self, split)
            if cold.size and inter is not None and np.isin(inter.item, cold).any():
                raise DataError(f"{self.name} {split} holds interactions of cold items; cold items must be held "
                                "out of training entirely")

    def replace(self, **changes) -> "Dataset":
        """A copy with some fields changed (caches are not carried over)."""
        return dataclasses.replace(self, **changes)
