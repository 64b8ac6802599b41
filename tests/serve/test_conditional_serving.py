"""Serving a conditional model (`model.user.condition=tags`, a multihot item feature): `/v1/topk` with
`condition` returns exactly the exact top-k among the items holding the value, for the user embedded with that
value; several values are merged round-robin without duplicates; unconditioned requests still work; an unknown
value, too many values or a condition sent to an unconditional model get a 422 and the server keeps serving;
upserted items join the filtered lists by their features; the OpenAPI schema documents the field."""
import numpy as np
import pytest

from tests.helpers import smoke_cfg
from tests.serve.test_server import Client

TOPK = 5


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
    from serve.export import export, validate as export_validate
    from serve.server import create_app
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("cond") / "run"
    ds, _, _ = write_untrained_run(smoke_cfg("model.user.condition=tags"), run_dir, step=3)
    export(export_validate({"run_dir": str(run_dir), "num_queries": 20}))
    app = create_app(run_dir, batch_sizes=(1, 8), max_wait_ms=2.0)
    client = Client(app)
    state = app.state.server
    yield {"ds": ds, "client": client, "trained": state.model.trained, "index": state.current[0]}
    client.close()


def want(m, user: int, code: int | None, k: int, exclude=()) -> list:
    """Raw ids of the exact top-k among the items with tag `code` (every item for None)."""
    from towers.inference.embed import embed_users
    ds, index = m["ds"], m["index"]
    assert (index.ids() == ds.item_vocab.raw_ids).all()
    emb = embed_users(m["trained"], ds, np.array([user], np.int32),
                      condition=None if code is None else np.array([code], np.int32))[0]
    tags = ds.item_features["tags"]
    ok = np.ones(ds.num_items, bool) if code is None else (tags == code).any(1)
    ok[list(exclude)] = False
    cand = np.flatnonzero(ok)
    scores = index.embeddings()[cand] @ emb
    order = np.lexsort((cand, -scores))[:k]
    return ds.item_vocab.raw_ids[cand[order]].tolist()


def _values(m) -> np.ndarray:
    """The raw values a request names: the synthetic data's tags have no value vocabulary, so their codes."""
    assert "tags" not in m["trained"].feature_vocabs
    return np.arange(next(s.size for s in m["ds"].item_feature_specs if s.name == "tags"))


def _topk(m, body):
    status, got = m["client"].call("POST", "/v1/topk", body)
    assert status == 200, got
    return [it["id"] for it in got["items"]]


def test_one_value_returns_the_exact_filtered_topk(cond):
    ds = cond["ds"]
    values = _values(cond)
    tags = ds.item_features["tags"]
    for user in (0, 7):
        raw_user = ds.user_vocab.raw_ids[user].item()
        for code in (0, 3):
            ids = _topk(cond, {"user_id": raw_user, "k": TOPK, "condition": values[code].item()})
            assert ids == want(cond, user, code, TOPK)
            rows = ds.item_vocab.lookup(np.asarray(ids))
            assert (tags[rows] == code).any(1).all()
        # no condition: the tower fed 'none', every item
        assert _topk(cond, {"user_id": raw_user, "k": TOPK}) == want(cond, user, None, TOPK)


def test_several_values_merge_round_robin_without_duplicates(cond):
    from towers.inference.multi import merge_round_robin
    ds = cond["ds"]
    values = _values(cond)
    raw_user = ds.user_vocab.raw_ids[4].item()
    tags = ds.item_features["tags"]
    sizes = np.array([(tags == v).any(1).sum() for v in values])
    big, small = int(np.argmax(sizes)), int(np.flatnonzero(sizes > 0)[np.argmin(sizes[sizes > 0])])
    assert sizes[big] >= TOPK > sizes[small]
    for pair in ((big, small), (small, big)):
        ids = _topk(cond, {"user_id": raw_user, "k": TOPK, "condition": [values[c].item() for c in pair]})
        lists = [np.full(TOPK, -1) for _ in pair]
        for x, c in zip(lists, pair):
            found = ds.item_vocab.lookup(np.asarray(want(cond, 4, c, TOPK)))
            x[:len(found)] = found
        merged = merge_round_robin(np.stack(lists)[None], TOPK)[0]
        # k filled from the larger value's list although the small one runs out
        assert (merged >= 0).all() and ids == ds.item_vocab.raw_ids[merged].tolist() and len(set(ids)) == TOPK


def test_bad_conditions_get_a_422_and_the_server_keeps_serving(cond):
    raw_user = cond["ds"].user_vocab.raw_ids[0].item()
    values = _values(cond)
    for condition, reason in ((10_000, "integer codes"), ("x", "integer codes"), (list(range(100)), "1 to"),
                              ([], "1 to")):
        status, got = cond["client"].call("POST", "/v1/topk", {"user_id": raw_user, "k": 3,
                                                                "condition": condition})
        assert status == 422 and reason in str(got["detail"]), got
    tags = cond["ds"].item_features["tags"]
    big = int(np.argmax([(tags == v).any(1).sum() for v in values]))
    assert len(_topk(cond, {"user_id": raw_user, "k": 3, "condition": values[big].item()})) == 3


def test_upserted_items_join_their_values_lists(cond):
    ds = cond["ds"]
    values = _values(cond)
    raw_user = ds.user_vocab.raw_ids[2].item()
    # a new item with tag 5 whose embedding is the user's tag-5 query direction: it must come first for tag 5
    from towers.inference.embed import embed_users
    q = embed_users(cond["trained"], ds, np.array([2], np.int32), condition=np.array([5], np.int32))[0]
    status, got = cond["client"].call("POST", "/v1/items", {"items": [
        {"id": 10_001, "embedding": (q * 10).tolist()}]})
    assert status == 422 and "tags" in str(got["detail"])    # a new item needs its value
    feats = {"category": 0, "tags": [values[5].item()], "quality": [0.5]}
    status, got = cond["client"].call("POST", "/v1/items", {"items": [{"id": 10_001, "features": feats}]})
    assert status == 200, got
    ids = _topk(cond, {"user_id": raw_user, "k": 50, "condition": values[5].item()})
    assert 10_001 in ids
    assert 10_001 not in _topk(cond, {"user_id": raw_user, "k": 50, "condition": values[4].item()})
    cond["client"].call("DELETE", "/v1/items", {"ids": [10_001]})


def test_openapi_documents_condition(cond):
    status, spec = cond["client"].call("GET", "/openapi.json", None)
    assert status == 200
    assert "condition" in spec["components"]["schemas"]["TopKRequest"]["properties"]


def test_an_unconditional_model_refuses_a_condition(tmp_path):
    from serve.export import export, validate as export_validate
    from serve.server import create_app
    from train.loop import write_untrained_run

    run_dir = tmp_path / "run"
    ds, _, _ = write_untrained_run(smoke_cfg(), run_dir, step=1)
    export(export_validate({"run_dir": str(run_dir), "num_queries": 20}))
    client = Client(create_app(run_dir, batch_sizes=(1,), max_wait_ms=1.0))
    try:
        raw_user = ds.user_vocab.raw_ids[0].item()
        status, got = client.call("POST", "/v1/topk", {"user_id": raw_user, "k": 3, "condition": 1})
        assert status == 422 and "not conditional" in got["detail"]
        status, _ = client.call("POST", "/v1/topk", {"user_id": raw_user, "k": 3})
        assert status == 200
    finally:
        client.close()


def test_batch_candidates_of_user_condition_pairs(cond, tmp_path):
    """pairs= gives each (user, value) pair the exact top-k unseen items among the value's items, one row per
    pair with its condition; malformed lines and unknown values fail with the file and line."""
    import pyarrow.parquet as pq

    from serve.candidates import CandidatesError, run
    from serve.candidates.config import validate

    ds = cond["ds"]
    tags = ds.item_features["tags"]
    values = _values(cond)
    big = int(np.argmax([(tags == v).any(1).sum() for v in values]))
    run_dir = cond["trained"].run_dir
    pairs = tmp_path / "pairs.tsv"
    users = ds.user_vocab.raw_ids[[3, 1, 3]].tolist()
    pairs.write_text(f"{users[0]}\t{big}\n\n{users[1]}\t{big}\n{users[2]}\t2\n{users[0]}\t{big}\n")
    out = tmp_path / "out"
    run(validate({"run_dir": str(run_dir), "out": str(out), "k": 4, "pairs": str(pairs), "progress": False}))
    table = pq.read_table(next(out.glob("*.parquet"))).to_pylist()
    assert [(r["user_id"], r["condition"]) for r in table] == [(str(users[1]), str(big)), (str(users[0]), "2"),
                                                               (str(users[0]), str(big))]
    indptr, items = ds.train_csr()
    for r in table:
        user = int(ds.user_vocab.lookup(np.asarray([int(r["user_id"])]))[0])
        seen = items[indptr[user]:indptr[user + 1]]
        assert r["item_ids"] == want(cond, user, int(r["condition"]), 4, exclude=seen)[:len(r["item_ids"])]
        assert len(r["item_ids"]) == min(4, int(((tags == int(r["condition"])).any(1)
                                                 & ~np.isin(np.arange(ds.num_items), seen)).sum()))
    pairs.write_text(f"{users[0]} {big}\n")
    with pytest.raises(CandidatesError, match="line 1: expected user_id<TAB>value"):
        run(validate({"run_dir": str(run_dir), "out": str(tmp_path / "o2"), "pairs": str(pairs)}))
    pairs.write_text(f"{users[0]}\t99\n")
    with pytest.raises(CandidatesError, match="integer codes"):
        run(validate({"run_dir": str(run_dir), "out": str(tmp_path / "o3"), "pairs": str(pairs)}))
