"""The HTTP top-k server: `create_app(run_dir, index_dir=None) -> FastAPI`.

Routes: `POST /v1/topk` (micro-batched user tower + index search), `POST /v1/items` (upsert by features or
embedding), `DELETE /v1/items`, `POST /v1/index:reload` (verified, atomic swap of a new export),
`GET /healthz`, `GET /metrics` (Prometheus text). The towers come from `towers.restore.load_trained`; raw ids
and feature values are encoded by `Model` with the run's vocabularies (a categorical or multi-hot feature
without a value vocabulary, e.g. a bucketed age, takes its integer codes). No training code is imported.

Layout: request encoding and the towers (`Model`), Prometheus metrics (`Metrics`), the live index and its
mutations (`ServerState`), then the ASGI guard and the app factory.

Client input never causes a 5xx: bodies are validated by `serve.schemas`, oversized bodies get 413, every
domain error is a `ClientError` with a 4xx status and a reason. Responses are ASCII JSON, so ids holding any
unicode (lone surrogates included) can be echoed in error messages.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
import threading
import time
import types

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import schemas
from serve.batcher import MicroBatcher
from serve.index import UnknownIdError
from serve.manifest import IndexLoadError, load_index

log = logging.getLogger("twotower.serve")

ROUTES = ("/v1/topk", "/v1/items", "/v1/index:reload", "/healthz", "/metrics")
_REQUEST_TIMEOUT_S = 30.0


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped (a lone surrogate in an echoed id cannot fail encoding) and no NaN."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def index_version(manifest: dict, mutations: int = 0) -> str:
    """A short content hash of an export (its files' checksums), '+N' after N upserts/deletes since loading."""
    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:12]
    return digest if not mutations else f"{digest}+{mutations}"


# ---------------------------------------------------------------------------------------- request encoding
class ClientError(Exception):
    """A request the server cannot answer as asked; `status` is the 4xx (or 503) to send with `detail`."""

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
    """One top-k request, encoded: user row (-1 = unknown), one row of each user feature, history rows."""
    row: int
    feats: dict
    history: np.ndarray | None
    k: int
    exclude: list


class Model:
    """The restored towers plus the training data's lookups (stored user features and histories, item
    features), turning raw requests into tower inputs and running the towers at padded batch sizes."""

    def __init__(self, run_dir, *, step: int | None, batch_sizes: tuple[int, ...]):
        from data.batching import user_history
        from data.load import load
        from towers.restore import load_trained
        from towers.two_tower import feature_names

        self.trained = t = load_trained(run_dir, step)
        self.ds = load(t.config["data"])
        if len(self.ds.item_vocab) != len(t.item_vocab) or len(self.ds.user_vocab) != len(t.user_vocab):
            raise IndexLoadError(f"the data of {run_dir}/config.yaml no longer matches the run's vocabularies; "
                                 "serve from the data the model was trained on")
        self.batch_sizes, self._user_history = batch_sizes, user_history
        self.model_version = t.model_version
        self.user_names, self.item_names = feature_names(t.model)
        self.specs = {**{s.name: s for s in t.model.item.features.specs},
                      **{s.name: s for s in t.model.user.features.specs}}
        self.use_history = t.model.user.use_history
        self.history_len = int(t.config["data"].get("history_len", 0) or 0)
        self.item_id_kind = "str" if t.item_vocab.raw_ids.dtype.kind == "U" else "int"
        self.user_id_kind = "str" if t.user_vocab.raw_ids.dtype.kind == "U" else "int"
        self.user_table = t.tables.get("user") if t.model.user.use_id else None
        self.item_table = t.tables.get("item")
        self.output_dim = int(t.config["model"]["output_dim"])

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
        """Validates and encodes a `TopKRequest` (raises `ClientError`)."""
        key = None if req.user_id is None else as_id_kind(req.user_id, self.user_id_kind)
        row = -1 if key is None else int(self.trained.user_vocab.lookup(np.asarray([key]), missing="minus_one")[0])
        hist_rows = None
        if req.history is not None:
            keys = [h for h in (as_id_kind(v, self.item_id_kind) for v in req.history) if h is not None]
            rows = self.trained.item_vocab.lookup(np.asarray(keys), missing="minus_one") if keys else np.zeros(0)
            hist_rows = np.asarray(rows[rows >= 0], np.int32)
        if row < 0 and not ((req.features and self.user_names) or (req.history and self.use_history)):
            raise ClientError(422, "unknown user and no features/history: give user_id of a trained user, or "
                                   f"features (this tower reads {self.user_names}) or history "
                                   f"({'used' if self.use_history else 'not used'} by this tower)")
        feats = self.features(self.user_names, self.ds.user_features, row, req.features)
        history = None
        if self.use_history:
            if hist_rows is None:
                hist_rows = (self._user_history(self.ds, np.asarray([row]), self.history_len)[0] if row >= 0
                             else np.zeros(0, np.int32))
            history = np.full(self.history_len, -1, np.int32)
            kept = hist_rows[hist_rows >= 0][:self.history_len]
            history[:len(kept)] = kept
        exclude = [e for e in (as_id_kind(v, index_id_kind) for v in (req.exclude or [])) if e is not None]
        if req.exclude_seen:
            seen = list(hist_rows) if hist_rows is not None else []
            if row >= 0:
                indptr, items = self.ds.train_csr()
                seen += items[indptr[row]:indptr[row + 1]].tolist()
            exclude += self.trained.item_vocab.raw_ids[np.asarray(seen, np.int64)].tolist() if seen else []
        return Query(row, feats, history, req.k, exclude)

    def _bucket(self, n: int) -> int:
        return next((b for b in self.batch_sizes if b >= n), self.batch_sizes[-1])

    def embed_queries(self, queries: list[Query]) -> np.ndarray:
        """float32[len(queries), D] in one user-tower call, padded to a compiled batch size."""
        from towers.embed import embed_users

        size = self._bucket(len(queries))
        pad = size - len(queries)
        rows = np.asarray([q.row for q in queries] + [-1] * pad, np.int32)
        feats = {n: np.stack([q.feats[n] for q in queries] + [queries[0].feats[n]] * pad)
                 for n in self.user_names}
        history = None if not self.use_history else np.stack([q.history for q in queries] +
                                                             [np.full(self.history_len, -1, np.int32)] * pad)
        t = self.trained
        return embed_users(t.graphdef, t.params, self.user_table, self.item_table, rows, feats, history,
                           batch_size=size)[:len(queries)]

    def item_embeddings(self, items, id_kind: str, dim: int) -> tuple[list, np.ndarray]:
        """Upsert items -> (ids of `id_kind`, float32[M, dim]): explicit embeddings as given, features through
        the item tower (with the ID row when the id is in the trained vocabulary)."""
        from towers.embed import embed_items

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
            size = self._bucket(len(by_feat)) if len(by_feat) <= self.batch_sizes[-1] else self.batch_sizes[-1]
            pad = max(0, size - len(by_feat))
            rows = np.concatenate([rows, np.full(pad, -1, np.int32)])
            stacked = {n: np.stack([f[n] for f in feats] + [feats[0][n]] * pad) for n in self.item_names}
            t = self.trained
            table = self.item_table if t.model.item.use_id else None
            emb[by_feat] = embed_items(t.graphdef, t.params, table, rows, stacked, batch_size=size)[:len(by_feat)]
        return ids, emb

    def warmup(self) -> None:
        """Compiles the user tower for every batch size and the item tower for the smallest one."""
        blank = self.features(self.user_names, None, -1, None)
        hist = np.full(self.history_len, -1, np.int32) if self.use_history else None
        for size in self.batch_sizes:
            self.embed_queries([Query(-1, blank, hist, 1, [])] * size)
        if self.item_names or self.trained.model.item.use_id:
            item = types.SimpleNamespace(id=self.trained.item_vocab.raw_ids[0].item(), features={}, embedding=None)
            self.item_embeddings([item], self.item_id_kind, self.output_dim)


# ------------------------------------------------------------------------------------------------ metrics
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Histogram:
    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
        self.sum, self.n = self.sum + value, self.n + 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep, tail = ("," if labels else ""), (f"{{{labels}}}" if labels else "")
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{tail} {self.sum:.6f}",
                      f"{name}_count{tail} {self.n}"]


class Metrics:
    """Request counts by route/method/status, latency and batch-size histograms, in Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batches = _Histogram(_BATCH_BUCKETS)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(route, _Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batches.observe(size)

    def render(self, index_size: int, index_version: str, model_version: str) -> str:
        with self._lock:
            lines = ["# HELP twotower_requests_total HTTP requests by route, method and status.",
                     "# TYPE twotower_requests_total counter"]
            lines += [f'twotower_requests_total{{route="{r}",method="{m}",status="{s}"}} {n}'
                      for (r, m, s), n in sorted(self.requests.items())]
            lines += ["# HELP twotower_request_seconds Request latency.", "# TYPE twotower_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("twotower_request_seconds", f'route="{route}"')
            lines += ["# HELP twotower_batch_size Queries per user-tower call.", "# TYPE twotower_batch_size histogram"]
            lines += self.batches.lines("twotower_batch_size", "")
        lines += ["# HELP twotower_index_items Items in the live index.", "# TYPE twotower_index_items gauge",
                  f"twotower_index_items {index_size}",
                  "# HELP twotower_index_info The live index and model versions.", "# TYPE twotower_index_info gauge",
                  f'twotower_index_info{{index_version="{index_version}",model_version="{model_version}"}} 1']
        return "\n".join(lines) + "\n"


class ServerState:
    """The towers, the live index and its version, the batcher and the metrics of one server.

    `current` is an (index, version) tuple replaced as a whole, so a batch reads one consistent pair even
    while a reload swaps in a new index. Upserts, deletes and reloads are serialised by `_mutate`; upserts
    made before a reload are dropped with the old index (the new export is the corpus of record).
    """

    def __init__(self, model: Model, index_dir: pathlib.Path, *, batch_sizes, max_wait_s: float):
        self.model, self.metrics = model, Metrics()
        index, manifest = load_index(index_dir, model_version=model.model_version)
        self._check_index(index, index_dir)
        self.index_dir, self.manifest, self.mutations = pathlib.Path(index_dir), manifest, 0
        self.current = (index, index_version(manifest))
        self._mutate = threading.Lock()
        self.batcher = MicroBatcher(self._run_batch, max_batch=max(batch_sizes), max_wait_s=max_wait_s,
                                    on_batch=self.metrics.observe_batch, name="topk-batcher")

    def _check_index(self, index, index_dir) -> None:
        if index.dim != self.model.output_dim:
            raise IndexLoadError(f"{index_dir} holds dim-{index.dim} embeddings but the towers output "
                                 f"{self.model.output_dim}; export the index from this run")
        if index.id_kind != self.model.item_id_kind:
            raise IndexLoadError(f"{index_dir} holds {index.id_kind} ids but the run's items have "
                                 f"{self.model.item_id_kind} ids; export the index from this run")

    # --------------------------------------------------------------------------------------------- top-k
    def _run_batch(self, queries: list[Query]) -> list:
        """One user-tower call and one index search for a batch of queries (the batcher's worker thread)."""
        index, version = self.current
        emb = self.model.embed_queries(queries)
        k = min(max(q.k for q in queries), len(index))
        exclude = [q.exclude for q in queries] if any(q.exclude for q in queries) else None
        scores, ids = index.search(emb, k, exclude=exclude)
        out = []
        for q, s, i in zip(queries, scores, ids):
            keep = np.isfinite(s[:q.k])   # -inf marks padding when exclusions leave fewer than k items
            out.append(([{"id": v, "score": float(x)} for v, x in zip(i[:q.k][keep].tolist(), s[:q.k][keep])],
                        version))
        return out

    async def topk(self, req: schemas.TopKRequest) -> dict:
        index, _ = self.current
        if req.k > len(index):
            raise ClientError(422, f"k={req.k} exceeds the corpus size {len(index)}; ask for k in [1, {len(index)}]")
        query = self.model.make_query(req, index.id_kind)
        future = self.batcher.submit(query)
        try:
            items, version = await asyncio.wait_for(asyncio.wrap_future(future), _REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ClientError(503, f"no answer within {_REQUEST_TIMEOUT_S:.0f}s; the server is overloaded") from None
        return {"items": items, "model_version": self.model.model_version, "index_version": version}

    # ----------------------------------------------------------------------------------------- mutations
    def _bump(self, index) -> str:
        self.mutations += 1
        self.current = (index, index_version(self.manifest, self.mutations))
        return self.current[1]

    def upsert(self, req: schemas.UpsertRequest) -> dict:
        with self._mutate:
            index, _ = self.current
            ids, emb = self.model.item_embeddings(req.items, index.id_kind, index.dim)
            try:
                index.upsert(emb, ids)
            except (ValueError, TypeError) as e:
                raise ClientError(422, f"cannot upsert: {e}") from None
            return {"upserted": len(ids), "index_size": len(index), "index_version": self._bump(index)}

    def delete(self, req: schemas.DeleteRequest) -> dict:
        with self._mutate:
            index, _ = self.current
            converted = [as_id_kind(v, index.id_kind) for v in req.ids]
            bad = [raw for raw, v in zip(req.ids, converted) if v is None]
            try:
                if bad:
                    raise UnknownIdError("ids of the wrong kind")
                index.delete(np.asarray(converted))
            except UnknownIdError:
                held = set(index.ids().tolist())
                unknown = [raw for raw, v in zip(req.ids, converted) if v is None or v not in held]
                raise ClientError(404, f"unknown item ids (nothing was deleted): {unknown[:100]}") from None
            except ValueError as e:
                raise ClientError(422, f"cannot delete: {e}") from None
            return {"deleted": len(set(converted)), "index_size": len(index), "index_version": self._bump(index)}

    def reload(self, req: schemas.ReloadRequest) -> dict:
        with self._mutate:
            path = pathlib.Path(req.index_dir)
            try:
                index, manifest = load_index(path)
            except (IndexLoadError, OSError, ValueError) as e:   # ValueError: e.g. a NUL in the path
                raise ClientError(422, f"cannot load {path}: {e}") from None
            if manifest["model_version"] != self.model.model_version:
                raise ClientError(409, f"{path} holds embeddings of model {manifest['model_version']} but the "
                                       f"towers are {self.model.model_version}; export the index from the "
                                       "serving checkpoint, or restart the server on the new run")
            try:
                self._check_index(index, path)
            except IndexLoadError as e:
                raise ClientError(409, str(e)) from None
            self.index_dir, self.manifest, self.mutations = path, manifest, 0
            self.current = (index, index_version(manifest))
            log.info("reloaded %s: %d items, version %s", path, len(index), self.current[1])
            return {"index_dir": str(path.absolute()), "index_size": len(index),
                    "model_version": manifest["model_version"], "index_version": self.current[1]}

    def health(self) -> dict:
        index, version = self.current
        return {"status": "ok", "model_version": self.model.model_version, "index_version": version,
                "index_size": len(index)}


class _Guard:
    """ASGI middleware: refuses bodies over `max_body` bytes (413) before parsing, and records each
    request's route, status and latency."""

    def __init__(self, app, state_ref: dict, max_body: int):
        self.app, self.state_ref, self.max_body = app, state_ref, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_recorded(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await AsciiJSONResponse({"detail": f"request body exceeds {self.max_body} bytes"},
                                        status_code=413)(scope, receive, send_recorded)
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_recorded)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.state_ref["state"].metrics.observe_request(route, scope["method"], status[0],
                                                            time.perf_counter() - start)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None when it is (or is declared) larger than the cap."""
        headers = dict(scope.get("headers") or [])
        try:
            if int(headers.get(b"content-length", b"0")) > self.max_body:
                return None
        except ValueError:
            pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body"):
                break
        return b"".join(chunks)


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClientError)
    async def _client_error(_: Request, e: ClientError):
        return AsciiJSONResponse({"detail": e.detail}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        # The offending input is not echoed back: it may be large; the field path and reason suffice.
        reasons = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
                   for err in e.errors()[:20]]
        return AsciiJSONResponse({"detail": reasons}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return AsciiJSONResponse({"detail": str(e.detail)}, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        log.exception("internal error")
        return AsciiJSONResponse({"detail": f"internal error: {type(e).__name__}"}, status_code=500)


_ERRORS = {code: {"model": schemas.ErrorBody} for code in (404, 409, 413, 422)}


def create_app(run_dir, index_dir=None, *, step: int | None = None, batch_sizes=(1, 8, 32, 128),
               max_wait_ms: float = 1.5, max_body_bytes: int = 1 << 20, warmup: bool = True) -> FastAPI:
    """Builds the server for a training run and an exported index.

    Args:
      run_dir: the run directory of `python -m train` (towers, vocabularies, data config).
      index_dir: an index directory of `python -m serve.export`; None = `<run_dir>/export/<model_version>`.
      step: checkpoint step; None = the latest.
      batch_sizes: padded batch sizes the user tower is compiled for; the largest is the micro-batch cap.
      max_wait_ms: how long a micro-batch waits for more requests after its first.
      max_body_bytes: larger request bodies get 413.
      warmup: compile the towers for every batch size now instead of on first use.
    Raises:
      towers.restore.RestoreError: an unreadable run. IndexLoadError: a missing, corrupt or mismatched index.
    """
    model = Model(run_dir, step=step, batch_sizes=tuple(sorted(set(batch_sizes))))
    index_dir = pathlib.Path(index_dir) if index_dir else pathlib.Path(run_dir) / "export" / model.model_version
    if not (index_dir / "manifest.json").is_file():
        raise IndexLoadError(f"{index_dir} is not an index directory; run `python -m serve.export "
                             f"run_dir={run_dir}` first or pass index_dir=")
    state = ServerState(model, index_dir, batch_sizes=batch_sizes, max_wait_s=max_wait_ms / 1000)
    if warmup:
        model.warmup()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.batcher.close()

    app = FastAPI(title="twotower top-k", version="1", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.server = state
    app.add_middleware(_Guard, state_ref={"state": state}, max_body=max_body_bytes)
    _install_handlers(app)

    @app.post("/v1/topk", response_model=schemas.TopKResponse, responses=_ERRORS)
    async def topk(req: schemas.TopKRequest):
        return await state.topk(req)

    @app.post("/v1/items", response_model=schemas.UpsertResponse, responses=_ERRORS)
    def upsert(req: schemas.UpsertRequest):
        return state.upsert(req)

    @app.delete("/v1/items", response_model=schemas.DeleteResponse, responses=_ERRORS)
    def delete(req: schemas.DeleteRequest):
        return state.delete(req)

    @app.post("/v1/index:reload", response_model=schemas.ReloadResponse, responses=_ERRORS)
    def reload(req: schemas.ReloadRequest):
        return state.reload(req)

    @app.get("/healthz", response_model=schemas.Health)
    def healthz():
        return state.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        index, version = state.current
        return PlainTextResponse(state.metrics.render(len(index), version, model.model_version),
                                 media_type="text/plain; version=0.0.4")

    return app
