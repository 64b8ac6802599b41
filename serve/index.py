"""Top-k retrieval backends behind one interface, `TopK`: `BruteForce` (exact, numpy, the reference) here,
and `serve.scann_index.ScaNNIndex` (ScaNN tree + asymmetric hashing + exact reordering; exact below a corpus
size). `serve.indexes.make_index` builds either from an `index:` config and `TopK.load` reads either back.

Both keep the item embeddings and ids themselves, in "slot" order: slot i holds `ids[i]`. ScaNN numbers its
datapoints the same way (checked on scann 1.4.2: an insert appends a slot; deleting slot s moves the last
slot into s, one id after another), so ScaNN's own docid pickle is never used and the ids stay a plain array.

Thread safety: every public method takes the index's reader-writer lock. Searches run concurrently with each
other; `upsert`, `delete`, `save` and `rebuild` wait for running searches and block new ones while they run.
`upsert` and `delete` are all-or-nothing: if any step fails (the backend part-way through, say), the change is
undone before the lock is released and `MutationError` says so, so no search ever sees half of a change.
`generation` counts the changes applied; `search_with_generation` reads it under the search's own lock, so a
caller can label an answer with the exact corpus it came from.
A server hot-swaps a whole index by building or loading a new `TopK` and replacing its reference to it
(assignment is atomic); searches already inside the old index finish there.

Conditional retrieval: an index may hold, per slot, the codes of one item categorical or multihot feature (the
run's `model.user.condition`, `set_condition`); `search(..., conditions=int[Q])` then returns only items holding
each query's value (`towers.inference.filtered.filtered_topk`: small values exactly, large ones by the backend's
ANN, filtered). The codes follow every upsert (new items bring theirs), delete, undo, save and load; an index
directory without them loads as before and answers unfiltered searches only.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import threading

import numpy as np

from data.ids import as_id_array
from towers.inference.filtered import (ConditionLists, ConditionValueError, FilterStats, as_codes,
                                       check_conditions, filtered_topk)
from towers.inference.search import exact_topk_host, topk_excluding

_ANN_ATTEMPTS = 3           # ANN searches (each deeper and 4x wider) before exact search answers a query


__all__ = ["BruteForce", "ConditionValueError", "MutationError", "TopK", "UnknownIdError"]


class UnknownIdError(LookupError):
    """`delete` named ids the index does not hold (nothing was deleted)."""


class MutationError(RuntimeError):
    """An upsert or delete failed after validation (in the backend, or out of memory) and was undone: the index
    holds and answers exactly what it did before the call."""


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers so mutations cannot starve."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting = 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _as_matrix(x, what: str, dim: int | None, other: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim) or arr.dtype.kind not in "fiu":
        want = f"[n, {dim}]" if dim is not None else "[n, dim]"
        raise ValueError(f"{what} must be a float array {want} ({other}), got shape {arr.shape} dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} {arr.shape} holds NaN or inf values; scores would be meaningless")
    return arr


def _as_ids(ids, n: int, what: str) -> np.ndarray:
    arr = as_id_array(np.asarray(ids).reshape(-1) if np.ndim(ids) == 0 else ids, what)
    if arr.shape[0] != n:
        raise ValueError(f"{what} has {arr.shape[0]} ids but the embeddings have {n} rows")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{what} repeats ids, e.g. {uniq[counts > 1][:5].tolist()}; ids must be distinct")
    return arr


class TopK:
    """Maximum-inner-product top-k over a mutable item corpus.

    Subclasses set `kind`, `is_exact` and implement the `_backend_*` hooks; the base class owns ids, vectors,
    validation, exclusions and persistence (`ids.npy`, `embeddings.npy`, `index.json` + backend files).
    Searching is the inference layer's (`towers.inference.search`): equal scores come by slot, smaller first.
    Every subclass registers its `kind` for `load`; `serve.indexes` imports them all.

    `files` names every file `save` may write (relative paths): a loader refuses any other file, so an index
    directory can never slip in something a library would execute on load (a pickle, say).
    """
    kind = "abstract"
    files: tuple[str, ...] = ("embeddings.npy", "ids.npy", "index.json", "conditions.npy", "condition_values.npy")
    # Filtered search (`towers.inference.filtered.filtered_topk`): values with at most `exact_below` items are
    # searched exactly; larger ones by the ANN, fetching `overfetch` / share times what they need, at most
    # `max_ann_fetch` (None = the corpus). Recorded in index.json with the codes.
    filter_settings = {"exact_below": 50_000, "overfetch": 4.0, "max_ann_fetch": None}

    _kinds: dict[str, type["TopK"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:   # a subclass of a backend (a test double, say) does not replace it
            TopK._kinds[cls.kind] = cls

    def __init__(self):
        self._lock = _RWLock()
        self._emb = np.zeros((0, 0), np.float32)    # capacity buffer; rows [0, n) are live
        self._ids = np.zeros(0, np.int64)           # same capacity; the id of each slot
        self._n = 0
        self._pos: dict = {}                        # id -> slot
        self.generation = 0                         # upserts and deletes applied since built or loaded
        self._condition: dict | None = None         # {"feature", "kind", "size"} of the per-slot codes
        self._codes = np.zeros((0, 1), np.int32)    # same capacity; int32[cap, L] codes, -1 = none
        self._values: np.ndarray | None = None      # the raw feature value of each code, if known
        self._lists: ConditionLists | None = None   # built lazily for the current codes and vectors
        self._lists_lock = threading.Lock()
        self.filter_settings = dict(type(self).filter_settings)
        self.filter_stats = FilterStats()           # how filtered searches were answered, summed

    # ----------------------------------------------------------------------------------------- public API
    @property
    def is_exact(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._emb.shape[1]

    @property
    def id_kind(self) -> str:
        """"int" (int64 ids) or "str" (unicode ids)."""
        return "str" if self._ids.dtype.kind == "U" else "int"

    def embeddings(self) -> np.ndarray:
        """A copy of the stored vectors, float32[N, D], row i belonging to `ids()[i]`."""
        with self._lock.read():
            return self._emb[:self._n].copy()

    def ids(self) -> np.ndarray:
        """A copy of the stored ids, int64[N] or unicode[N], in slot order."""
        with self._lock.read():
            return self._ids[:self._n].copy()

    def index(self, embeddings, ids) -> "TopK":
        """Replaces the corpus (and drops any condition codes: `set_condition` adds them). embeddings: float[N, D];
        ids: int[N] or str[N], distinct. Returns self."""
        emb = _as_matrix(embeddings, "embeddings", None, "one row per item")
        if emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"embeddings must hold at least one item of dim >= 1, got shape {emb.shape}")
        id_arr = _as_ids(ids, emb.shape[0], "ids")
        with self._lock.write():  # copies: deletes and upserts rewrite rows in place, never the caller's arrays
            self._emb, self._ids, self._n, self.generation = emb.copy(), id_arr.copy(), emb.shape[0], 0
            self._pos = {v: i for i, v in enumerate(id_arr.tolist())}
            self._condition, self._codes, self._values, self._lists = None, np.zeros((0, 1), np.int32), None, None
            self._backend_build()
        return self

    def set_condition(self, feature: str, codes, size: int, *, values=None) -> "TopK":
        """Attaches the per-item codes of the feature that filtered searches condition on.

        Args:
          feature: the item feature's name (the run's `model.user.condition`, e.g. "genres").
          codes: int[N] (categorical, values 0..size-1) or int[N, L] (multihot, -1 = padding), row i belonging
            to `ids()[i]`.
          size: the feature's vocabulary size V (condition values are 0..V-1).
          values: optional [V] raw feature values of the codes (e.g. genre names), for `condition_codes`.
        Returns:
          self.
        """
        arr = np.asarray(codes)
        kind = "multihot" if arr.ndim == 2 else "categorical"
        if not isinstance(feature, str) or not feature:
            raise ValueError(f"feature must be a non-empty name, got {feature!r}")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be an int >= 1 (the feature's vocabulary size), got {size!r}")
        codes2 = as_codes(arr, int(size), f"codes of {feature!r}")
        raw = None if values is None else np.asarray(values)
        if raw is not None and (raw.shape != (size,) or raw.dtype.kind not in "iuU"):
            raise ValueError(f"values of {feature!r} must be int or str [{size}] (one per code), got shape "
                             f"{raw.shape} dtype {raw.dtype}")
        with self._lock.write():
            if len(codes2) != self._n:
                raise ValueError(f"codes of {feature!r} hold {len(codes2)} items but the index {self._n}")
            self._condition = {"feature": feature, "kind": kind, "size": int(size)}
            self._codes = np.full((self._emb.shape[0], codes2.shape[1]), -1, np.int32)   # the slots' capacity
            self._codes[:self._n] = codes2
            self._values, self._lists = raw, None
        return self

    @property
    def condition(self) -> dict | None:
        """{"feature": name, "kind": "categorical" | "multihot", "size": V} of the codes that filtered searches
        use, or None when the index holds none."""
        return None if self._condition is None else dict(self._condition)

    def condition_values(self) -> np.ndarray | None:
        """The raw feature value of each code 0..V-1 (e.g. genre names), or None when unknown or no condition."""
        return None if self._values is None else self._values.copy()

    def condition_codes(self, raw) -> np.ndarray:
        """int64[Q] codes of raw feature values (e.g. ["Comedy", "Drama"]); for a feature without raw values (no
        value vocabulary) the values are its integer codes themselves. Raises `ConditionValueError` for a value
        the feature does not have, or when the index holds no condition."""
        if self._condition is None:
            raise ConditionValueError("this index holds no condition values to look up")
        if self._values is None:
            size, given = self._condition["size"], list(np.asarray(raw, dtype=object).reshape(-1))
            bad = [v for v in given if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                   or not 0 <= v < size]
            if bad:
                raise ConditionValueError(f"{self._condition['feature']!r} has no value vocabulary; give integer "
                                          f"codes in [0, {size}), got {bad[:5]}")
            return np.asarray(given, np.int64)
        query = np.asarray(raw).reshape(-1)
        if query.size and (query.dtype.kind == "U") != (self._values.dtype.kind == "U"):
            raise ConditionValueError(f"{self._condition['feature']!r} values are {self._values.dtype} but got "
                                      f"{query.dtype}")
        order = np.argsort(self._values, kind="stable")
        pos = np.minimum(np.searchsorted(self._values[order], query), len(order) - 1)
        found = self._values[order][pos] == query
        if not found.all():
            raise ConditionValueError(f"{self._condition['feature']!r} has no value(s) "
                                      f"{query[~found][:5].tolist()}")
        return order[pos].astype(np.int64)

    def conditions(self) -> np.ndarray | None:
        """A copy of the per-slot codes (int32[N], or int32[N, L] for a multihot feature), or None."""
        with self._lock.read():
            if self._condition is None:
                return None
            codes = self._codes[:self._n]
            return codes[:, 0].copy() if self._condition["kind"] == "categorical" else codes.copy()

    def search(self, queries, k: int, *, exclude=None, conditions=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by dot product for each query.

        Args:
          queries: float[Q, D] query (user) embeddings.
          k: results per query, in [1, N].
          exclude: optional sequence of Q sequences of item ids never to return for that query (e.g. items
            the user has seen); ids the index does not hold are ignored.
          conditions: optional int[Q] codes of the `condition` feature (0..V-1): query q gets only items
            holding value conditions[q]. None searches every item.
        Returns:
          (scores float32[Q, k] descending, ids [Q, k]). Only when fewer than k items remain after a query's
          exclusions (and condition) is the tail padded, with score -inf and id -1 (int ids) or "" (str ids).
        Raises:
          ConditionValueError (a ValueError): conditions given to an index without codes, or out of range.
        """
        with self._lock.read():
            return self._search(queries, k, exclude, conditions)

    def search_with_generation(self, queries, k: int, *, exclude=None,
                               conditions=None) -> tuple[np.ndarray, np.ndarray, int]:
        """`search`, and the `generation` of the corpus it searched: both read under one hold of the lock, so
        no upsert or delete can fall between them."""
        with self._lock.read():
            return (*self._search(queries, k, exclude, conditions), self.generation)

    def upsert(self, embeddings, ids, *, conditions=None) -> None:
        """Inserts new ids and replaces the vectors of ids already held. embeddings: float[M, D]; ids [M].

        conditions: the items' codes of the `condition` feature, int[M] or int[M, L] (multihot, -1 = padding);
        required when the index holds codes and an id is new; None keeps the codes of replaced ids.
        Raises ValueError / TypeError for bad input, and `MutationError` (nothing changed) if applying fails."""
        with self._lock.write():
            emb = _as_matrix(embeddings, "upsert embeddings", self.dim, f"the index holds dim {self.dim}")
            id_arr = _as_ids(ids, emb.shape[0], "upsert ids")
            if id_arr.size and ("str" if id_arr.dtype.kind == "U" else "int") != self.id_kind:
                raise TypeError(f"this index holds {self.id_kind} ids but upsert got {id_arr.dtype} ids")
            slots = np.array([self._pos.get(v, -1) for v in id_arr.tolist()], np.int64)
            old, new = slots >= 0, slots < 0
            codes = self._upsert_codes(conditions, len(id_arr), bool(new.any()))
            with self._undone_on_failure("upsert", slots[old], added=id_arr[new].tolist()):
                self._emb[slots[old]] = emb[old]
                if codes is not None:
                    if codes.shape[1] > self._codes.shape[1]:   # a longer multihot row widens every row
                        self._codes = np.pad(self._codes, ((0, 0), (0, codes.shape[1] - self._codes.shape[1])),
                                             constant_values=-1)
                    codes = np.pad(codes, ((0, 0), (0, self._codes.shape[1] - codes.shape[1])), constant_values=-1)
                    self._codes[slots[old]] = codes[old]
                first = self._n
                self._append(emb[new], id_arr[new], None if codes is None else codes[new])
                self._backend_upsert(slots[old], emb[old], first, emb[new])

    def delete(self, ids) -> None:
        """Removes items; all-or-nothing. Raises `UnknownIdError` naming ids the index does not hold, and
        `MutationError` (nothing changed) if applying fails."""
        with self._lock.write():
            id_list = list(dict.fromkeys(np.asarray(ids).reshape(-1).tolist()))
            unknown = [v for v in id_list if v not in self._pos]
            if unknown:
                raise UnknownIdError(f"cannot delete {len(unknown)} id(s) the index does not hold, e.g. "
                                     f"{unknown[:5]}; nothing was deleted")
            if len(id_list) >= self._n:
                raise ValueError(f"deleting {len(id_list)} of {self._n} items would leave the index empty; "
                                 "build a new index instead")
            # Swap-removes write only the deleted ids' slots and the last len(id_list) ones.
            touched = np.union1d([self._pos[v] for v in id_list], np.arange(self._n - len(id_list), self._n))
            with self._undone_on_failure("delete", touched):
                slots = []
                for v in id_list:  # swap-remove, one id at a time: the order ScaNN's delete uses
                    slot, last = self._pos.pop(v), self._n - 1
                    if slot != last:
                        self._emb[slot], self._ids[slot] = self._emb[last], self._ids[last]
                        if self._condition is not None:
                            self._codes[slot] = self._codes[last]
                        self._pos[self._ids[slot].item()] = slot
                    self._n -= 1
                    slots.append(slot)
                self._backend_delete(slots)

    def params(self) -> dict:
        """What `index.json` (and the manifest) record about this index; "condition" only when it holds codes."""
        out = {"type": self.kind, "is_exact": self.is_exact, "count": self._n, "dim": self.dim,
               "id_kind": self.id_kind}
        if self._condition is not None:
            out["condition"] = {**self._condition, "values": self._values is not None,
                                "search": dict(self.filter_settings)}
        return out

    def save(self, directory) -> list[str]:
        """Writes the index into `directory` (created). Returns the relative paths of the files written."""
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock.read():  # a consistent snapshot: mutations wait, searches go on
            arrays = [("ids.npy", self._ids[:self._n]), ("embeddings.npy", self._emb[:self._n])]
            if self._condition is not None:
                codes = self._codes[:self._n]
                arrays.append(("conditions.npy", codes[:, 0] if self._condition["kind"] == "categorical" else codes))
                if self._values is not None:
                    arrays.append(("condition_values.npy", self._values))
            for name, arr in arrays:
                with open(d / name, "wb") as f:
                    np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
            (d / "index.json").write_text(json.dumps(self.params(), indent=2, sort_keys=True))
            self._backend_save(d)
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())

    @staticmethod
    def registered(kind) -> type["TopK"]:
        """The subclass registered for `kind`. Raises ValueError for any other (`serve.indexes` imports every
        backend, so all of them are registered once it is imported)."""
        if kind not in TopK._kinds:
            raise ValueError(f"index type {kind!r} is not one of {sorted(TopK._kinds)}")
        return TopK._kinds[kind]

    @staticmethod
    def load(directory) -> "TopK":
        """Reads an index written by `save` (no checksum checks: `serve.manifest.load_index` does those)."""
        d = pathlib.Path(directory)
        params = json.loads((d / "index.json").read_text())
        try:
            cls = TopK.registered(params.get("type"))
        except ValueError as e:
            raise ValueError(f"{d}/index.json: {e}") from None
        index = cls._from_params(params)
        emb = np.load(d / "embeddings.npy", allow_pickle=False)
        ids = np.load(d / "ids.npy", allow_pickle=False)
        index._emb, index._ids, index._n = _as_matrix(emb, "embeddings.npy", None, ""), _as_ids(
            ids, emb.shape[0], "ids.npy"), emb.shape[0]
        index._pos = {v: i for i, v in enumerate(index._ids.tolist())}
        if params.get("condition") is not None:   # directories written before conditional retrieval have none
            index._load_condition(d, params["condition"])
        index._backend_load(d, params)
        return index

    # ------------------------------------------------------------------------------------------ internals
    def _load_condition(self, d: pathlib.Path, cond: dict) -> None:
        """Reads conditions.npy (and condition_values.npy) as `index.json`'s "condition" describes them."""
        kind, size = cond.get("kind"), cond.get("size")
        if kind not in ("categorical", "multihot") or not isinstance(size, int) or size < 1:
            raise ValueError(f"{d}/index.json: condition {cond!r} needs kind categorical|multihot and size >= 1")
        codes = np.load(d / "conditions.npy", allow_pickle=False)
        if codes.ndim != (1 if kind == "categorical" else 2) or len(codes) != self._n:
            raise ValueError(f"{d}/conditions.npy has shape {codes.shape}; a {kind} feature of {self._n} items "
                             "was expected")
        self._codes = as_codes(codes, size, f"{d}/conditions.npy")
        self._condition = {"feature": str(cond.get("feature")), "kind": kind, "size": size}
        if cond.get("values"):
            values = np.load(d / "condition_values.npy", allow_pickle=False)
            if values.shape != (size,) or values.dtype.kind not in "iuU":
                raise ValueError(f"{d}/condition_values.npy has shape {values.shape} dtype {values.dtype}; "
                                 f"[{size}] int or str values were expected")
            self._values = values
        self.filter_settings.update({k: v for k, v in (cond.get("search") or {}).items()
                                     if k in self.filter_settings})

    def _upsert_codes(self, conditions, m: int, any_new: bool) -> np.ndarray | None:
        """The validated int32[M, L] codes of an upsert, or None (the index holds none, or replaced items keep
        theirs). Raises `ConditionValueError` for codes the index cannot hold or new items without them."""
        if self._condition is None:
            if conditions is not None:
                raise ConditionValueError("upsert got condition codes but this index holds none (it was built "
                                          "without a condition feature)")
            return None
        feature, kind, size = self._condition["feature"], self._condition["kind"], self._condition["size"]
        if conditions is None:
            if any_new:
                raise ConditionValueError(f"this index filters by {feature!r}: upsert needs conditions= (the "
                                          f"{kind} codes of every upserted item) when it adds items")
            return None
        arr = np.asarray(conditions)
        if kind == "categorical" and arr.ndim != 1:
            raise ConditionValueError(f"{feature!r} is categorical: conditions must be int[{m}], got shape "
                                      f"{arr.shape}")
        try:
            codes = as_codes(arr, size, f"upsert conditions of {feature!r}")
        except ValueError as e:
            raise ConditionValueError(str(e)) from None
        if len(codes) != m:
            raise ConditionValueError(f"upsert conditions hold {len(codes)} items but the embeddings {m}")
        return codes

    def _condition_lists(self) -> ConditionLists:
        """The inverted lists of the current codes and vectors (built once per change; the caller holds the
        read lock, so no change can happen meanwhile)."""
        lists = self._lists
        if lists is None:
            with self._lists_lock:
                if self._lists is None:
                    self._lists = ConditionLists(self._codes[:self._n], self._condition["size"],
                                                 self._emb[:self._n])
                lists = self._lists
        return lists

    def _search(self, queries, k, exclude, conditions=None) -> tuple[np.ndarray, np.ndarray]:
        """`search` without the lock (the caller holds it)."""
        q = self._check_search(queries, k)
        ex_rows, ex_slots = self._exclusions(exclude, q.shape[0])
        if conditions is not None:
            if self._condition is None:
                raise ConditionValueError("this index holds no condition codes (exported without "
                                          "model.user.condition); search without conditions")
            cond = check_conditions(conditions, len(q), self._condition["size"])
            settings, stats = self.filter_settings, FilterStats()
            scores, slots = filtered_topk(
                q, k, cond, self._condition_lists(), *_pairs_csr(ex_rows, ex_slots, len(q)),
                ann=None if self.is_exact else self._backend_filtered_ann, exact_below=settings["exact_below"],
                overfetch=settings["overfetch"], max_ann_fetch=settings["max_ann_fetch"],
                max_attempts=_ANN_ATTEMPTS, stats=stats)
            with self._lists_lock:
                self.filter_stats.add(stats)
        elif self.is_exact or not len(q):
            scores, slots = self._exact(q, k, ex_rows, ex_slots)
        else:
            scores, slots = self._ann_with_exclusions(q, k, ex_rows, ex_slots)
        return scores, self._slot_ids(slots)

    @contextlib.contextmanager
    def _undone_on_failure(self, what: str, touched: np.ndarray, added=()):
        """Runs a mutation (the caller holds the write lock) that rewrites only the rows at `touched` and
        appends `added` ids after the live rows; if it raises, puts the host arrays and the backend back as
        they were and raises `MutationError`. Saving M rows, not a copy of the corpus, keeps small upserts
        into a large index cheap. A success bumps `generation`."""
        row_codes = self._codes[touched] if self._condition is not None else None
        saved = (self._emb, self._ids, self._n, touched, self._emb[touched], self._ids[touched], self._codes,
                 row_codes)
        self._lists = None   # rebuilt from the changed codes and vectors by the next filtered search
        try:
            yield
        except BaseException as e:   # an interrupt, too, must not leave half a change behind
            self._restore(saved, added)
            if not isinstance(e, Exception):
                raise
            raise MutationError(f"{what} failed ({type(e).__name__}: {e}); it was undone, nothing was "
                                "changed") from e
        self.generation += 1

    def _restore(self, saved: tuple, added) -> None:
        """Puts back the state `_undone_on_failure` saved: the arrays (an append may have replaced them), the
        rows at the touched slots and their ids' slots, without the appended ids; then the backend."""
        emb, ids, n, touched, rows, row_ids, codes, row_codes = saved
        for v in added:
            self._pos.pop(v, None)
        self._emb, self._ids, self._n, self._codes, self._lists = emb, ids, n, codes, None
        emb[touched], ids[touched] = rows, row_ids
        if row_codes is not None:
            codes[touched] = row_codes
        for slot, v in zip(touched.tolist(), row_ids.tolist()):
            self._pos[v] = slot
        self._backend_restore(touched)

    def _check_search(self, queries, k) -> np.ndarray:
        q = _as_matrix(queries, "queries", self.dim, f"the index holds {self._n} items of dim {self.dim}, "
                                                     f"embeddings shape {(self._n, self.dim)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self._n:
            raise ValueError(f"k must be an int in [1, {self._n}] (the corpus size), got k={k!r}")
        return q

    def _exclusions(self, exclude, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
        """(query row, slot) pairs to drop, for ids the index holds."""
        if exclude is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(exclude) != num_queries:
            raise ValueError(f"exclude must hold one id list per query ({num_queries}), got {len(exclude)}")
        rows, slots = [], []
        for r, items in enumerate(exclude):
            arr = np.asarray(items).reshape(-1)
            if arr.size and (arr.dtype.kind == "U") != (self.id_kind == "str"):
                raise TypeError(f"this index holds {self.id_kind} ids but exclude[{r}] has dtype {arr.dtype}")
            found = [s for s in (self._pos.get(v) for v in set(arr.tolist())) if s is not None]
            rows += [r] * len(found)
            slots += found
        return np.asarray(rows, np.int64), np.asarray(slots, np.int64)

    def _slot_ids(self, slots: np.ndarray) -> np.ndarray:
        pad = "" if self.id_kind == "str" else -1
        ids = self._ids[np.maximum(slots, 0)]
        return np.where(slots >= 0, ids, np.asarray(pad, ids.dtype))

    def _exact(self, q, k, ex_rows, ex_slots) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the live slots: (scores float32[Q, k], slots int64[Q, k], -1 where none is left)."""
        return exact_topk_host(q, self._emb[:self._n], k, *_pairs_csr(ex_rows, ex_slots, len(q)))

    def _ann_with_exclusions(self, q, k, ex_rows, ex_slots) -> tuple[np.ndarray, np.ndarray]:
        """`towers.inference.search.topk_excluding` over the backend: over-fetch k + (most exclusions of a query),
        search again deeper and wider for queries left short, and answer those still short exactly, so a query
        gets k items whenever k are eligible."""
        indptr, slots = _pairs_csr(ex_rows, ex_slots, len(q))

        def exact(rows, sub_indptr, sub_slots):
            return exact_topk_host(q[rows], self._emb[:self._n], k, sub_indptr, sub_slots)

        scores, found, _ = topk_excluding(self._backend_ann, exact, q, k, indptr, slots, num_items=self._n,
                                          overfetch=int(np.diff(indptr).max(initial=0)),
                                          max_attempts=_ANN_ATTEMPTS)
        return scores, found

    def _append(self, emb: np.ndarray, ids: np.ndarray, codes: np.ndarray | None = None) -> None:
        m = emb.shape[0]
        if self._n + m > self._emb.shape[0]:  # grow geometrically: upserts of a few items stay O(1) amortised
            cap = max(self._n + m, 2 * self._emb.shape[0])
            self._emb = np.concatenate([self._emb[:self._n], np.zeros((cap - self._n, self.dim), np.float32)])
            self._ids = np.concatenate([self._ids[:self._n], np.zeros(cap - self._n, self._ids.dtype)])
            if self._condition is not None:
                self._codes = np.concatenate([self._codes[:self._n],
                                              np.full((cap - self._n, self._codes.shape[1]), -1, np.int32)])
        if ids.dtype.kind == "U" and ids.dtype.itemsize > self._ids.dtype.itemsize:
            self._ids = self._ids.astype(ids.dtype)  # a longer string id widens the array
        self._emb[self._n:self._n + m], self._ids[self._n:self._n + m] = emb, ids
        if codes is not None:
            self._codes[self._n:self._n + m] = codes
        for i, v in enumerate(ids.tolist()):
            self._pos[v] = self._n + i
        self._n += m

    # Backend hooks: exact search needs no extra structure, so they do nothing by default.
    @classmethod
    def _from_params(cls, params: dict) -> "TopK":
        return cls()

    def _backend_build(self) -> None:
        pass

    def _backend_upsert(self, replaced: np.ndarray, replaced_emb: np.ndarray, first_new: int,
                        new_emb: np.ndarray) -> None:
        pass

    def _backend_delete(self, slots: list[int]) -> None:
        pass

    def _backend_restore(self, touched: np.ndarray) -> None:
        """After a failed upsert or delete, with the host arrays restored: make the backend match them again
        (only the rows at `touched` and any slots from `len(self)` on can differ). Must not raise."""

    def _backend_save(self, directory: pathlib.Path) -> None:
        pass

    def _backend_load(self, directory: pathlib.Path, params: dict) -> None:
        pass

    def _backend_filtered_ann(self, q, fetch: int, attempt: int, share: float) -> tuple[np.ndarray, np.ndarray]:
        """`_backend_ann` for a filtered search whose value holds a fraction `share` of the corpus (a backend may
        search wider for rare values); by default the same search."""
        return self._backend_ann(q, fetch, attempt)

    def _backend_ann(self, q, fetch: int, attempt: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32[Q, fetch], slots int64[Q, fetch]) without exclusions, NaN / -1 for missing ones;
        `attempt` counts the searches so far for these queries (search wider on later ones)."""
        raise NotImplementedError


class BruteForce(TopK):
    """Exact search: one matmul per query block and a partial sort (numpy). The reference for every ANN."""
    kind = "brute_force"


def _pairs_csr(rows: np.ndarray, slots: np.ndarray, num_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(query row, slot) pairs -> a CSR aligned with the queries."""
    order = np.argsort(rows, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_queries))]).astype(np.int64)
    return indptr, slots[order]
