"""Request encoding and the towers of the server: raw ids and feature values -> embeddings, with the run's
vocabularies; `ClientError` carries a 4xx status and reason for any bad request."""

from __future__ import annotations

import dataclasses
import types

import numpy as np

from serve.manifest import IndexLoadError


class ClientError(Exception):
    """A request the server cannot answer as asked; `status` is the 4xx (or 500 / 503) to send with `detail`."""

    def __init__(self, status: int, detail):
        super().__init__(detail)
        self.status, self.detail = status, detail


_INT64 = (-(1 << 63), (1 << 63) - 1)


def as_id_kind(raw, kind: str):
    """A raw JSON id as an index/vocabulary id of `kind` ("int" or "str"), or None when it cannot be one
    (bools, floats, out-of-int64 integers, non-numeric strings for int ids, strings holding NUL)."""
    if isinstance(raw, bool):
        return None
    if kind == "str":
        value = raw if isinstance(raw, str) else str(raw) if isinstance(raw, int) else None
        return None if value is None or "\x00" in value else value
    if isinstance(raw, str):
        text = raw.strip()
        if not (text.lstrip("-").isascii() and text.lstrip("-").isdigit() and len(text) <= 20):
            return None
        raw = int(text)
    if isinstance(raw, int) and _INT64[0] <= raw <= _INT64[1]:
        return raw
    return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass
class Query:
    """One top-k request, encoded: user row (-1 = unknown), one row of each user feature, history rows.
    `feats` / `history` None for a known user = their stored ones (gathered per batch by `embed_queries`).
    `id_emb`: the ID embedding of a user id outside the vocabulary of a hashed user table (its hashed rows)."""
    row: int
    feats: dict | None
    history: np.ndarray | None
    k: int
    exclude: list
    id_emb: np.ndarray | None = None
    conditions: list[int] | None = None   # a conditional model's requested condition codes (None = unconditioned)
    condition: int = -1                   # the code this row feeds the tower (one per condition; -1 = none)


class Model:
    """The restored towers plus the training data's lookups (stored user features and histories, item
    features), turning raw requests into tower inputs and running the towers at padded batch sizes."""

    def __init__(self, run_dir, *, step: int | None, batch_sizes: tuple[int, ...]):
        from data.load import load
        from towers.inference.vocab import VocabularyMismatch, check_vocabularies
        from towers.restore import load_trained
        from towers.two_tower import feature_names

        self.trained = t = load_trained(run_dir, step)
        self.ds = load(t.config["data"])
        try:   # the same ids in the same rows, not only as many: stored features, histories, exclude_seen
            check_vocabularies(t, self.ds)
        except VocabularyMismatch as e:
            raise IndexLoadError(f"{e}; serve from the data the model was trained on") from None
        self.batch_sizes = batch_sizes
        self.model_version = t.model_version
        self.user_names, self.item_names = feature_names(t.model)
        self.specs = {**{s.name: s for s in t.model.item.features.specs},
                      **{s.name: s for s in t.model.user.features.specs}}
        self.use_history = t.model.user.use_history
        self.history_len = int(t.config["data"].get("history_len", 0) or 0)
        self.item_id_kind = "str" if t.item_vocab.raw_ids.dtype.kind == "U" else "int"
        self.user_id_kind = "str" if t.user_vocab.raw_ids.dtype.kind == "U" else "int"
        self.user_table = t.tables.get("user") if t.model.user.use_id else None
        # Hashed tables give every raw id an embedding: unseen user ids and upserted item ids included.
        self.user_hashed = self.user_table is not None and "user" in t.hashing
        self.item_hashed = t.model.item.use_id and "item" in t.hashing
        self.item_table = t.tables.get("item")
        self.output_dim = int(t.config["model"]["output_dim"])
        self.condition = t.config["model"]["user"].get("condition")   # a conditional tower's item feature

    # ------------------------------------------------------------------------------------------ features
    def _code(self, name: str, value) -> int:
        """One raw categorical value -> its code: through the feature's vocabulary (unknown -> -1) when the
        run has one, else the value must already be an integer code."""
        spec, vocab = self.specs[name], self.trained.feature_vocabs.get(name)
        if vocab is not None:
            kind = "str" if vocab.raw_ids.dtype.kind == "U" else "int"
            key = as_id_kind(value, kind)
            if key is None:
                raise ClientError(422, f"feature {name!r}: value {value!r} is not a {kind} value of its vocabulary")
            return int(vocab.lookup(np.asarray([key]), missing="minus_one")[0])
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < spec.size:
            raise ClientError(422, f"feature {name!r} has no value vocabulary: give its integer code in "
                                   f"[0, {spec.size}), got {value!r}")
        return value

    def _encode(self, name: str, value) -> np.ndarray:
        spec = self.specs[name]
        if spec.kind == "dense":
            values = value if isinstance(value, list) else [value]
            if len(values) != spec.size or not all(_is_number(v) and abs(v) <= 1e6 for v in values):
                raise ClientError(422, f"feature {name!r} is dense: give {spec.size} finite number(s) within "
                                       f"+-1e6, got {str(value)[:100]}")
            return np.asarray(values, np.float32)
        if spec.kind == "categorical":
            return np.asarray(max(self._code(name, value), 0), np.int32)   # unknown value -> code 0
        values = value if isinstance(value, list) else [value]
        codes = list(dict.fromkeys(c for c in (self._code(name, v) for v in values[:10_000]) if c >= 0))
        out = np.full(spec.max_len, -1, np.int32)   # unknown values dropped, padding -1 at the end
        out[:min(len(codes), spec.max_len)] = codes[:spec.max_len]
        return out

    def features(self, names: list[str], stored: dict | None, row: int, given: dict | None) -> dict:
        """One row of each feature the tower reads: the stored row for known ids, defaults (unknown /
        empty / zero) otherwise, overridden by the request's raw values."""
        unknown = sorted(set(given or {}) - set(names))
        if unknown:
            raise ClientError(422, f"unknown feature(s) {unknown[:10]}; this tower reads {names}")
        out = {}
        for name in names:
            spec = self.specs[name]
            if given and name in given:
                out[name] = self._encode(name, given[name])
            elif row >= 0:
                out[name] = np.asarray(stored[name][row])
            else:
                out[name] = {"categorical": np.asarray(0, np.int32), "multihot": np.full(spec.max_len, -1, np.int32),
                             "dense": np.zeros(spec.size, np.float32)}[spec.kind]
        return out

    # ------------------------------------------------------------------------------------------- queries
    def make_query(self, req, index_id_kind: str) -> Query:
        """Validates and encodes a `TopKRequest` (raises `ClientError`).

        A known user's stored features and history are not copied here: the query marks them (None) and
        `embed_queries` gathers them for the whole batch at once, which costs a fraction of per-request
        lookups on the event loop.
        """
        key = None if req.user_id is None else as_id_kind(req.user_id, self.user_id_kind)
        row = -1 if key is None else int(self.trained.user_vocab.lookup(np.asarray([key]), missing="minus_one")[0])
        id_emb = None
        if row < 0 and key is not None and self.user_hashed:
            id_emb = self.trained.id_embeddings("user", np.asarray([key]))[0]
        hist_rows = None
        if req.history is not None:
            keys = [h for h in (as_id_kind(v, self.item_id_kind) for v in req.history) if h is not None]
            rows = self.trained.item_vocab.lookup(np.asarray(keys), missing="minus_one") if keys else np.zeros(0)
            hist_rows = np.asarray(rows[rows >= 0], np.int32)
        if row < 0 and id_emb is None and not ((req.features and self.user_names) or
                                               (req.history and self.use_history)):
            raise ClientError(422, "unknown user and no features/history: give user_id of a trained user, or "
                                   f"features (this tower reads {self.user_names}) or history "
                                   f"({'used' if self.use_history else 'not used'} by this tower)")
        feats = None if row >= 0 and req.features is None else \
            self.features(self.user_names, self.ds.user_features, row, req.features)
        history = None
        if self.use_history and not (row >= 0 and hist_rows is None):
            history = np.full(self.history_len, -1, np.int32)
            kept = hist_rows[:self.history_len] if hist_rows is not None else []
            history[:len(kept)] = kept
        exclude = [e for e in (as_id_kind(v, index_id_kind) for v in (req.exclude or [])) if e is not None]
        if req.exclude_seen:
            # A known user's stored history is among their training items, so those cover it.
            seen = hist_rows.tolist() if hist_rows is not None else []
            if row >= 0:
                indptr, items = self.ds.train_csr()
                seen += items[indptr[row]:indptr[row + 1]].tolist()
            exclude += self.trained.item_vocab.raw_ids[np.asarray(seen, np.int64)].tolist() if seen else []
        return Query(row, feats, history, req.k, exclude, id_emb)

    def embed_queries(self, queries: list[Query]) -> np.ndarray:
        """float32[len(queries), D] through `towers.inference.embed.embed_users`, padded to a compiled batch
        size. Stored features and histories of known users (None in their queries) are gathered for the batch
        in one go (`stored_user_inputs`)."""
        from towers.inference.embed import UserInputs, embed_users, stored_user_inputs

        missing = [q.row for q in queries if q.feats is None or (self.use_history and q.history is None)]
        stored = stored_user_inputs(self.trained, self.ds, np.asarray(missing, np.int32), self.history_len)
        at = {row: j for j, row in enumerate(missing)}
        feats = {n: np.stack([stored.features[n][at[q.row]] if q.feats is None else q.feats[n] for q in queries])
                 for n in self.user_names}
        history = None
        if self.use_history:
            history = np.stack([stored.history[at[q.row]] if q.history is None else q.history for q in queries])
        id_emb = None
        if self.user_hashed:   # always given (zeros for ids in the vocabulary): one compiled shape per size
            id_emb = np.zeros((len(queries), self.user_table.shape[1]), np.float32)
            for j, q in enumerate(queries):
                if q.id_emb is not None:
                    id_emb[j] = q.id_emb
        condition = np.asarray([q.condition for q in queries], np.int32) if self.condition else None
        inputs = UserInputs(np.asarray([q.row for q in queries], np.int32), feats, history, id_emb, condition)
        return embed_users(self.trained, self.ds, inputs, buckets=self.batch_sizes)

    def item_embeddings(self, items, id_kind: str, dim: int) -> tuple[list, np.ndarray]:
        """Upsert items -> (ids of `id_kind`, float32[M, dim]): explicit embeddings as given, features through
        the item tower by the recipe export and evaluation follow (`towers.inference.embed.embed_items`): the ID
        row only of an item that trained, features alone otherwise, the hashed rows of a new id when the item
        table is hashed."""
        from towers.inference.embed import embed_items

        ids = [as_id_kind(it.id, id_kind) for it in items]
        bad = [it.id for it, v in zip(items, ids) if v is None]
        if bad:
            raise ClientError(422, f"item ids {bad[:10]} are not {id_kind} ids like this index's")
        emb = np.zeros((len(items), dim), np.float32)
        by_feat = [j for j, it in enumerate(items) if it.features is not None]
        for j, it in enumerate(items):
            if it.embedding is not None:
                if len(it.embedding) != dim:
                    raise ClientError(422, f"item {it.id!r}: embedding has {len(it.embedding)} values, the index "
                                           f"holds dim {dim}")
                emb[j] = it.embedding
        if by_feat:
            keys = [ids[j] for j in by_feat]
            rows = self.trained.item_vocab.lookup(np.asarray(keys), missing="minus_one").astype(np.int32)
            feats = [self.features(self.item_names, self.ds.item_features, int(r), items[j].features)
                     for j, r in zip(by_feat, rows)]
            stacked = {n: np.stack([f[n] for f in feats]) for n in self.item_names}
            emb[by_feat] = embed_items(self.trained, self.ds, rows, features=stacked, raw_ids=np.asarray(keys),
                                       buckets=self.batch_sizes)
        return ids, emb

    def item_conditions(self, items, id_kind: str, feature: str) -> np.ndarray:
        """The condition codes of upserted items, for an index that filters by `feature`: the request's value of
        the feature when given (raw values, encoded as for the tower), else the stored value of an item the
        training data holds. int32[M] (categorical) or int32[M, L] (multihot, -1 padded). A new item without
        the value is a 422: a filtered search could never return it."""
        spec = self.specs.get(feature)
        if spec is None:   # the item tower does not read it: the data's spec
            spec = next(s for s in self.ds.item_feature_specs if s.name == feature)
            self.specs[feature] = spec
        keys = [as_id_kind(it.id, id_kind) for it in items]
        rows = self.trained.item_vocab.lookup(np.asarray(keys), missing="minus_one")
        out = []
        for it, row in zip(items, rows.tolist()):
            if it.features is not None and feature in it.features:
                given = it.features[feature]
                values = given if isinstance(given, list) else [given]
                codes = [self._code(feature, v) for v in values[:spec.max_len]]
                if -1 in codes or not codes or len(values) > spec.max_len or \
                        (spec.kind == "categorical" and len(values) != 1):
                    raise ClientError(422, f"item {it.id!r}: features.{feature}={str(given)[:100]} must be "
                                           f"{'one known value' if spec.kind == 'categorical' else 'known values'}"
                                           f" of {feature!r}")
                row_codes = np.full(spec.max_len, -1, np.int32)
                row_codes[:len(codes)] = codes
                out.append(row_codes[0] if spec.kind == "categorical" else row_codes)
            elif row >= 0:
                out.append(np.asarray(self.ds.item_features[feature][row]))
            else:
                raise ClientError(422, f"item {it.id!r}: new to the model, and this index filters by {feature!r}: "
                                       f"give features.{feature}")
        return np.stack(out).astype(np.int32)

    def warmup(self) -> None:
        """Compiles the user tower for every batch size and the item tower for the smallest one."""
        blank = self.features(self.user_names, None, -1, None)
        hist = np.full(self.history_len, -1, np.int32) if self.use_history else None
        for size in self.batch_sizes:
            self.embed_queries([Query(-1, blank, hist, 1, [])] * size)
        if self.item_names or self.trained.model.item.use_id:
            item = types.SimpleNamespace(id=self.trained.item_vocab.raw_ids[0].item(), features={}, embedding=None)
            self.item_embeddings([item], self.item_id_kind, self.output_dim)
