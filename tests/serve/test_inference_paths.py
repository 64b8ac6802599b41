"""One inference layer: export, the server (POST /v1/items, POST /v1/topk), evaluation, batch candidates and
the trending refresh give the same embedding for the same item or user of one run, including a known item
without training interactions (from its features alone everywhere), and the server refuses data whose
vocabularies hold other ids even when their sizes match."""
import types

import numpy as np
import pytest

from serve.manifest import IndexLoadError
from serve.model import Model
from serve.schemas import TopKRequest
from tests.helpers import smoke_cfg
from tests.serve.test_export import export_cfg
from tests.serve.test_server import Client

ATOL = 1e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained run (random ID rows: an untrained row is far from zero) on synthetic data with user and item
    features, a user history, and cold items (known ids without training interactions), and its export."""
    from serve.export import export
    from train.loop import write_untrained_run

    run_dir = tmp_path_factory.mktemp("paths")
    c = smoke_cfg("data.cold_item_fraction=0.2")
    ds, _, _ = write_untrained_run(c, run_dir, step=1)
    out = export(export_cfg(f"run_dir={run_dir}", "batch_size=4", "num_queries=20", "index=brute_force"))["out"]
    assert ds.item_features and ds.user_features and c.data.history_len > 0
    assert ds.cold_items.size and (ds.item_counts()[ds.cold_items] == 0).all()
    return {"dir": run_dir, "out": out, "ds": ds, "history_len": c.data.history_len}


def _exported(run, raw_ids) -> np.ndarray:
    from serve.manifest import load_index

    index, _ = load_index(run["out"])
    slots = {v: i for i, v in enumerate(index.ids().tolist())}
    return index.embeddings()[[slots[v] for v in raw_ids]]


def test_server_upserts_a_known_item_without_training_interactions_from_its_features_alone(run):
    """POST /v1/items used to embed a known item through its ID row even when that row never trained, while
    export embedded it from its features alone: two embeddings for one item."""
    m = Model(run["dir"], step=None, batch_sizes=(1, 4))
    cold = int(run["ds"].cold_items[0])
    raw = m.trained.item_vocab.raw_ids[cold].item()
    _, served = m.item_embeddings([types.SimpleNamespace(id=raw, features={}, embedding=None)], m.item_id_kind,
                                  m.output_dim)
    np.testing.assert_allclose(served[0], _exported(run, [raw])[0], rtol=0, atol=ATOL)
    # The untrained ID row would make a difference: a trained item's embedding does depend on its row.
    assert np.abs(m.trained.tables["item"][cold]).max() > 1e-2


def _csv_run(tmp_path, ids_of_item):
    """A run on a CSV log: 30 users x 8 of 40 items; `ids_of_item` maps item 0..39 to the raw id written."""
    from train.loop import write_untrained_run

    rng = np.random.default_rng(0)
    lines = ["user_id,item_id,timestamp"]
    for u in range(30):
        for t, i in enumerate(rng.choice(40, 8, replace=False)):
            lines.append(f"{u},{ids_of_item[i]},{1000 * u + t}")
    path = tmp_path / "log.csv"
    path.write_text("\n".join(lines) + "\n")
    c = smoke_cfg("data=parquet", "data.source=parquet", f"data.path={path}")
    write_untrained_run(c, tmp_path / "run", step=1)
    return path, lines


def test_server_refuses_data_whose_vocabulary_changed_with_the_same_sizes(tmp_path):
    """The server compared only vocabulary sizes: a data file that renames one item keeps every count, and
    every row after it then means another item (features, histories and exclude_seen silently wrong)."""
    path, lines = _csv_run(tmp_path, list(range(40)))
    Model(tmp_path / "run", step=None, batch_sizes=(1,))                 # the data it trained on: accepted
    # Item 3 becomes item 1000: 40 items still, but sorted rows 3..39 now hold other ids.
    path.write_text("\n".join([lines[0]] + [ln if ln.split(",")[1] != "3" else ln.replace(",3,", ",1000,")
                                            for ln in lines[1:]]) + "\n")
    with pytest.raises(IndexLoadError, match=r"item vocabulary does not match .*vocab/item.npy.*row 3"):
        Model(tmp_path / "run", step=None, batch_sizes=(1,))


def test_every_path_gives_the_same_embeddings_for_the_same_item_and_user(run, tmp_path):
    from data.load import load
    from eval.holdout import model_embeddings
    from serve.candidates import embed_user_rows, load_job
    from serve.candidates.config import validate as candidates_config
    from serve.export import query_embeddings
    from serve.server import create_app
    from serve.trending import Log, embed_trending
    from towers.restore import load_trained

    ds = run["ds"]
    trained = load_trained(run["dir"])
    assert np.array_equal(load(trained.config["data"]).item_vocab.raw_ids, ds.item_vocab.raw_ids)
    cold, warm = int(ds.cold_items[0]), int(np.flatnonzero(ds.item_counts() > 0)[0])
    items = np.array([cold, warm], np.int32)
    raw_items = ds.item_vocab.raw_ids[items]
    # Users of export's query sample (seeded: the same draw as `serve.export.query_embeddings`).
    sample = np.sort(np.random.default_rng(0).choice(ds.num_users, 20, replace=False)).astype(np.int32)
    users = sample[[0, 7, 13]]
    raw_users = ds.user_vocab.raw_ids[users]

    # Evaluation: every item and the held-out users, as `python -m eval` and the end of training compute them.
    eval_users, eval_items = model_embeddings(trained, ds, users, run["history_len"])
    # Export: the index it wrote.
    exported = _exported(run, raw_items.tolist())
    # Trending: the same items picked from a log.
    picked = {"ids": raw_items, "rows": items, "scores": np.ones(2), "now": 0.0}
    trending = embed_trending(trained, ds, Log(raw_items, np.zeros(2), None), picked, batch_size=8)
    # Batch candidates: its corpus (the index) and its users.
    job = load_job(candidates_config({"run_dir": str(run["dir"]), "index_dir": str(run["out"]),
                                      "out": str(tmp_path / "cands"), "k": 5}))
    corpus = np.asarray(job.corpus.embeddings())[job.corpus.slots_of(raw_items)]
    cand_users = embed_user_rows(job, users)
    export_users = query_embeddings(trained, ds, 20, 0, 4)[[0, 7, 13]]

    # The server, over HTTP: upsert the items by features (into the index it serves), then read them back;
    # users through the encoding /v1/topk uses, and /v1/topk's scores against evaluation's embeddings.
    app = create_app(run["dir"], run["out"], batch_sizes=(1, 8), max_wait_ms=1.0, warmup=False)
    client = Client(app)
    try:
        status, body = client.call("POST", "/v1/items", {"items": [{"id": v, "features": {}}
                                                                   for v in raw_items.tolist()]})
        assert status == 200, body
        served = _index_rows(app.state.server.current[0], raw_items)
        m = app.state.server.model
        served_users = m.embed_queries([m.make_query(TopKRequest(user_id=v, k=3), "int")
                                        for v in raw_users.tolist()])
        for row, raw in enumerate(raw_users.tolist()):
            status, body = client.call("POST", "/v1/topk", {"user_id": raw, "k": 5})
            assert status == 200, body
            got = np.array([it["score"] for it in body["items"]])
            want = _exported(run, [it["id"] for it in body["items"]]) @ eval_users[row]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    finally:
        client.close()

    for name, emb in [("export", exported), ("server", served), ("trending", trending), ("candidates", corpus)]:
        np.testing.assert_allclose(emb, eval_items[items], rtol=0, atol=ATOL, err_msg=name)
    for name, emb in [("server", served_users), ("candidates", cand_users), ("export", export_users)]:
        np.testing.assert_allclose(emb, eval_users, rtol=0, atol=ATOL, err_msg=name)


def _index_rows(index, raw_ids) -> np.ndarray:
    slots = {v: i for i, v in enumerate(index.ids().tolist())}
    return index.embeddings()[[slots[v] for v in raw_ids.tolist()]]
