"""The HTTP top-k server: `create_app(run_dir, index_dir=None) -> FastAPI`.

Routes: `POST /v1/topk` (micro-batched user tower + index search), `POST /v1/items` (upsert by features or
embedding), `DELETE /v1/items`, `POST /v1/index:reload` (verified, atomic swap of a new export),
`GET /healthz`, `GET /metrics` (Prometheus text). The towers come from `towers.restore.load_trained`; raw ids
and feature values are encoded by `Model` with the run's vocabularies (a categorical or multi-hot feature
without a value vocabulary, e.g. a bucketed age, takes its integer codes). No training code is imported.

Layout: request encoding and the towers live in `serve.model`, Prometheus metrics in `serve.metrics`; here
the live index and its mutations (`ServerState`), then the ASGI guard (which also answers well-formed
`/v1/topk` requests itself, see `_Guard`) and the app factory.

Client input never causes a 5xx: bodies are validated by `serve.schemas`, oversized bodies get 413, every
domain error is a `ClientError` with a 4xx status and a reason. Server-side failures are answered at once
and leave nothing half done: an upsert or delete the index fails to apply is undone (`MutationError`) and
gets 500 saying nothing changed; a query whose micro-batch failed gets 503 (a retry runs in another batch).
Responses are ASCII JSON, so ids holding any unicode (lone surrogates included) can be echoed in errors.

Security: with an `auth_token`, every request other than `/v1/topk` and GETs (`/healthz`, `/metrics`, the
docs) must carry `Authorization: Bearer <token>` (401 otherwise, checked before the body is read). A reload
reaches only directories under the reload root (default `<run_dir>/export`), symlinks resolved; any other path
gets one and the same 403, so the route tells nothing about the filesystem outside the root.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import pathlib
import threading
import time

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import schemas
from serve.batcher import MicroBatcher
from serve.index import MutationError, UnknownIdError
from serve.manifest import IndexLoadError, ModelVersionError, load_index
from serve.metrics import Metrics
from serve.model import ClientError, Model, Query, as_id_kind  # noqa: F401 (re-exported)
from towers.inference.filtered import ConditionValueError

log = logging.getLogger("twotower.serve")

ROUTES = ("/v1/topk", "/v1/items", "/v1/index:reload", "/healthz", "/metrics")
_REQUEST_TIMEOUT_S = 30.0
_OUTSIDE_ROOT = ("index_dir must name an index directory under the server's reload_root (configs/serve.yaml; "
                 "default <run_dir>/export), absolute or relative to it")
_UNAUTHORIZED = "missing or wrong bearer token"


_ENCODER = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _ascii_json(content) -> bytes:
    return _ENCODER.encode(content).encode("ascii")


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped (a lone surrogate in an echoed id cannot fail encoding) and no NaN."""

    def render(self, content) -> bytes:
        return _ascii_json(content)


def index_version(manifest: dict) -> str:
    """A short content hash of an export (its files' checksums): the version of the index as loaded."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:12]


def _with_mutations(version: str, mutations: int) -> str:
    """The version of an index after `mutations` upserts/deletes since loading export `version`: 'version+N'."""
    return version if not mutations else f"{version}+{mutations}"


# ---------------------------------------------------------------------------------------- request encoding
class ServerState:
    """The towers, the live index and its version, the batcher and the metrics of one server.

    `current` is an (index, export version) tuple replaced as a whole, so a batch reads one consistent pair
    even while a reload swaps in a new index. Upserts and deletes change the index in place; the label of an
    answer adds the index's `generation` (its mutations since loading) read under the same lock hold as the
    search, so it names exactly the corpus that answer came from (`version`). Upserts, deletes and reloads
    are serialised by `_mutate`; upserts made before a reload are dropped with the old index (the new export
    is the corpus of record). Reloads reach only directories under `reload_root`.
    """

    def __init__(self, model: Model, index_dir: pathlib.Path, *, batch_sizes, max_wait_s: float,
                 reload_root: pathlib.Path):
        self.model, self.metrics, self.reload_root = model, Metrics(), pathlib.Path(reload_root).resolve()
        index, manifest = load_index(index_dir, model_version=model.model_version)
        self._check_index(index, index_dir)
        self.index_dir, self.manifest = pathlib.Path(index_dir), manifest
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
        index, exported = self.current
        k = min(max(q.k for q in queries), len(index))
        if any(q.conditions for q in queries):
            return self._run_conditional(index, exported, queries, k)
        emb = self.model.embed_queries(queries)
        if emb.ndim == 3:
            return self._run_multi(index, exported, queries, emb, k)
        exclude = [q.exclude for q in queries] if any(q.exclude for q in queries) else None
        scores, ids, generation = index.search_with_generation(emb, k, exclude=exclude)
        version = _with_mutations(exported, generation)
        # -inf marks padding when exclusions leave fewer than k items. Python lists: cheaper than numpy rows.
        return [([{"id": v, "score": x} for v, x in zip(i[:q.k], s[:q.k]) if math.isfinite(x)], version)
                for q, s, i in zip(queries, scores.tolist(), ids.tolist())]

    def _run_conditional(self, index, exported: str, queries: list[Query], k: int) -> list:
        """`_run_batch` for a batch holding conditional queries: one tower row per (query, condition value),
        all embedded in one call; the rows with a value searched in one filtered index call (only items holding
        their value), the unconditioned rows in one plain call; each query's lists merged round-robin without
        duplicates (`towers.inference.multi.merge_searched`), so `k` is filled whenever the query's values
        hold k eligible items together. An item's score is the one of the value whose list it came from."""
        owner, slot, rows = [], [], []
        for j, q in enumerate(queries):
            for i, code in enumerate(q.conditions or [-1]):
                owner.append(j), slot.append(i), rows.append(dataclasses.replace(q, condition=code))
        owner, slot = np.asarray(owner, np.int64), np.asarray(slot, np.int64)
        emb = self.model.embed_queries(rows)
        codes = np.asarray([r.condition for r in rows], np.int64)
        scores, ids, version = np.full((len(rows), k), -np.inf, np.float32), None, {}
        for part in (np.flatnonzero(codes >= 0), np.flatnonzero(codes < 0)):   # filtered rows, then plain ones
            if not part.size:
                continue
            exclude = [rows[r].exclude for r in part] if any(rows[r].exclude for r in part) else None
            s, i, generation = index.search_with_generation(
                emb[part], k, exclude=exclude, conditions=codes[part] if codes[part[0]] >= 0 else None)
            ids = np.empty((len(rows), k), i.dtype) if ids is None else ids
            scores[part], ids[part] = s, i
            for r in part:
                version[int(owner[r])] = _with_mutations(exported, generation)
        items = _merged_items(queries, owner, slot, scores, ids, int(slot.max()) + 1, k)
        return [(found, version[j]) for j, found in enumerate(items)]

    @staticmethod
    def _run_multi(index, exported: str, queries: list[Query], emb: np.ndarray, k: int) -> list:
        """`_run_batch` for users with K embeddings ([B, K, d], those past each user's K' zero): every active
        embedding of the batch in one index search, with its user's exclusions, each user's lists merged
        round-robin without duplicates (`towers.inference.multi`). Each list holds k items whenever k are
        eligible, so the merged one does too. An item's score is the one of the interest it was taken from."""
        from towers.inference.multi import interest_queries

        flat, owner, interest = interest_queries(emb)
        exclude = [queries[o].exclude for o in owner.tolist()] if any(q.exclude for q in queries) else None
        scores, ids, generation = index.search_with_generation(flat, k, exclude=exclude)
        items = _merged_items(queries, owner, interest, scores, ids, emb.shape[1], k)
        searched = np.bincount(owner, minlength=len(queries)).tolist()
        version = _with_mutations(exported, generation)
        return [(found, version, n) for found, n in zip(items, searched)]

    async def topk(self, req: schemas.TopKRequest) -> dict:
        index, _ = self.current
        if req.k > len(index):
            raise ClientError(422, f"k={req.k} exceeds the corpus size {len(index)}; ask for k in [1, {len(index)}]")
        query = self.model.make_query(req, index.id_kind)
        if req.condition is not None:
            query.conditions = self._condition_codes(req.condition, index)
        answer = self.batcher.submit_async(query)
        try:
            items, version, *interests = await asyncio.wait_for(answer, _REQUEST_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ClientError(503, f"no answer within {_REQUEST_TIMEOUT_S:.0f}s; the server is overloaded") from None
        except ClientError:
            raise
        except Exception as e:   # the batch this query ran in failed (logged by the batcher); others go on
            raise ClientError(503, f"the batch holding this query failed ({type(e).__name__}); retry") from None
        out = {"items": items, "model_version": self.model.model_version, "index_version": version}
        if interests:   # a multi-embedding model: how many of the user's embeddings were searched
            out["interests"] = interests[0]
        return out

    def _condition_codes(self, raw, index) -> list[int]:
        """A request's `condition` (one raw value or a list) -> the distinct codes, in the order given; a 422
        naming the problem for a model or index without a condition, too many values or an unknown one."""
        feature = self.model.condition
        if feature is None:
            raise ClientError(422, "condition: this model is not conditional (its model.user.condition is null); "
                                   "leave condition out")
        held = index.condition
        if held is None or held["feature"] != feature:
            raise ClientError(422, f"condition: the served index holds no {feature!r} values to filter by; export "
                                   "it from this conditional run")
        values = list(dict.fromkeys(raw if isinstance(raw, list) else [raw]))
        if not values or len(values) > schemas.MAX_CONDITIONS:
            raise ClientError(422, f"condition: give 1 to {schemas.MAX_CONDITIONS} distinct values, got "
                                   f"{len(values)}")
        try:
            return [int(c) for c in index.condition_codes(values)]
        except ConditionValueError as e:
            raise ClientError(422, f"condition: {e}") from None

    # ----------------------------------------------------------------------------------------- mutations
    def live(self) -> tuple:
        """(the live index, its version label now)."""
        index, exported = self.current
        return index, _with_mutations(exported, index.generation)

    def upsert(self, req: schemas.UpsertRequest) -> dict:
        with self._mutate:
            index, _ = self.current
            ids, emb = self.model.item_embeddings(req.items, index.id_kind, index.dim)
            held = index.condition
            conditions = None if held is None else \
                self.model.item_conditions(req.items, index.id_kind, held["feature"])
            try:
                index.upsert(emb, ids, conditions=conditions)
            except MutationError as e:
                raise _failed_mutation(e) from None
            except (ValueError, TypeError) as e:
                raise ClientError(422, f"cannot upsert: {e}") from None
            return {"upserted": len(ids), "index_size": len(index), "index_version": self.live()[1]}

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
            except MutationError as e:
                raise _failed_mutation(e) from None
            except ValueError as e:
                raise ClientError(422, f"cannot delete: {e}") from None
            return {"deleted": len(set(converted)), "index_size": len(index), "index_version": self.live()[1]}

    def _reload_dir(self, index_dir: str) -> pathlib.Path:
        """`index_dir` (absolute, or relative to the reload root) with every symlink resolved, if it lies under
        the reload root; otherwise 403 with the same message whether or not the path exists."""
        try:
            path = (self.reload_root / index_dir).resolve()
        except (OSError, ValueError, RuntimeError):   # a NUL byte, a symlink loop
            raise ClientError(403, _OUTSIDE_ROOT) from None
        if not path.is_relative_to(self.reload_root):
            raise ClientError(403, _OUTSIDE_ROOT)
        return path

    def reload(self, req: schemas.ReloadRequest) -> dict:
        path = self._reload_dir(req.index_dir)
        with self._mutate:
            try:
                index, manifest = load_index(path, model_version=self.model.model_version)
            except ModelVersionError as e:
                raise ClientError(409, f"{e}, or restart the server on the new run") from None
            except (IndexLoadError, OSError, ValueError) as e:
                raise ClientError(422, f"cannot load {path}: {e}") from None
            try:
                self._check_index(index, path)
            except IndexLoadError as e:
                raise ClientError(409, str(e)) from None
            self.index_dir, self.manifest = path, manifest
            self.current = (index, index_version(manifest))
            log.info("reloaded %s: %d items, version %s", path, len(index), self.current[1])
            return {"index_dir": str(path), "index_size": len(index),
                    "model_version": manifest["model_version"], "index_version": self.current[1]}

    def health(self) -> dict:
        index, version = self.live()
        return {"status": "ok", "model_version": self.model.model_version, "index_version": version,
                "index_size": len(index)}


def _merged_items(queries: list[Query], owner, slot, scores, ids, num_lists: int, k: int) -> list[list[dict]]:
    """Each query's answer from several searched lists (row r of `scores` / `ids` is list `slot[r]` of query
    `owner[r]`): merged round-robin without duplicates (`towers.inference.multi.merge_searched`), -inf padding
    left out, cut to the query's own k. Raw ids of either kind are coded as ints for the merge."""
    from towers.inference.multi import merge_searched

    _, codes = np.unique(ids, return_inverse=True)
    codes = np.where(np.isfinite(scores), codes.reshape(ids.shape), -1)
    merged, pos = merge_searched(owner, slot, scores, codes, len(queries), num_lists, k)
    raw = ids.reshape(-1)[np.maximum(pos, 0)]
    return [[{"id": v, "score": x} for v, x in zip(i[:q.k], s[:q.k]) if math.isfinite(x)]
            for q, s, i in zip(queries, merged.tolist(), raw.tolist())]


def _failed_mutation(e: MutationError) -> ClientError:
    """A valid upsert or delete the index could not apply (and undid): 500, since the fault is the server's,
    with the reason and the fact that nothing changed, so the client knows it may simply retry."""
    log.error("%s", e, exc_info=e.__cause__)
    return ClientError(500, f"internal error: {e}")


def _json_media(scope) -> bool:
    """Whether the body is declared application/json (the first content-type header, as Starlette reads it,
    with any parameters). FastAPI parses such bodies as JSON; other JSON types (`+json`) and bodies without
    a content-type (which FastAPI refuses) take the full FastAPI path."""
    value = next((v for k, v in scope.get("headers") or () if k == b"content-type"), None)
    return value is not None and value.split(b";", 1)[0].strip().lower() == b"application/json"


def _needs_token(scope) -> bool:
    """Whether a request must carry the bearer token: everything but top-k queries and reads."""
    return scope["path"] != "/v1/topk" and scope["method"] not in ("GET", "HEAD")


def _bearer_matches(headers: dict, token: bytes) -> bool:
    """Whether the Authorization header is `Bearer <token>` (constant-time comparison of the token)."""
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


class _Guard:
    """ASGI middleware: with an auth token, refuses unauthenticated writes (401, see `_needs_token`) before
    reading the body; refuses bodies over `max_body` bytes (413) before parsing, answers well-formed
    `POST /v1/topk` requests itself, and records each request's route, status and latency.

    The top-k fast path exists for throughput: FastAPI's routing, dependency solving and response-model
    validation cost about 0.3 ms of CPU per request (in-process, 2-core benchmark machine: 0.47 ms through
    the route against 0.14 ms here, request encoding included), as much as the index search. It answers
    only bodies that parse and validate exactly as FastAPI would parse them (`json.loads`, then the
    `TopKRequest` model); any other request (bad JSON, a failed validation, another content type) is handed
    to FastAPI unchanged, so every error response stays FastAPI's. A success is the same bytes the route
    sends (the response model's JSON form equals the dict `ServerState.topk` builds), and a `ClientError`
    the same body as its exception handler.
    """

    def __init__(self, app, state_ref: dict, max_body: int, auth_token: str | None = None):
        self.app, self.state_ref, self.max_body = app, state_ref, max_body
        self.token = auth_token.encode() if auth_token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_recorded(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            if self.token is not None and _needs_token(scope) and not _bearer_matches(headers, self.token):
                await AsciiJSONResponse({"detail": _UNAUTHORIZED}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_recorded)
                return
            body = await self._read_body(headers, receive)
            if body is None:
                await AsciiJSONResponse({"detail": f"request body exceeds {self.max_body} bytes"},
                                        status_code=413)(scope, receive, send_recorded)
                return
            if (scope["path"] == "/v1/topk" and scope["method"] == "POST" and _json_media(scope)
                    and await self._fast_topk(body, send_recorded)):
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

    async def _fast_topk(self, body: bytes, send) -> bool:
        """Answers a top-k body that validates; False (nothing sent) hands the request to FastAPI."""
        try:
            req = schemas.TopKRequest.model_validate(json.loads(body))
        except Exception:  # noqa: BLE001 - any parse or validation failure: FastAPI reports it
            return False
        try:
            content, code = await self.state_ref["state"].topk(req), 200
        except ClientError as e:
            content, code = {"detail": e.detail}, e.status
        payload = _ascii_json(content)
        headers = [(b"content-length", str(len(payload)).encode()), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return True

    async def _read_body(self, headers: dict, receive) -> bytes | None:
        """The whole body, or None when it is (or is declared) larger than the cap."""
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
_WRITE_ERRORS = {**_ERRORS, **{code: {"model": schemas.ErrorBody} for code in (401, 403)}}


def create_app(run_dir, index_dir=None, *, step: int | None = None, batch_sizes=(1, 8, 32, 128),
               max_wait_ms: float = 1.5, max_body_bytes: int = 1 << 20, warmup: bool = True,
               reload_root=None, auth_token: str | None = None) -> FastAPI:
    """Builds the server for a training run and an exported index.

    Args:
      run_dir: the run directory of `python -m train` (towers, vocabularies, data config).
      index_dir: an index directory of `python -m serve.export`; None = `<run_dir>/export/<model_version>`.
      step: checkpoint step; None = the latest.
      batch_sizes: padded batch sizes the user tower is compiled for; the largest is the micro-batch cap.
      max_wait_ms: how long a micro-batch waits for more requests after its first.
      max_body_bytes: larger request bodies get 413.
      warmup: compile the towers for every batch size now instead of on first use.
      reload_root: `POST /v1/index:reload` reaches only directories under it; None = `<run_dir>/export`.
      auth_token: if set, writes (`POST|DELETE /v1/items`, `POST /v1/index:reload`) need
        `Authorization: Bearer <auth_token>`; None = open (bind to 127.0.0.1 only).
    Raises:
      towers.restore.RestoreError: an unreadable run. IndexLoadError: a missing, corrupt or mismatched index.
    """
    model = Model(run_dir, step=step, batch_sizes=tuple(sorted(set(batch_sizes))))
    index_dir = pathlib.Path(index_dir) if index_dir else pathlib.Path(run_dir) / "export" / model.model_version
    if not (index_dir / "manifest.json").is_file():
        raise IndexLoadError(f"{index_dir} is not an index directory; run `python -m serve.export "
                             f"run_dir={run_dir}` first or pass index_dir=")
    state = ServerState(model, index_dir, batch_sizes=batch_sizes, max_wait_s=max_wait_ms / 1000,
                        reload_root=reload_root or pathlib.Path(run_dir) / "export")
    if warmup:
        model.warmup()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.batcher.close()

    app = FastAPI(title="twotower top-k", version="1", lifespan=lifespan, default_response_class=AsciiJSONResponse)
    app.state.server = state
    app.add_middleware(_Guard, state_ref={"state": state}, max_body=max_body_bytes, auth_token=auth_token)
    _install_handlers(app)
    # Declares the bearer scheme in the OpenAPI document; `_Guard` enforces it, before the body is read.
    writes = {"responses": _WRITE_ERRORS,
              "dependencies": [Security(HTTPBearer(scheme_name="bearer", auto_error=False))] if auth_token else []}

    # exclude_none: a single-embedding model's answer has no `interests`, as the fast path sends it.
    @app.post("/v1/topk", response_model=schemas.TopKResponse, response_model_exclude_none=True, responses=_ERRORS)
    async def topk(req: schemas.TopKRequest):
        return await state.topk(req)

    @app.post("/v1/items", response_model=schemas.UpsertResponse, **writes)
    def upsert(req: schemas.UpsertRequest):
        return state.upsert(req)

    @app.delete("/v1/items", response_model=schemas.DeleteResponse, **writes)
    def delete(req: schemas.DeleteRequest):
        return state.delete(req)

    @app.post("/v1/index:reload", response_model=schemas.ReloadResponse, **writes)
    def reload(req: schemas.ReloadRequest):
        return state.reload(req)

    @app.get("/healthz", response_model=schemas.Health)
    def healthz():
        return state.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        index, version = state.live()
        return PlainTextResponse(state.metrics.render(len(index), version, model.model_version),
                                 media_type="text/plain; version=0.0.4")

    return app
