"""Serving and batch candidates of a model with K = 2 embeddings per user: `/v1/topk` and the Parquet candidates
equal `towers.inference.multi.multi_interest_topk` (each of the user's first K' embeddings searched exactly with
the same exclusions, merged round-robin) for users with a short history (K' = 1) and a long one (K' = 2), over
an exact index and a ScaNN tree; `k` distinct items always; the response says how many embeddings were searched."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import smoke_cfg
from tests.serve.test_server import Client

K, PER_INTEREST, TOPK = 2, 3, 8   # K' = min(2, 1 + history // 3): 1 below 3 history items, else 2


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """An untrained K = 2 run (checkpoint at step 3), its exact export, a ScaNN tree export of the same items
    (every leaf searched, every candidate rescored: exact answers through the tree's code path), the server."""
    from serve.export import export, validate as export_validate
    from serve.manifest import write_index
    from serve.scann_index import ScaNNIndex
    from serve.server import create_app
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("multi") / "run"
    cfg = smoke_cfg("model.user.use_history=true", f"model.user.num_embeddings={K}",
                    f"model.user.history_per_interest={PER_INTEREST}")
    ds, _, _ = write_untrained_run(cfg, run_dir, step=3)
    out = export(export_validate({"run_dir": str(run_dir), "num_queries": 20}))["out"]
    app = create_app(run_dir, batch_sizes=(1, 8), max_wait_ms=2.0)
    state = app.state.server
    index = state.current[0]
    tree = ScaNNIndex(num_leaves=4, num_leaves_to_search=4, reorder=10_000, brute_force_below=10)
    tree.index(index.embeddings(), index.ids())
    assert not tree.is_exact
    tree_dir = write_index(tree, run_dir / "export" / "tree", model_version=state.model.model_version)
    client = Client(app)
    yield {"run": run_dir, "out": out, "tree": tree_dir, "app": app, "client": client, "ds": ds,
           "trained": state.model.trained, "index": index}
    client.close()


def want_topk(m, user_emb, k, exclude_rows):
    """Raw ids [Q, k] of `multi_interest_topk` with exact search; exclude_rows: per user, item rows."""
    from towers.inference.exact import exact_topk
    from towers.inference.multi import multi_interest_topk

    index = m["index"]
    assert (index.ids() == m["ds"].item_vocab.raw_ids).all()   # slot i = item row i
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in exclude_rows])]).astype(np.int64)
    items = np.concatenate([np.asarray(x, np.int64) for x in exclude_rows] + [np.zeros(0, np.int64)])
    got = multi_interest_topk(user_emb, index.embeddings(), k, exact_topk, exclude_indptr=indptr,
                              exclude_items=np.sort(items) if len(exclude_rows) == 1 else items)
    assert (got >= 0).all()
    return index.ids()[got]


def _history_lengths(m, users):
    from data.batching import user_history
    return (user_history(m["ds"], users, m["trained"].config["data"]["history_len"]) >= 0).sum(1)


def _known_users(m):
    """Two users with fewer than 3 history items (K' = 1) and two with more (K' = 2)."""
    users = np.arange(m["ds"].num_users, dtype=np.int32)
    lengths = _history_lengths(m, users)
    short, long = users[lengths < PER_INTEREST][:2], users[lengths >= PER_INTEREST][:2]
    assert len(short) == 2 and len(long) == 2
    return np.concatenate([short, long]), np.array([1, 1, 2, 2])


def test_topk_of_known_users_equals_the_merged_exact_search(multi):
    from towers.inference.embed import embed_users

    users, active = _known_users(multi)
    emb = embed_users(multi["trained"], multi["ds"], users)
    assert emb.shape[1] == K and (emb[:, 1].any(1) == (active == 2)).all()
    indptr, items = multi["ds"].train_csr()
    raw = multi["ds"].user_vocab.raw_ids[users].tolist()
    for exclude_seen in (False, True):
        seen = [items[indptr[u]:indptr[u + 1]] if exclude_seen else [] for u in users]
        for j, u in enumerate(raw):
            status, body = multi["client"].call("POST", "/v1/topk", {"user_id": u, "k": TOPK,
                                                                      "exclude_seen": exclude_seen})
            assert status == 200, body
            ids = [it["id"] for it in body["items"]]
            assert len(ids) == TOPK == len(set(ids)) and body["interests"] == active[j]
            assert ids == want_topk(multi, emb[j:j + 1], TOPK, [seen[j]])[0].tolist()
            # Each item carries the score of one of the searched embeddings.
            item_emb = multi["index"].embeddings()[multi["ds"].item_vocab.lookup(np.asarray(ids))]
            options = item_emb @ emb[j, :active[j]].T
            assert np.isclose(np.array([it["score"] for it in body["items"]])[:, None], options,
                              rtol=1e-4, atol=1e-5).any(1).all()


def test_topk_of_a_described_user_with_exclusions_keeps_k_filled(multi):
    """An unknown user given 2 history items searches one embedding, given 5 both; explicit exclusions of
    the best items of either interest still leave k items, equal to the reference on the same inputs."""
    from towers.inference.embed import UserInputs, embed_users

    ds, trained = multi["ds"], multi["trained"]
    raw_items = ds.item_vocab.raw_ids
    feats = {s.name: np.zeros(1, np.int32) for s in trained.model.user.features.specs}
    hist_len = trained.config["data"]["history_len"]
    for history, active in (([3, 9], 1), ([3, 9, 14, 27, 40], 2)):
        hist = np.full((1, hist_len), -1, np.int32)
        hist[0, :len(history)] = ds.item_vocab.lookup(raw_items[history])
        emb = embed_users(trained, ds, UserInputs(np.array([-1], np.int32), feats, hist))
        best = want_topk(multi, emb, 4, [[]])[0]
        exclude = [*best.tolist(), *raw_items[history].tolist()]
        body = {"history": raw_items[history].tolist(), "k": TOPK, "exclude": exclude, "features": {}}
        status, got = multi["client"].call("POST", "/v1/topk", body)
        assert status == 200, got
        ids = [it["id"] for it in got["items"]]
        assert got["interests"] == active and len(ids) == TOPK == len(set(ids)) and not set(ids) & set(exclude)
        assert ids == want_topk(multi, emb, TOPK, [ds.item_vocab.lookup(np.asarray(exclude))])[0].tolist()


def test_scann_tree_index_serves_the_same_merged_lists(multi):
    from towers.inference.embed import embed_users

    users, active = _known_users(multi)
    emb = embed_users(multi["trained"], multi["ds"], users)
    c = multi["client"]
    status, body = c.call("POST", "/v1/index:reload", {"index_dir": str(multi["tree"])})
    assert status == 200, body
    try:
        raw = multi["ds"].user_vocab.raw_ids[users].tolist()
        for j, u in enumerate(raw):
            status, body = c.call("POST", "/v1/topk", {"user_id": u, "k": TOPK})
            assert status == 200 and body["interests"] == active[j], body
            assert [it["id"] for it in body["items"]] == want_topk(multi, emb[j:j + 1], TOPK, [[]])[0].tolist()
    finally:
        status, body = c.call("POST", "/v1/index:reload", {"index_dir": str(multi["out"])})
        assert status == 200, body


def test_openapi_documents_the_interests_field(multi):
    status, spec = multi["client"].call("GET", "/openapi.json")
    assert status == 200
    field = spec["components"]["schemas"]["TopKResponse"]["properties"]["interests"]
    assert "embeddings" in field["description"]


@pytest.mark.parametrize("search", ["exact", "index"])
def test_batch_candidates_equal_the_merged_exact_search(multi, tmp_path, search):
    """Every user's candidates (train and valid items excluded) equal the reference; k always filled. The
    "index" search runs the ScaNN tree through over-fetching, one batched search for all active embeddings."""
    import serve.candidates as candidates
    from towers.inference.embed import embed_users

    ds = multi["ds"]
    overrides = {"index_dir": str(multi["tree"]), "search": "index"} if search == "index" else {}
    summary = candidates.run({"run_dir": str(multi["run"]), "out": str(tmp_path), "progress": False,
                              "k": TOPK, "chunk_users": 64, **overrides})
    assert summary["users"] == ds.num_users
    rows = [r for p in sorted(tmp_path.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    users = ds.user_vocab.lookup(np.asarray([r["user_id"] for r in rows], ds.user_vocab.raw_ids.dtype))
    emb = embed_users(multi["trained"], ds, users)
    csrs = [ds.split_csr(s) for s in ("train", "valid") if getattr(ds, s) is not None]
    seen = [np.unique(np.concatenate([items[indptr[u]:indptr[u + 1]] for indptr, items in csrs])) for u in users]
    want = want_topk(multi, emb, TOPK, seen)
    got = np.array([r["item_ids"] for r in rows])
    np.testing.assert_array_equal(got, want)
    assert emb[:, 1].any(1).any() and not emb[:, 1].any(1).all()    # both K' = 1 and K' = 2 users
    for r, e in zip(rows, emb):
        item_emb = multi["index"].embeddings()[ds.item_vocab.lookup(np.asarray(r["item_ids"]))]
        options = item_emb @ e.T
        assert np.isclose(np.array(r["scores"])[:, None], options, rtol=1e-4, atol=1e-5).any(1).all()


def test_prepared_dataset_eval_and_candidates_equal_in_memory(tmp_path):
    """Twin K = 2 runs (same seeds) on synthetic data in memory and on its prepared copy: `python -m eval`
    (read in chunks) and batch candidates give the same numbers and rows, the ANN skip noted in both."""
    import serve.candidates as candidates
    from data import load
    from data.prepared.write import write_dataset
    from eval.config import EvaluateConfig
    from eval.run import run as evaluate
    from serve.export import export, validate as export_validate
    from train.loop import write_untrained_run

    multi = ["model.user.use_history=true", f"model.user.num_embeddings={K}",
             f"model.user.history_per_interest={PER_INTEREST}"]
    mem_cfg = smoke_cfg("data.valid_fraction=0.1", *multi)
    write_dataset(load(mem_cfg.data), tmp_path / "prepared", num_shards=3, config={})
    disk_cfg = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={tmp_path / 'prepared'}", *multi)
    reports, rows = {}, {}
    for name, cfg in (("mem", mem_cfg), ("disk", disk_cfg)):
        write_untrained_run(cfg, tmp_path / name, step=2)
        reports[name] = evaluate(EvaluateConfig(run_dir=str(tmp_path / name), ks=[5, 10], plots=False,
                                                out_dir=str(tmp_path / f"eval-{name}"), chunk_users=16))
        export(export_validate({"run_dir": str(tmp_path / name), "num_queries": 20}))
        candidates.run({"run_dir": str(tmp_path / name), "out": str(tmp_path / f"cand-{name}"), "progress": False,
                        "k": TOPK, "chunk_users": 48})
        rows[name] = pq.read_table(tmp_path / f"cand-{name}" / "part-00000-of-00001.parquet").to_pylist()
    mem, disk = reports["mem"], reports["disk"]
    assert mem["num_users"] == disk["num_users"] > 0
    for key in ("methods", "coverage", "skipped"):
        assert disk[key] == mem[key], key
    assert "ann" in disk["skipped"] and "model_ann" not in disk["methods"]
    assert rows["disk"] == rows["mem"] and all(len(r["item_ids"]) == TOPK for r in rows["disk"])
