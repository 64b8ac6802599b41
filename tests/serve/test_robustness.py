"""Serving under failure and concurrency: a mutation that fails part-way (in the backend or after it) leaves the
index exactly as it was; a top-k answer carries the version of the corpus it was computed on, even with an
upsert racing it; a failing micro-batch is answered at once with an error and the worker serves the next."""
import asyncio
import concurrent.futures
import threading
import time

import numpy as np
import pytest

from serve.batcher import MicroBatcher
from serve.index import BruteForce
from serve.scann_index import ScaNNIndex
from serve.schemas import TopKRequest, UpsertRequest
from serve.server import create_app
from tests.serve.test_index import clustered
from tests.serve.test_server import Client, run, user_embeddings  # noqa: F401 (run: the module's fixture)


# ------------------------------------------------------------------------------------ atomic mutations
class _FlakySearcher:
    """Wraps ScaNN's searcher: the first call of `method` applies part of the change, then raises (as a crash
    between two of ScaNN's internal steps would); every later call passes through."""

    def __init__(self, real, method: str):
        self.real, self.method, self.armed = real, method, True

    def __getattr__(self, name):
        return getattr(self.real, name)

    def upsert(self, slots, vectors, threads):
        if self.method == "upsert" and self.armed and slots[0] is None:  # the insert of new items
            self.armed = False
            self.real.upsert(slots[:1], vectors[:1], threads)             # one of them lands, then a crash
            raise RuntimeError("injected ScaNN failure")
        return self.real.upsert(slots, vectors, threads)

    def delete(self, slots):
        if self.method == "delete" and self.armed:
            self.armed = False
            self.real.delete(slots[:len(slots) // 2])
            raise RuntimeError("injected ScaNN failure")
        return self.real.delete(slots)


def _raise(*_):
    raise RuntimeError("injected backend failure")


def _state(index, queries, exclude) -> list[np.ndarray]:
    """Everything a reader can see: ids and vectors by slot, and top-25 answers with and without exclusions."""
    return [index.ids(), index.embeddings(), *index.search(queries, 25), *index.search(queries, 25, exclude=exclude)]


def _same_answers(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want):
        if g.dtype.kind == "f":   # ScaNN's SIMD sums of a rewritten row may differ by an ulp
            np.testing.assert_allclose(g, w, rtol=1e-6)
        else:
            np.testing.assert_array_equal(g, w)


def _same_index(index, queries, exclude, want: list[np.ndarray], *, approximate: bool) -> None:
    """The index holds exactly the corpus of `want` (ids and vectors by slot). An exact index answers exactly as
    `want`; a ScaNN tree answers a search of that corpus: each score is its item's stored vector times the query,
    no excluded item comes back, and the top-25 mostly agree. (A ScaNN slot written again, by an undo or an
    upsert, joins its nearest leaf, which need not be the leaf training put it in, so which near-ties a
    partial search reaches may change.)"""
    got = _state(index, queries, exclude)
    if not approximate:
        _same_answers(got, want)
        return
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    slot = {int(i): s for s, i in enumerate(got[0])}
    for (scores, ids), (_, want_ids), banned in (((got[2], got[3]), (want[2], want[3]), set()),
                                                  ((got[4], got[5]), (want[4], want[5]), set(exclude[0]))):
        vectors = got[1][[[slot[int(i)] for i in row] for row in ids]]
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, vectors), rtol=1e-5, atol=1e-6)
        assert not banned & set(ids.ravel().tolist())
        overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), want_ids.tolist())])
        assert overlap >= 0.9, overlap


@pytest.mark.parametrize("backend", ["brute_force", "scann_tree"])
@pytest.mark.parametrize("mutation", ["upsert", "delete"])
def test_a_mutation_failing_part_way_leaves_the_index_as_it_was(backend, mutation, monkeypatch, tmp_path):
    rng = np.random.default_rng(11)
    items, queries = clustered(3000, 16, rng), clustered(12, 16, rng)
    index = BruteForce() if backend == "brute_force" else ScaNNIndex(brute_force_below=100)
    index.index(items, np.arange(3000) * 3).save(tmp_path)   # ScaNN's training is not deterministic: the
    control = type(index).load(tmp_path)                     # control is a copy that will never fail

    # The upsert replaces two vectors and inserts two items that top every query; the delete removes items
    # from the middle and the end of the slot range (so ScaNN moves some and pops others).
    change_ids, change_emb = [6, 8997, 50_000, 50_001], np.concatenate([items[:2], 9 * queries[:2]])
    doomed = [0, 300, 8997, 8994, 4500]

    def change(index):
        index.upsert(change_emb, change_ids) if mutation == "upsert" else index.delete(doomed)

    exclude = [[3, 6, 50_000, 8997]] * len(queries)
    assert index.is_exact == (backend == "brute_force")
    before = _state(index, queries, exclude)
    _same_answers(_state(control, queries, exclude), before)
    if backend == "brute_force":   # the host arrays are already changed when the backend hook fails
        monkeypatch.setattr(index, f"_backend_{mutation}", _raise)
    else:
        index._searcher.searcher = _FlakySearcher(index._searcher.searcher, mutation)
    with pytest.raises(RuntimeError) as failure:
        change(index)
    assert len(index) == 3000
    _same_index(index, queries, exclude, before, approximate=backend == "scann_tree")
    assert "nothing was changed" in str(failure.value) and "injected" in str(failure.value)
    assert index.generation == 0
    # The change, once the backend works again, gives the index that never failed.
    monkeypatch.undo()
    change(index)
    change(control)
    assert index.generation == 1 and len(index) == len(control) == 3000 + (2 if mutation == "upsert" else -5)
    _same_index(index, queries, exclude, _state(control, queries, exclude), approximate=backend == "scann_tree")
    if mutation == "upsert":
        assert index.search(queries[:2], 1)[1][:, 0].tolist() == [50_000, 50_001]
    else:
        assert not np.isin(index.search(queries, len(index))[1], doomed).any()


def test_scann_is_rebuilt_from_the_stored_vectors_when_undoing_a_failure_fails_too():
    rng = np.random.default_rng(12)
    items, queries = clustered(3000, 16, rng), clustered(12, 16, rng)
    index = ScaNNIndex(brute_force_below=100).index(items, np.arange(3000))
    broken = index._searcher

    class AlwaysFails(_FlakySearcher):
        def upsert(self, slots, vectors, threads):
            self.real.upsert(slots[:1], vectors[:1], threads)
            raise RuntimeError("injected ScaNN failure")

        def delete(self, slots):
            raise RuntimeError("injected ScaNN failure")

    broken.searcher = AlwaysFails(broken.searcher, "upsert")
    with pytest.raises(RuntimeError) as failure:
        index.upsert(9 * queries[:2], [7000, 7001])
    np.testing.assert_array_equal(index.ids(), np.arange(3000))
    np.testing.assert_array_equal(index.embeddings(), items)
    assert index._searcher is not broken and not index.is_exact and index._searcher.searcher.size() == 3000
    assert "nothing was changed" in str(failure.value)
    _, got = index.search(queries, 3000)
    assert all(sorted(row) == list(range(3000)) for row in got.tolist())  # every item once, no 7000/7001
    scores, got = index.search(queries, 10)   # scored against the stored vectors of the ids it names
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, items[got]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def client(run):  # noqa: F811 - run is the fixture imported above
    app = create_app(run["dir"], batch_sizes=(1, 8), max_wait_ms=1.0)
    c = Client(app)
    c.app = app
    yield c
    c.close()


def test_a_failed_mutation_gets_a_clear_500_and_changes_nothing(run, client, monkeypatch):  # noqa: F811
    state = client.app.state.server
    index = state.current[0]
    u = user_embeddings(run, [7])[0]
    _, health = client.call("GET", "/healthz")
    _, top = client.call("POST", "/v1/topk", {"user_id": 7, "k": 5})
    monkeypatch.setattr(index, "_backend_upsert", _raise)
    monkeypatch.setattr(index, "_backend_delete", _raise)
    item = {"items": [{"id": 9100, "embedding": (5 * u).tolist()}, {"id": top["items"][1]["id"],
                                                                     "embedding": (4 * u).tolist()}]}
    for method, body in (("POST", item), ("DELETE", {"ids": [top["items"][0]["id"]]})):
        status, got = client.call(method, "/v1/items", body)
        assert client.call("GET", "/healthz") == (200, health)
        assert client.call("POST", "/v1/topk", {"user_id": 7, "k": 5}) == (200, top)
        assert status == 500 and "nothing was changed" in got["detail"] and "injected" in got["detail"], got
    monkeypatch.undo()
    status, got = client.call("POST", "/v1/items", item)
    assert status == 200 and got["index_size"] == health["index_size"] + 1, got
    status, after = client.call("POST", "/v1/topk", {"user_id": 7, "k": 5})
    assert status == 200 and after["items"][0]["id"] == 9100 and after["index_version"] == got["index_version"]
    assert client.call("DELETE", "/v1/items", {"ids": [9100]})[0] == 200


def _topk_in_thread(pool, state, uid: int, k: int):
    return pool.submit(lambda: asyncio.run(state.topk(TopKRequest(user_id=uid, k=k))))


def test_a_response_carries_the_version_of_the_corpus_it_was_computed_on(run, client, monkeypatch):  # noqa: F811
    """Deterministic interleavings of one query and one upsert of an item that tops it: (a) the upsert lands
    after the batch picked up the live index but before its search; (b) the upsert waits for a search that
    is under way. The label must say whether the answer includes the upsert."""
    state = client.app.state.server
    index = state.current[0]
    u = user_embeddings(run, [7])[0]

    def upsert(item_id):
        return state.upsert(UpsertRequest(items=[{"id": item_id, "embedding": (6 * u).tolist()}]))

    embedding, searching, go = threading.Event(), threading.Event(), threading.Event()
    embed_queries, exact = state.model.embed_queries, index._exact

    def paused_embed(queries):
        embedding.set()
        assert go.wait(10)
        return embed_queries(queries)

    def paused_search(*args):
        searching.set()
        assert go.wait(10)
        return exact(*args)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        before = state.health()["index_version"]
        monkeypatch.setattr(state.model, "embed_queries", paused_embed)
        answer = _topk_in_thread(pool, state, 7, 3)
        assert embedding.wait(10)
        first = upsert(9200)           # nothing holds the index: applied at once
        go.set()
        got = answer.result(10)
        assert got["items"][0]["id"] == 9200
        assert got["index_version"] == first["index_version"] != before
        monkeypatch.undo()

        go.clear()
        monkeypatch.setattr(index, "_exact", paused_search)
        answer = _topk_in_thread(pool, state, 7, 3)
        assert searching.wait(10)
        second = pool.submit(upsert, 9201)
        deadline = time.time() + 10
        while not index._lock._waiting and time.time() < deadline:   # the upsert waits for the search
            time.sleep(0.01)
        assert index._lock._waiting == 1 and not second.done()
        go.set()
        got, second = answer.result(10), second.result(10)
        assert got["items"][0]["id"] == 9200 and got["index_version"] == first["index_version"]
        assert second["index_version"] not in (before, first["index_version"])
    monkeypatch.undo()
    assert client.call("POST", "/v1/topk", {"user_id": 7, "k": 1})[1]["index_version"] == second["index_version"]
    assert client.call("DELETE", "/v1/items", {"ids": [9200, 9201]})[0] == 200


# ------------------------------------------------------------------------------------------ the batcher
def test_the_batcher_worker_survives_any_failure_and_answers_the_batch_at_once():
    """A failing metrics callback, a BaseException from the batch function and a StopIteration (which an
    asyncio future refuses to hold) each fail only their batch, within a second; the next item is served."""
    class Fatal(BaseException):
        pass

    failures = {"on_batch": RuntimeError("metrics broke"), "fn": Fatal("worker killed"), "stop": StopIteration()}
    pending: list = []

    def fn(items):
        if pending and pending[0] in ("fn", "stop"):
            raise failures[pending.pop(0)]
        return [x * 2 for x in items]

    def on_batch(size):
        if pending and pending[0] == "on_batch":
            raise failures[pending.pop(0)]

    batcher = MicroBatcher(fn, max_batch=4, max_wait_s=0.01, on_batch=on_batch)

    async def submit_all(n):
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit_async(i) for i in range(n)),
                                                     return_exceptions=True), 5)

    try:
        for kind in ("on_batch", "fn", "stop"):
            pending.append(kind)
            t0 = time.perf_counter()
            with pytest.raises(BaseException) as failed:
                batcher.submit(1).result(5)
            assert failed.type is not concurrent.futures.TimeoutError and time.perf_counter() - t0 < 1
            assert batcher.submit(21).result(5) == 42, kind
        pending.append("stop")   # asyncio futures: every caller of the failing batch gets an error
        results = asyncio.run(submit_all(3))
        assert all(isinstance(r, Exception) and not isinstance(r, asyncio.TimeoutError) for r in results), results
        assert asyncio.run(submit_all(3)) == [0, 2, 4]
    finally:
        batcher.close()


def test_a_failing_batch_gets_a_503_and_the_next_request_is_served(client, monkeypatch):
    state = client.app.state.server
    embed_queries = state.model.embed_queries
    broken = [True]

    def fails_once(queries):
        if broken.pop() if broken else False:
            raise RuntimeError("injected tower failure")
        return embed_queries(queries)

    monkeypatch.setattr(state.model, "embed_queries", fails_once)
    t0 = time.perf_counter()
    status, got = client.call("POST", "/v1/topk", {"user_id": 3, "k": 4})
    assert status == 503 and "RuntimeError" in got["detail"] and time.perf_counter() - t0 < 5, got
    status, got = client.call("POST", "/v1/topk", {"user_id": 3, "k": 4})
    assert status == 200 and len(got["items"]) == 4
