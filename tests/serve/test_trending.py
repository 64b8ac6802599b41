"""The trending refresh: decay math by hand, selection order, and a refresh of a real export (smoke run) with a
log holding a brand-new item, through the library, the CLI and a loopback server; MovieLens timestamps."""
import http.server
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve.trending import DAY, ConfigError, refresh, select_trending, trending_scores, validate
from tests.helpers import REPO, smoke_cfg

NEW_ID = 10_000


def test_decay_halves_per_half_life_and_ignores_outside_the_window():
    now = 1_000 * DAY
    rows = [3, 3, 3, 1, 1, 7, 7]
    ts = [now, now - 7 * DAY, now - 14 * DAY,     # item 3: 1 + 1/2 + 1/4
          now - 3.5 * DAY, now + DAY,             # item 1: 2**-0.5; the future one is ignored
          now - 91 * DAY, now - 200 * DAY]        # item 7: both before the 90-day window
    items, scores = trending_scores(rows, ts, now=now, half_life_days=7, window_days=90)
    np.testing.assert_array_equal(items, [1, 3])
    np.testing.assert_allclose(scores, [2 ** -0.5, 1.75], rtol=1e-12)
    _, weighted = trending_scores(rows, ts, now=now, half_life_days=7, weights=[2, 2, 2, 1, 1, 1, 1])
    np.testing.assert_allclose(weighted, [2 ** -0.5, 3.5], rtol=1e-12)
    items, scores = trending_scores(rows, ts, now=now, half_life_days=7, window_days=None)
    np.testing.assert_array_equal(items, [1, 3, 7])
    np.testing.assert_allclose(scores[2], 2 ** -13 + 2 ** (-200 / 7), rtol=1e-12)
    assert trending_scores([1], [now + 1], now=now)[0].size == 0
    with pytest.raises(ValueError, match="half_life_days must be > 0"):
        trending_scores(rows, ts, now=now, half_life_days=0)


def test_select_trending_orders_cuts_and_breaks_ties_by_position():
    scores = np.array([0.5, 2.0, 0.0, 2.0, 1.0, 0.2])
    np.testing.assert_array_equal(select_trending(scores, 10), [1, 3, 4, 0, 5])
    np.testing.assert_array_equal(select_trending(scores, 2), [1, 3])
    np.testing.assert_array_equal(select_trending(scores, 10, min_score=0.5), [1, 3, 4])


def test_validate_names_the_bad_key(tmp_path):
    for raw, message in (({"top_n": 0}, "top_n=0: must be > 0"),
                         ({"half_life_days": -1}, "half_life_days=-1"),
                         ({"server": "http://example.com:8000"}, "must be an http URL on 127.0.0.1"),
                         ({"server": "http://127.0.0.1:1", "out": "x"}, "not both"),
                         ({"log": "/nonexistent.parquet"}, "log='/nonexistent.parquet': no such file"),
                         ({"bogus": 1}, "bogus=1: unknown key")):
        with pytest.raises(ConfigError, match=message):
            validate({"run_dir": str(tmp_path), **raw})
    assert validate({"run_dir": str(tmp_path), "server": "http://localhost:8000"}).server


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A smoke run directory (checkpoint of a fresh state at step 3) and its exported index."""
    from flax import nnx

    from serve.export import export
    from towers.two_tower import TwoTower
    from train.checkpoint import Checkpointer
    from train.loop import load_data, save_artifacts
    from train.sparse import make_sparse_optimizer
    from train.state import dense_optimizer, init_state, table_sizes

    run_dir = tmp_path_factory.mktemp("run")
    c = smoke_cfg()
    ds = load_data(c)
    save_artifacts(run_dir, c, ds)
    model = TwoTower(c.model, ds.user_feature_specs, ds.item_feature_specs, rngs=nnx.Rngs(c.seed))
    sizes = table_sizes(c, ds.num_users, ds.num_items)
    sparse = {name: make_sparse_optimizer(c.optimizer.sparse.name, learning_rate=0.1) for name in sizes}
    state = init_state(c, model, sizes, dense_optimizer(c, 3), sparse, c.seed)
    ckpt = Checkpointer(run_dir / "ckpt", every_steps=1, max_to_keep=2, async_save=False)
    ckpt.save(3, state, {"data": {}}, force=True)
    ckpt.close()
    summary = export({"run_dir": str(run_dir), "num_queries": 20, "batch_size": 16})
    graphdef, _ = nnx.split(model)
    return {"dir": run_dir, "ds": ds, "graphdef": graphdef, "state": state, "index_dir": summary["out"]}


def _log(tmp_path, ds, *, new_features: dict):
    """A parquet log: recent interactions with a few known items, and the most with a brand-new item."""
    now = int(ds.train.timestamp.max())
    known = ds.item_vocab.raw_ids[[4, 9]].tolist()
    ids = [NEW_ID] * 4 + [known[0]] * 2 + [known[1]] + [known[1]] * 5
    ts = [now] * 4 + [now - 2 * DAY] * 2 + [now] + [now - 200 * DAY] * 5   # known[1]'s old rows fall outside
    cols = {"item_id": pa.array(ids, pa.int64()), "timestamp": pa.array(ts, pa.int64())}
    for name, value in new_features.items():   # known items' rows carry nulls: their own features are used
        cols[name] = pa.array([value] * 4 + [None] * 8)
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(cols), path)
    return path, now, known


def test_refresh_upserts_a_new_item_embedded_from_its_features(exported, tmp_path):
    from serve.manifest import load_index
    from towers.embed import embed_items

    ds, state = exported["ds"], exported["state"]
    path, now, known = _log(tmp_path, ds, new_features={"category": 2, "tags": [1, 3, 999], "quality": 0.7})
    s = refresh({"run_dir": str(exported["dir"]), "log": str(path), "half_life_days": 1, "out": str(tmp_path / "o")})
    assert (s["trending"], s["new"], s["now"]) == (3, 1, now)
    assert s["ids"].tolist() == [NEW_ID, known[1], known[0]]   # 4 > 1 > 2 * 0.25: decay and window applied
    np.testing.assert_allclose(s["scores"], [4, 1, 0.5], rtol=1e-12)
    old, _ = load_index(exported["index_dir"])
    index, manifest = load_index(tmp_path / "o", model_version=manifest_version(exported))
    assert len(index) == len(old) + 1 == ds.num_items + 1
    ids, emb = index.ids().tolist(), index.embeddings()
    # The new item: row -1 with its log features (tag 999 is out of range and dropped; padding -1).
    tags = np.full((1, tags_len(ds)), -1, np.int32)
    tags[0, :2] = [1, 3]
    feats = {"category": np.array([2], np.int32), "tags": tags, "quality": np.array([[0.7]], np.float32)}
    want = embed_items(exported["graphdef"], state["params"], state["tables"]["item"], np.array([-1]), feats)
    np.testing.assert_allclose(emb[ids.index(NEW_ID)], want[0], rtol=1e-5, atol=1e-6)
    # Known items keep the ID-row embedding of the original export.
    for raw in known:
        np.testing.assert_allclose(emb[ids.index(raw)], old.embeddings()[old.ids().tolist().index(raw)],
                                   rtol=1e-5, atol=1e-6)
    note = manifest["trending_refreshes"][-1]
    assert (note["count"], note["new"], note["params"]["half_life_days"]) == (3, 1, 1.0)
    assert manifest["step"] == 3 and len(load_index(exported["index_dir"])[0]) == ds.num_items  # source untouched


def manifest_version(exported):
    from serve.manifest import read_manifest
    return read_manifest(exported["index_dir"])["model_version"]


def tags_len(ds):
    return next(s.max_len for s in ds.item_feature_specs if s.name == "tags")


def test_new_items_without_feature_columns_fail_with_the_missing_names(exported, tmp_path):
    from serve.trending import TrendingError

    path, _, _ = _log(tmp_path, exported["ds"], new_features={"category": 1})
    with pytest.raises(TrendingError, match=r"no column\(s\) \['tags', 'quality'\]"):
        refresh({"run_dir": str(exported["dir"]), "log": str(path), "out": str(tmp_path / "o")})


def test_cli_refreshes_from_the_runs_own_synthetic_timestamps(exported):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "serve.trending", f"run_dir={exported['dir']}", "top_n=5",
                           "window_days=30"], cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trending: 5 items (0 new)" in done.stdout
    out = exported["index_dir"].parent / f"{exported['index_dir'].name}-trending-"
    written = [p for p in out.parent.iterdir() if p.name.startswith(out.name)]
    assert len(written) == 1
    from serve.manifest import load_index
    index, manifest = load_index(written[0])
    assert len(index) == exported["ds"].num_items and manifest["trending_refreshes"][-1]["count"] == 5
    bad = subprocess.run([sys.executable, "-m", "serve.trending", f"run_dir={exported['dir']}", "top_n=0"],
                         cwd=REPO, env=env, text=True, capture_output=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "config error: top_n=0: must be > 0"


def test_server_mode_posts_embeddings_to_a_loopback_server(exported):
    posted, version = [], manifest_version(exported)

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply({"model_version": version})

        def do_POST(self):
            posted.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self._reply({"upserted": len(posted[-1]["items"]), "index_size": 100, "index_version": "v"})

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = refresh({"run_dir": str(exported["dir"]), "top_n": 3,
                     "server": f"http://127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
    items = posted[0]["items"]
    assert [it["id"] for it in items] == s["ids"].tolist() and len(items[0]["embedding"]) == 8
    from serve.manifest import load_index
    old, _ = load_index(exported["index_dir"])
    row = old.ids().tolist().index(items[0]["id"])
    np.testing.assert_allclose(items[0]["embedding"], old.embeddings()[row], rtol=1e-5, atol=1e-6)


def test_movielens_trending_items_are_real_and_ordered(shared_data):
    from data.load import load

    ds = load({"source": "movielens", "path": str(shared_data / "ml-100k")})
    rows = np.concatenate([ds.train.item, ds.test.item])
    ts = np.concatenate([ds.train.timestamp, ds.test.timestamp])
    now = int(ts.max())
    items, scores = trending_scores(rows, ts, now=now, half_life_days=7, window_days=90)
    pick = select_trending(scores, 20)
    top = items[pick]
    assert len(top) == 20 and np.all(np.diff(scores[pick]) <= 0)
    assert np.all((top >= 0) & (top < ds.num_items))
    in_window = np.unique(rows[ts >= now - 90 * DAY])
    assert np.isin(top, in_window).all() and len(items) == len(in_window)
    # The best item beats a plain in-window count of a rarely-rated one.
    assert scores[pick[0]] > 1 and ds.item_vocab.raw_ids[top].dtype.kind == "i"
