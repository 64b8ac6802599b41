"""The HTTP top-k server over a real (tiny) run and export, through real HTTP on 127.0.0.1: answers equal exact
search on the towers' embeddings, micro-batching, upsert/delete, hot reload under load, version refusal,
malformed and fuzzed input (never a 5xx), metrics, and no training code in the server process."""
import asyncio
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import uvicorn

from serve.__main__ import ConfigError, parse_args
from serve.batcher import MicroBatcher
from serve.manifest import load_index, write_index
from serve.schemas import TopKRequest
from serve.server import create_app
from tests.helpers import REPO, smoke_cfg
from tests.serve.test_export import export_cfg
from tests.serve.test_index import reference_topk


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a fresh checkpoint at step 3 (as in test_export), its export, a second export of
    the same model without the first 5 items (for reload), and one under another model version."""
    from flax import nnx

    from serve.export import export
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("run")
    c = smoke_cfg()
    ds, model, state = write_untrained_run(c, run_dir, step=3)
    out = export(export_cfg(f"run_dir={run_dir}", "batch_size=4", "num_queries=20"))["out"]
    index, manifest = load_index(out)
    index.delete(index.ids()[:5])
    # Under <run_dir>/export, the server's default reload root.
    smaller = write_index(index, run_dir / "export" / "smaller", model_version=manifest["model_version"])
    foreign = write_index(index, run_dir / "export" / "foreign", model_version="step9-000000000000")
    graphdef, _ = nnx.split(model)
    return {"dir": run_dir, "ds": ds, "out": out, "smaller": smaller, "foreign": foreign, "graphdef": graphdef,
            "state": state, "model": model, "history_len": c.data.history_len}


class Client:
    """uvicorn on 127.0.0.1 in a thread, and a small JSON client for it."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started, "uvicorn did not start"

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(text)
        except json.JSONDecodeError:
            return resp.status, text

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def client(run):
    app = create_app(run["dir"], batch_sizes=(1, 8, 32), max_wait_ms=2.0)
    c = Client(app)
    c.app = app
    yield c
    c.close()


def user_embeddings(run, rows, feats=None, history=None):
    """The user tower on the checkpoint's parameters, computed without the server."""
    from data.batching import user_history
    from towers.embed import embed_users

    ds, state, model = run["ds"], run["state"], run["model"]
    rows = np.asarray(rows, np.int32)
    if feats is None:
        feats = {s.name: ds.user_features[s.name][np.maximum(rows, 0)] for s in model.user.features.specs}
    if history is None:
        history = user_history(ds, np.maximum(rows, 0), run["history_len"])
    return embed_users(run["graphdef"], state["params"], state["tables"]["user"], state["tables"]["item"], rows,
                       feats, history)


def exact(app, queries, k, exclude=None):
    index = app.state.server.current[0]
    return reference_topk(queries, index.embeddings(), index.ids(), k, exclude)


def test_topk_equals_exact_search_on_the_exported_embeddings(run, client):
    users = np.arange(24)
    raw = run["ds"].user_vocab.raw_ids[users].tolist()
    with concurrent.futures.ThreadPoolExecutor(12) as pool:  # concurrent: answered in micro-batches
        got = list(pool.map(lambda u: client.call("POST", "/v1/topk", {"user_id": u, "k": 10}), raw))
    want_scores, want_ids = exact(client.app, user_embeddings(run, users), 10)
    for (status, body), ids, scores in zip(got, want_ids, want_scores):
        assert status == 200, body
        assert [it["id"] for it in body["items"]] == ids.tolist()
        np.testing.assert_allclose([it["score"] for it in body["items"]], scores, rtol=1e-4, atol=1e-5)
        assert body["model_version"].startswith("step3-") and body["index_version"]
    batches = client.app.state.server.metrics.batches
    assert batches.n < len(users) and batches.sum >= len(users)  # some calls carried several queries


def test_exclusions_and_unknown_users(run, client):
    ds = run["ds"]
    indptr, items = ds.train_csr()
    seen = ds.item_vocab.raw_ids[items[indptr[3]:indptr[4]]].tolist()
    status, body = client.call("POST", "/v1/topk", {"user_id": int(ds.user_vocab.raw_ids[3]), "k": 20,
                                                    "exclude_seen": True, "exclude": [1, 2, "junk", 10**30]})
    assert status == 200, body
    excluded = [*seen, 1, 2]
    _, want = exact(client.app, user_embeddings(run, [3]), 20, [excluded])
    assert [it["id"] for it in body["items"]] == want[0].tolist() and not set(excluded) & set(want[0].tolist())
    # An unknown user described by features (integer codes: the synthetic features have no value vocabulary)
    # and history (raw item ids, unknown ones dropped), against the tower run on the same inputs.
    body = {"user_id": "nobody", "features": {"segment": 2}, "history": [5, 7, 123456], "k": 5}
    status, got = client.call("POST", "/v1/topk", body)
    assert status == 200, got
    hist = np.full((1, run["history_len"]), -1, np.int32)
    hist[0, :2] = ds.item_vocab.lookup(np.array([5, 7]))
    emb = user_embeddings(run, [-1], {"segment": np.array([2], np.int32), "age_bucket": np.zeros(1, np.int32)}, hist)
    assert [it["id"] for it in got["items"]] == exact(client.app, emb, 5)[1][0].tolist()
    status, got = client.call("POST", "/v1/topk", {"user_id": "nobody", "k": 5})
    assert status == 422 and "unknown user and no features/history" in got["detail"]


def test_upserted_items_are_served_and_deleted_items_never_return(run, client):
    from towers.embed import embed_items

    n = len(client.app.state.server.current[0])
    u = user_embeddings(run, [7])[0]
    feats = {"category": 1, "tags": [3, 4], "quality": 0.5}
    status, body = client.call("POST", "/v1/items", {"items": [{"id": 5000, "embedding": (3 * u).tolist()},
                                                               {"id": 5001, "features": feats}]})
    assert status == 200 and body["upserted"] == 2 and body["index_size"] == n + 2, body
    state = run["state"]
    tags = np.array([[3, 4] + [-1] * (run["model"].item.features.specs[1].max_len - 2)], np.int32)
    e = embed_items(run["graphdef"], state["params"], state["tables"]["item"], np.array([-1]),
                    {"category": np.array([1], np.int32), "tags": tags, "quality": np.array([[0.5]], np.float32)})[0]
    status, got = client.call("POST", "/v1/topk", {"user_id": 7, "k": n + 2})
    assert status == 200, got
    ranked = {it["id"]: (r, it["score"]) for r, it in enumerate(got["items"])}
    assert ranked[5000][0] == 0 and ranked[5000][1] == pytest.approx(3 * float(u @ u), rel=1e-4)
    assert ranked[5001][1] == pytest.approx(float(u @ e), rel=1e-4, abs=1e-5)   # content-only item tower
    scores = [it["score"] for it in got["items"]]
    assert scores == sorted(scores, reverse=True)
    assert got["index_version"].endswith("+1")
    status, body = client.call("DELETE", "/v1/items", {"ids": [5000, 5001]})
    assert status == 200 and body["index_size"] == n, body
    status, body = client.call("DELETE", "/v1/items", {"ids": [5000, 4242, "x"]})
    assert status == 404 and "[5000, 4242, 'x']" in body["detail"]
    for uid in (7, 8, 9):
        status, got = client.call("POST", "/v1/topk", {"user_id": uid, "k": n})
        assert status == 200 and len(got["items"]) == n and not {5000, 5001} & {it["id"] for it in got["items"]}


def test_reload_swaps_under_load_and_refuses_another_model(run, client):
    failures, versions, stop = [], set(), threading.Event()

    def hammer(uid):
        while not stop.is_set():
            status, body = client.call("POST", "/v1/topk", {"user_id": uid, "k": 10})
            if status != 200:
                failures.append((status, body))
            else:
                versions.add(body["index_version"])

    threads = [threading.Thread(target=hammer, args=(uid,)) for uid in range(4)]
    for t in threads:
        t.start()
    try:
        for target in ("smaller", "out", "smaller"):
            time.sleep(0.15)
            status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(run[target])})
            assert status == 200, body
    finally:
        time.sleep(0.15)
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures and len(versions) >= 2
    n = len(load_index(run["smaller"])[0])
    assert client.call("GET", "/healthz")[1]["index_size"] == n
    status, got = client.call("POST", "/v1/topk", {"user_id": 1, "k": n})
    removed = set(load_index(run["out"])[0].ids()[:5].tolist())
    assert status == 200 and not removed & {it["id"] for it in got["items"]}
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(run["foreign"])})
    assert status == 409 and "step9-000000000000" in body["detail"]
    status, body = client.call("POST", "/v1/index:reload", {"index_dir": str(run["dir"] / "export" / "nope")})
    assert status == 422 and "not a directory" in body["detail"]
    assert client.call("POST", "/v1/index:reload", {"index_dir": str(run["out"])})[0] == 200


def raw_topk(client, body: bytes, content_type: str | None):
    """POST /v1/topk -> (status, content-type, body bytes), the body sent as given."""
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=30)
    conn.request("POST", "/v1/topk", body=body, headers={"Content-Type": content_type} if content_type else {})
    resp = conn.getresponse()
    out = resp.status, resp.getheader("content-type"), resp.read()
    conn.close()
    return out


def test_fast_path_answers_exactly_as_the_fastapi_route(run, client):
    """application/json top-k bodies are answered by the guard middleware, other JSON media types by the
    FastAPI route: the same status and bytes for answers, client errors and invalid bodies."""
    raw = run["ds"].user_vocab.raw_ids.tolist()
    bodies = [{"user_id": raw[2], "k": 7}, {"user_id": raw[7], "k": 3, "exclude_seen": True, "exclude": [1, "x"]},
              {"user_id": "nobody", "features": {"segment": 1}, "history": [5, 7], "k": 4},
              {"user_id": 1, "k": 10**6}, {"user_id": "nobody", "k": 5}, {"user_id": 1, "k": "10"}]
    for body in bodies:
        data = json.dumps(body).encode()
        fast = raw_topk(client, data, "application/json; charset=utf-8")
        assert fast == raw_topk(client, data, "application/vnd.api+json"), body
        assert fast[0] in (200, 422) and fast[1] == "application/json"
    assert raw_topk(client, json.dumps(bodies[0]).encode(), None)[0] == 422   # FastAPI refuses a body without type
    # Without the FastAPI route only the fast path can answer: valid JSON bodies still get 200.
    routes = client.app.router.routes
    route = next(r for r in routes if getattr(r, "path", None) == "/v1/topk")
    routes.remove(route)
    try:
        assert raw_topk(client, json.dumps(bodies[0]).encode(), "application/json")[0] == 200
        assert raw_topk(client, json.dumps(bodies[0]).encode(), "application/vnd.api+json")[0] == 404
    finally:
        routes.append(route)


def test_a_mixed_batch_embeds_each_query_as_alone(run, client):
    """Stored features and histories gathered per batch: known users next to users described in the request."""
    model, raw = client.app.state.server.model, run["ds"].user_vocab.raw_ids.tolist()
    bodies = [{"user_id": raw[0]}, {"user_id": "nobody", "features": {"segment": 2}, "history": [5, 7]},
              {"user_id": raw[1]}, {"user_id": raw[4], "history": [9]}, {"user_id": raw[5], "features": {"segment": 1}},
              {"user_id": raw[2]}]
    queries = [model.make_query(TopKRequest(k=1, **b), "int") for b in bodies]
    together = model.embed_queries(queries)
    alone = np.concatenate([model.embed_queries([q]) for q in queries])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(together[[0, 2, 5]], user_embeddings(run, [0, 1, 2]), rtol=1e-5, atol=1e-6)


def test_exclude_seen_drops_exactly_a_known_users_training_items(run, client):
    """A user with fewer training items than the history length: only those items are excluded (the padding
    of their stored history is no item)."""
    ds = run["ds"]
    indptr, items = ds.train_csr()
    user = int(np.flatnonzero(np.diff(indptr) < run["history_len"])[0])
    seen = set(ds.item_vocab.raw_ids[items[indptr[user]:indptr[user + 1]]].tolist())
    held = set(client.app.state.server.current[0].ids().tolist())
    want = held - seen
    assert ds.item_vocab.raw_ids[-1].item() in want   # the item a -1 history row would have named
    status, got = client.call("POST", "/v1/topk", {"user_id": int(ds.user_vocab.raw_ids[user]), "k": len(held),
                                                   "exclude_seen": True})
    assert status == 200 and {it["id"] for it in got["items"]} == want and len(got["items"]) == len(want)


@pytest.mark.parametrize("method,path,body,status,reason", [
    ("POST", "/v1/topk", {"user_id": 1, "k": 0}, 422, "greater than or equal to 1"),
    ("POST", "/v1/topk", {"user_id": 1, "k": 10**6}, 422, "exceeds the corpus size"),
    ("POST", "/v1/topk", {"user_id": 1, "k": "10"}, 422, "k: Input should be a valid integer"),
    ("POST", "/v1/topk", {"user_id": 1, "k": 3, "colour": 1}, 422, "Extra inputs are not permitted"),
    ("POST", "/v1/topk", {"features": {"segment": "x"}, "k": 3}, 422, "no value vocabulary"),
    ("POST", "/v1/topk", {"features": {"height": 3}, "k": 3}, 422, "unknown feature(s) ['height']"),
    ("POST", "/v1/topk", b"{\"user_id\": 1, ", 422, "JSON decode error"),
    ("POST", "/v1/topk", b"[" * 100_000, 400, "error parsing the body"),
    ("POST", "/v1/topk", b" " * (2 << 20), 413, "exceeds 1048576 bytes"),
    ("POST", "/v1/items", {"items": [{"id": 1, "embedding": [1.0]}]}, 422, "the index holds dim 8"),
    ("POST", "/v1/items", {"items": [{"id": 1}]}, 422, "exactly one of features or embedding"),
    ("POST", "/v1/items", {"items": [{"id": "a", "embedding": [0.0] * 8}]}, 422, "not int ids"),
    ("POST", "/v1/items", {"items": [{"id": 1, "features": {"quality": "high"}}]}, 422, "is dense"),
    ("POST", "/v1/items", {"items": [{"id": 1, "embedding": [1e300] * 8}]}, 422, "within +-10000"),
    ("DELETE", "/v1/items", {"ids": []}, 422, "at least 1 item"),
    ("POST", "/v1/index:reload", {"index_dir": 3}, 422, "valid string"),
    ("POST", "/v1/index:reload", {"index_dir": "/tmp/a\x00b"}, 403, "under the server's reload_root"),
    ("GET", "/v1/nothing", None, 404, "Not Found"),
])
def test_malformed_requests_get_a_4xx_with_a_reason(client, method, path, body, status, reason):
    raw = body if isinstance(body, bytes) else None
    got_status, got = client.call(method, path, None if raw else body, raw=raw)
    assert got_status == status and reason in str(got), (got_status, got)


def test_fuzzed_bodies_never_get_a_5xx(run, client):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    scalar = (st.none() | st.booleans() | st.integers() | st.integers(-3, 300) | st.floats() | st.text(max_size=8)
              | st.sampled_from(["1", "0", "-1", "segment", "tags", "\ud800", "\x00"]))
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8) | st.sampled_from(["segment", "tags", "quality"]),
                                           inner, max_size=4), max_leaves=12)
    # Each field is mostly plausible, else random JSON, so requests reach the model and index code too.
    either = lambda good: st.integers(0, 3).flatmap(lambda i: value if i == 3 else good)  # noqa: E731
    topk = st.fixed_dictionaries({"k": either(st.integers(1, 5))}, optional={
        "user_id": either(st.integers(-2, 250)), "history": either(st.lists(st.integers(0, 120), max_size=4)),
        "features": either(st.fixed_dictionaries({}, optional={"segment": either(st.integers(0, 4)),
                                                             "age_bucket": either(st.integers(0, 3))})),
        "exclude": either(st.lists(st.integers(0, 120), max_size=4)), "exclude_seen": either(st.booleans())})
    item_feats = st.fixed_dictionaries({}, optional={"category": either(st.integers(0, 4)),
                                                     "tags": either(st.lists(st.integers(0, 20), max_size=4)),
                                                     "quality": either(st.floats(-3, 3))})
    item = st.fixed_dictionaries({"id": either(st.integers(1000, 1010))}, optional={
        "features": either(item_feats), "embedding": either(st.lists(st.floats(-2, 2), min_size=8, max_size=8))})
    items = st.fixed_dictionaries({"items": either(st.lists(item, max_size=3))})
    ids = st.fixed_dictionaries({"ids": either(st.lists(st.integers(1000, 1010), max_size=3))})
    requests = (st.tuples(st.just("POST"), st.just("/v1/topk"), either(topk))
                | st.tuples(st.just("POST"), st.just("/v1/items"), either(items))
                | st.tuples(st.just("DELETE"), st.just("/v1/items"), either(ids)))
    statuses = []

    @hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(request=requests)
    def check(request):
        method, path, body = request
        status, got = client.call(method, path, raw=json.dumps(body).encode())
        statuses.append(status)
        assert status < 500, (method, path, body, got)

    check()
    assert client.call("GET", "/healthz")[0] == 200
    assert client.call("POST", "/v1/topk", {"user_id": 1, "k": 3})[0] == 200
    assert any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)


def test_metrics_exposition(client):
    client.call("POST", "/v1/topk", {"user_id": 1, "k": 2})
    status, text = client.call("GET", "/metrics")
    assert status == 200
    lines = text.splitlines()
    ok = 'twotower_requests_total{route="/v1/topk",method="POST",status="200"}'
    count = [ln for ln in lines if ln.startswith(ok)]
    assert count and int(count[0].split()[-1]) >= 1
    assert any(ln.startswith('twotower_request_seconds_bucket{route="/v1/topk",le="+Inf"}') for ln in lines)
    assert any(ln.startswith("twotower_batch_size_count ") and int(ln.split()[-1]) > 0 for ln in lines)
    size = len(client.app.state.server.current[0])
    assert f"twotower_index_items {size}" in lines and any("twotower_index_info{" in ln for ln in lines)
    status, schema = client.call("GET", "/openapi.json")
    assert status == 200 and {"/v1/topk", "/v1/items", "/v1/index:reload", "/healthz"} <= set(schema["paths"])
    assert "TopKRequest" in schema["components"]["schemas"]


def test_the_server_imports_no_training_code(run):
    code = ("import sys; from serve.server import create_app; "
            f"app = create_app({str(run['dir'])!r}, warmup=False); "
            "bad = sorted(m for m in sys.modules if m == 'train' or m.startswith('train.')); "
            "assert not bad, bad; print('ok', len(app.state.server.current[0]))")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stderr[-2000:]


def test_micro_batcher_batches_and_isolates_failures():
    calls, gate = [], threading.Event()

    def fn(items):
        gate.wait(5)
        calls.append(list(items))
        if "boom" in items:
            raise ValueError("bad batch")
        return [x * 2 for x in items]

    batcher = MicroBatcher(fn, max_batch=4, max_wait_s=0.05, adaptive=False)
    futures = [batcher.submit(i) for i in range(6)]
    gate.set()
    assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8, 10]
    assert [len(c) for c in calls] == [4, 2]
    bad = batcher.submit("boom")
    with pytest.raises(ValueError, match="bad batch"):
        bad.result(5)
    assert batcher.submit(21).result(5) == 42   # the worker survived
    batcher.close()
    # Adaptive: a lone item at low load does not wait out max_wait_s; a queue of items still forms one batch.
    calls.clear()
    lone = MicroBatcher(fn, max_batch=8, max_wait_s=2.0)
    t0 = time.perf_counter()
    assert lone.submit(1).result(5) == 2 and time.perf_counter() - t0 < 1.0
    lone.close()
    adaptive = MicroBatcher(fn, max_batch=8, max_wait_s=0.05)
    gate.clear()
    futures = [adaptive.submit(i) for i in range(6)]   # the first call blocks on the gate; the rest queue up
    time.sleep(0.05)
    gate.set()
    assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8, 10] and len(calls) <= 3 and max(map(len, calls)) >= 5
    adaptive.close()


def test_micro_batcher_resolves_asyncio_futures_once_per_batch():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [ValueError(f"odd {x}") if x % 2 else 10 * x for x in items]

    batcher = MicroBatcher(fn, max_batch=8, max_wait_s=0.2, adaptive=False)

    async def main():
        loop, wakeups = asyncio.get_running_loop(), []
        threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **kw: (wakeups.append(a[0]), threadsafe(*a, **kw))[1]
        futures = [batcher.submit_async(i) for i in range(6)]
        gave_up = batcher.submit_async(99)
        gave_up.cancel()   # a caller that gave up before the batch ran: never computed
        return await asyncio.gather(*futures, return_exceptions=True), len(wakeups)

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        results, wakeups = runner.run(main())
    batcher.close()
    assert results[0::2] == [0, 20, 40] and [str(e) for e in results[1::2]] == ["odd 1", "odd 3", "odd 5"]
    assert calls == [[0, 1, 2, 3, 4, 5]] and wakeups == 1


def test_cli_config_errors_are_one_line(tmp_path):
    assert parse_args([f"run_dir={tmp_path}", "port=9000"])["port"] == 9000
    for args, message in ((["colour=red"], "colour=red: unknown key"), ([], "run_dir=None: is required"),
                          ([f"run_dir={tmp_path}", "port=70000"], "port=70000: must be an int"),
                          ([f"run_dir={tmp_path}", "batch_sizes=[0]"], "batch_sizes=[0]"),
                          ([f"run_dir={tmp_path}", "http=spdy"], "http='spdy': must be auto, h11 or httptools")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_args(args)
