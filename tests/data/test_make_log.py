"""scripts/make_log.py: a tiny log's rows, schema, determinism, per-user floor, raw ids, ties and cluster structure."""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from scripts import make_log

SPEC = make_log.LogSpec(rows=20_000, users=2_000, items=1_000, files=3, seed=7, clusters=20, chunk_rows=3_000,
                        row_group_size=2_500)


def _read(path):
    """All files of a log in file order, as numpy columns, plus the file of each row."""
    names = sorted(n for n in os.listdir(path) if n.endswith(".parquet"))
    tables = [pq.read_table(os.path.join(path, n)) for n in names]
    cols = {c: np.concatenate([t.column(c).to_numpy() for t in tables]) for c in make_log.COLUMNS}
    cols["file"] = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
    return names, tables, cols


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("log"))
    summary = make_log.generate(SPEC, out, workers=1)
    return out, summary


def test_rows_columns_and_files(log):
    out, summary = log
    names, tables, cols = _read(out)
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(os.listdir(out)) == ["_make_log.json", *names]           # no temporary file left
    assert sum(t.num_rows for t in tables) == summary["rows"] == 20_000
    for t in tables:
        assert t.schema.names == ["user_id", "item_id", "timestamp"]
        assert all(str(f.type) == "int64" for f in t.schema)
        meta = pq.ParquetFile(os.path.join(out, names[0])).metadata
        assert max(meta.row_group(g).num_rows for g in range(meta.num_row_groups)) <= 2_500
    with open(os.path.join(out, "_make_log.json")) as fh:
        assert json.load(fh)["spec"]["seed"] == 7
    stats = make_log.check_log(out)
    per_user = np.unique(cols["user_id"], return_counts=True)[1]
    assert stats["rows"] == 20_000 and stats["files"] == 3
    assert stats["distinct_users"] == per_user.size == 2_000
    assert stats["distinct_items"] == np.unique(cols["item_id"]).size
    assert stats["rows_per_user"]["min"] == per_user.min() and stats["rows_per_user"]["max"] == per_user.max()


def test_every_user_at_least_three_rows_and_heavy_tail(log):
    cols = _read(log[0])[2]
    per_user = np.unique(cols["user_id"], return_counts=True)[1]
    assert per_user.min() >= 3
    assert per_user.max() > 5 * np.median(per_user)                       # a spread of activity, not uniform


def test_ids_are_raw_not_consecutive(log):
    cols = _read(log[0])[2]
    for col, n in (("user_id", 2_000), ("item_id", 1_000)):
        ids = np.unique(cols[col])
        assert ids.min() >= 10**12 and ids.max() - ids.min() > 1000 * n   # far from 0..n-1
        assert (np.diff(ids) == 1).mean() < 0.01
    # popularity is not in id order: the most frequent item is not the smallest id
    items, counts = np.unique(cols["item_id"], return_counts=True)
    top = items[np.argsort(-counts)[:10]]
    assert not np.array_equal(np.sort(top), items[:10])
    np.testing.assert_array_equal(np.sort(make_log.user_ids(np.arange(2_000))), np.unique(cols["user_id"]))


def test_same_seed_same_log_whatever_the_workers(log, tmp_path):
    again = tmp_path / "again"
    make_log.generate(SPEC, str(again), workers=2)
    a, b = _read(log[0])[2], _read(str(again))[2]
    for c in make_log.COLUMNS:
        np.testing.assert_array_equal(a[c], b[c])
    other = tmp_path / "other"
    make_log.generate(make_log.LogSpec(**{**SPEC.__dict__, "seed": 8}), str(other), workers=1)
    assert not np.array_equal(_read(str(other))[2]["item_id"], a["item_id"])


def test_time_order_ties_and_users_across_files(log):
    cols = _read(log[0])[2]
    ts, user, file = cols["timestamp"], cols["user_id"], cols["file"]
    assert ts.min() >= make_log.T0 and ts.max() < make_log.T0 + SPEC.days * 86_400
    # files are consecutive time slices; inside a file the order is by time up to a short logging delay
    for f in range(2):
        assert ts[file == f].max() <= ts[file == f + 1].min()
    assert np.all(np.diff(ts) > -6 * 3600) and (np.diff(ts) < 0).mean() > 0.05
    order = np.lexsort((ts, user))
    same_user = user[order][1:] == user[order][:-1]
    ties = same_user & (np.diff(ts[order]) == 0)
    assert 0.005 < ties.sum() / same_user.sum() < 0.1                     # tie rate 0.02, plus chance
    files_per_user = np.array([np.unique(file[user == u]).size for u in np.unique(user)])
    assert (files_per_user >= 2).mean() > 0.2


def test_users_stick_to_their_clusters(log):
    cols = _read(log[0])[2]
    model = make_log.build_model(SPEC)
    uid, iid = make_log.user_ids(np.arange(SPEC.users)), make_log.item_ids(np.arange(SPEC.items))
    u_order, i_order = np.argsort(uid), np.argsort(iid)
    u = u_order[np.searchsorted(uid, cols["user_id"], sorter=u_order)]
    i = i_order[np.searchsorted(iid, cols["item_id"], sorter=i_order)]
    np.testing.assert_array_equal(uid[u], cols["user_id"])
    np.testing.assert_array_equal(np.bincount(u, minlength=SPEC.users), model.counts)
    cluster = np.empty(SPEC.items, np.int64)
    cluster[model.by_cluster] = np.searchsorted(model.cluster_last, np.arange(SPEC.items))
    in_pref = (model.pref[u] == cluster[i][:, None]).any(axis=1).mean()
    assert in_pref > SPEC.affinity                                        # 0.8 + the popular draws that land there
    shuffled = (model.pref[np.random.default_rng(0).permutation(u)] == cluster[i][:, None]).any(axis=1).mean()
    assert shuffled < in_pref - 0.3
    # power-law popularity: generator item 0 is the most frequent
    assert np.bincount(i).argmax() == 0


def test_small_log_scales_the_floor_down_and_refuses_fewer_rows_than_users(tmp_path):
    counts = make_log.rows_per_user(5_000, 2_000, 1.2, np.random.default_rng(0))
    assert counts.sum() == 5_000 and counts.min() == 2                   # min(3, rows // users)
    with pytest.raises(ValueError, match="every user needs"):
        make_log.generate(make_log.LogSpec(rows=100, users=200, items=10, files=1), str(tmp_path), workers=1)
    make_log.generate(make_log.LogSpec(rows=300, users=20, items=10, files=2), str(tmp_path), workers=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_log.generate(make_log.LogSpec(rows=300, users=20, items=10, files=2), str(tmp_path), workers=1)
