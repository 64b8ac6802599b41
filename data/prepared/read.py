"""Reading a prepared dataset: its side tables in memory (they grow with users and items), its user records from
the shards only for the users asked for (they grow with interactions).

`PreparedData` offers what training, evaluation and batch candidates need from a `Dataset` without the
interactions in memory: counts, vocabularies, features, `sequences(users, split)` (a CSR of those users' items)
and `load_users(users)`, an ordinary `Dataset` holding only those users' rows, on which the in-memory
evaluation code runs unchanged.
"""
from __future__ import annotations

import os
import pathlib
import threading

import numpy as np
from array_record.python import array_record_module as arm

from data.errors import DataError
from data.prepared import format as fmt
from data.types import Dataset, FeatureSpec, Interactions, Vocab, log_prob


class _Rows:
    """A split's size without its rows, and the time range of train (for the pre-training window check)."""

    def __init__(self, n: int, window=None):
        self.n = int(n)
        self.timestamp = np.asarray(window if window else [0], np.int64)

    def __len__(self) -> int:
        return self.n


class PreparedData:
    """A prepared dataset directory, opened and checked.

    Args:
      root: the directory `python -m data.prepare` wrote.
      verify: "full" checks every file's sha256 against the manifest, "size" only sizes.
    """

    def __init__(self, root: os.PathLike, verify: str = "full"):
        self.root = pathlib.Path(root)
        self.manifest = m = fmt.read_manifest(self.root, verify)
        self.name = m["name"]
        self.stats = m["stats"]
        self.user_vocab = Vocab.load(self.root / "vocab" / "user.npy")
        self.item_vocab = Vocab.load(self.root / "vocab" / "item.npy")
        self.feature_vocabs = {k: Vocab.load(self.root / "vocab" / f"feature_{k}.npy") for k in m["feature_vocabs"]}
        self.user_feature_specs = [FeatureSpec(**s) for s in m["user_feature_specs"]]
        self.item_feature_specs = [FeatureSpec(**s) for s in m["item_feature_specs"]]
        self.user_features = {s.name: np.load(self.root / "features" / f"user_{s.name}.npy", allow_pickle=False)
                              for s in self.user_feature_specs}
        self.item_features = {s.name: np.load(self.root / "features" / f"item_{s.name}.npy", allow_pickle=False)
                              for s in self.item_feature_specs}
        self.user_counts = np.load(self.root / "user_counts.npy", allow_pickle=False)
        self._item_counts = np.load(self.root / "item_counts.npy", allow_pickle=False)
        if self.user_counts.shape != (len(self.user_vocab), 3) or self._item_counts.shape != (len(self.item_vocab),):
            raise DataError(f"{self.root}: counts do not match the vocabularies (corrupt preparation)")
        self.cold_items = np.zeros(0, np.int32)
        self.bounds = np.array([s["users"][0] for s in m["shards"]] + [m["shards"][-1]["users"][1]], np.int64)
        self.train_indptr = np.zeros(self.num_users + 1, np.int64)
        np.cumsum(self.user_counts[:, 0], out=self.train_indptr[1:])
        self.train = _Rows(m["rows"]["train"], m.get("train_window"))
        self.valid = _Rows(m["rows"]["valid"]) if m["rows"]["valid"] else None
        self.test = _Rows(m["rows"]["test"])
        self._readers: dict[int, arm.ArrayRecordReader] = {}
        self._lock = threading.Lock()

    # --- what a `Dataset` also offers -------------------------------------------------------------------------
    @property
    def num_users(self) -> int:
        return len(self.user_vocab)

    @property
    def num_items(self) -> int:
        return len(self.item_vocab)

    def item_counts(self) -> np.ndarray:
        return self._item_counts

    def item_log_prob(self) -> np.ndarray:
        """float32 [num_items]: log(count / N_train), as `Dataset.item_log_prob`."""
        return log_prob(self._item_counts, len(self.train))

    # --- records ----------------------------------------------------------------------------------------------
    def _reader(self, k: int) -> arm.ArrayRecordReader:
        with self._lock:
            if k not in self._readers:
                path = self.root / self.manifest["shards"][k]["file"]
                try:
                    reader = arm.ArrayRecordReader(str(path))
                except Exception as e:  # noqa: BLE001 - array_record raises plain RuntimeError/ValueError
                    raise DataError(f"{path}: cannot open shard: {e}") from None
                want = self.bounds[k + 1] - self.bounds[k]
                if reader.num_records() != want:
                    raise DataError(f"{path}: {reader.num_records()} records, the manifest says {want}")
                self._readers[k] = reader
            return self._readers[k]

    def records(self, users: np.ndarray) -> list[bytes]:
        """The raw records of `users` (int, any order, distinct), in the order given."""
        users = np.asarray(users, np.int64)
        if users.size and (users.min() < 0 or users.max() >= self.num_users):
            raise DataError(f"user rows must lie in [0, {self.num_users})")
        shard = np.searchsorted(self.bounds, users, side="right") - 1
        out: list[bytes | None] = [None] * len(users)
        for k in np.unique(shard):
            at = np.flatnonzero(shard == k)
            path = self.root / self.manifest["shards"][k]["file"]
            try:
                recs = self._reader(int(k)).read((users[at] - self.bounds[k]).tolist())
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{path}: cannot read records: {e}") from None
            for j, r in zip(at, recs):
                out[j] = r
        return out

    def sequences(self, users: np.ndarray, splits=("train",)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per split, (indptr int64 [n + 1], items int32) of `users`' rows in time order, aligned with `users`."""
        users = np.asarray(users, np.int64)
        if tuple(splits) == ("train",):      # the training hot path: the header and the train items only
            return {"train": self._train_items(users)}
        per = {s: [] for s in splits}
        for u, rec in zip(users, self.records(users)):
            row, items, _ = fmt.decode_user(rec)
            if row != u:
                raise DataError(f"{self.root}: record of user {row} found where user {u} belongs (corrupt shard)")
            for s in splits:
                per[s].append(items[s])
        out = {}
        for s in splits:
            indptr = np.zeros(len(users) + 1, np.int64)
            np.cumsum([len(x) for x in per[s]], out=indptr[1:])
            out[s] = (indptr, np.concatenate(per[s]) if per[s] else np.zeros(0, np.int32))
        return out

    def _train_items(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        recs = self.records(users)
        heads = np.stack([np.frombuffer(r, np.int64, fmt.HEADER) for r in recs]) if recs else \
            np.zeros((0, fmt.HEADER), np.int64)
        if not np.array_equal(heads[:, 0], users):
            bad = int(np.flatnonzero(heads[:, 0] != users)[0])
            raise DataError(f"{self.root}: record of user {heads[bad, 0]} found where user {users[bad]} belongs "
                            "(corrupt shard)")
        indptr = np.zeros(len(users) + 1, np.int64)
        np.cumsum(heads[:, 1], out=indptr[1:])
        items = [np.frombuffer(r, np.int32, int(n), offset=8 * fmt.HEADER) for r, n in zip(recs, heads[:, 1])]
        return indptr, np.concatenate(items) if items else np.zeros(0, np.int32)

    def load_users(self, users: np.ndarray | None = None) -> Dataset:
        """An in-memory `Dataset` with every vocabulary, feature and count of this one but the rows of `users`
        only (None: all users; for small datasets and tests). Item counts and log q stay those of the whole
        train split."""
        users = np.arange(self.num_users) if users is None else np.unique(np.asarray(users, np.int64))
        cols = {s: ([], [], []) for s in fmt.SPLITS}
        for start in range(0, len(users), 65536):
            chunk = users[start:start + 65536]
            for rec in self.records(chunk):
                row, items, ts = fmt.decode_user(rec)
                for s in fmt.SPLITS:
                    cols[s][0].append(np.full(len(items[s]), row, np.int32))
                    cols[s][1].append(items[s])
                    cols[s][2].append(ts[s])
        parts = {s: Interactions(*(np.concatenate(c) if c else np.zeros(0) for c in cols[s])) for s in fmt.SPLITS}
        ds = Dataset(name=self.name, train=parts["train"], test=parts["test"],
                     valid=parts["valid"] if self.valid is not None else None,
                     user_vocab=self.user_vocab, item_vocab=self.item_vocab, user_features=self.user_features,
                     item_features=self.item_features, user_feature_specs=self.user_feature_specs,
                     item_feature_specs=self.item_feature_specs, stats=self.stats,
                     feature_vocabs=self.feature_vocabs)
        ds._cache["item_counts"] = self._item_counts
        ds._cache["item_log_prob"] = self.item_log_prob()
        return ds

    def eval_subset(self, split: str = "test", max_users: int | None = None, seed: int = 0) -> Dataset:
        """The `load_users` dataset of the users an evaluation of `split` ranks for.

        Candidates are the users with `split` rows; with `max_users` a seeded sample of them is drawn the way
        `eval.holdout.heldout_users` draws it, so on a log without repeated (user, item) pairs (where every
        candidate has a held-out item) the evaluated users and metrics equal those of the in-memory dataset.
        """
        return self.load_users(self.eval_users(split, max_users, seed))

    def eval_users(self, split: str = "test", max_users: int | None = None, seed: int = 0) -> np.ndarray:
        """int32 [Q] sorted rows of the users `eval_subset` loads (no record is read): those with `split` rows,
        or a seeded sample of `max_users` of them."""
        col = {"valid": 1, "test": 2}[split]
        users = np.flatnonzero(self.user_counts[:, col] > 0).astype(np.int32)
        if max_users is not None and len(users) > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False)).astype(np.int32)
        return users

    def split_rows(self, split: str) -> np.ndarray:
        """int64 [num_users]: each user's rows in `split` ("train", "valid" or "test"), from the counts alone."""
        return self.user_counts[:, {"train": 0, "valid": 1, "test": 2}[split]].astype(np.int64)

    def train_chunks(self, chunk_users: int):
        """Yields (users int64 [q], indptr int64 [q + 1], items int32) of every user's train items, `chunk_users`
        users at a time in row order: the whole train split streamed with memory bounded by the chunk."""
        for start in range(0, self.num_users, chunk_users):
            users = np.arange(start, min(start + chunk_users, self.num_users), dtype=np.int64)
            indptr, items = self.sequences(users, ("train",))["train"]
            yield users, indptr, items

    def __getstate__(self):   # readers are reopened in each worker process
        state = dict(self.__dict__)
        state["_readers"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
