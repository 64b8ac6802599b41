"""Prepared datasets: the out-of-core job and the in-memory loader agree row for row, training batches read from
shards equal the in-memory ones (and do not depend on the number of processes), and damaged preparations fail
with the file named."""
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import DataError, load
from data.batching import Batches
from data.config import resolve_config
from data.prepared import format as fmt
from data.prepared.local import prepare_parquet
from data.prepared.read import PreparedData
from data.prepared.write import write_dataset
from data.shuffle import EpochOrder, permute

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _log(tmp_path, files=3, rows=6000, seed=0):
    """A small Parquet log with raw (non-contiguous) ids, many equal timestamps, repeats and ratings."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "log"
    d.mkdir()
    for k in range(files):
        pq.write_table(pa.table({"user_id": rng.integers(0, 300, rows) * 7 + 3,
                                 "item_id": rng.integers(0, 200, rows) * 11,
                                 "timestamp": rng.integers(0, 40, rows) * 1000,
                                 "rating": rng.integers(1, 6, rows)}), d / f"part-{k}.parquet")
    return d


def _same_dataset(a, b):
    for split in ("train", "valid", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert (x is None) == (y is None), split
        if x is None:
            continue
        for col in ("user", "item", "timestamp"):
            np.testing.assert_array_equal(getattr(x, col), getattr(y, col), err_msg=f"{split}.{col}")
    np.testing.assert_array_equal(a.user_vocab.raw_ids, b.user_vocab.raw_ids)
    np.testing.assert_array_equal(a.item_vocab.raw_ids, b.item_vocab.raw_ids)
    np.testing.assert_array_equal(a.item_counts(), b.item_counts())


@pytest.mark.parametrize("extra", [
    {},
    {"drop_duplicates": True, "min_user_interactions": 12, "valid_fraction": 0.1, "min_rating": 2,
     "rating_column": "rating", "split_seed": 3},
])
def test_out_of_core_job_equals_in_memory_loader(tmp_path, extra):
    cfg = resolve_config({"source": "parquet", "path": str(_log(tmp_path)), **extra})
    ds = load(cfg)
    # Small chunks: many chunk boundaries, each cut between two users.
    manifest = prepare_parquet(cfg, tmp_path / "out", num_shards=3, config={"k": 1}, chunk_rows=1000)
    data = PreparedData(tmp_path / "out")
    _same_dataset(ds, data.load_users())
    assert data.stats == ds.stats            # the same filtered counts and split sizes, key for key
    assert manifest["rows"] == {"train": len(ds.train), "valid": 0 if ds.valid is None else len(ds.valid),
                                "test": len(ds.test)}
    assert sum(s["rows"]["train"] for s in manifest["shards"]) == len(ds.train)


def _batches_equal(ds, data, steps, **kw):
    mem, disk = Batches(ds, **kw), Batches(data, **kw)
    parts = [Batches(data, process_index=p, process_count=4, **kw) for p in range(4)]
    for _ in range(steps):
        a, b, per = next(mem), next(disk), [next(p) for p in parts]
        for k in ("user", "item", "neg_item", "history", "item_logq"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            # every process draws the whole batch's randomness and keeps its share of rows and negatives
            np.testing.assert_array_equal(a[k], np.concatenate([p[k] for p in per]), err_msg=k)
        for side in ("user_feat", "item_feat"):
            for name in a[side]:
                np.testing.assert_array_equal(a[side][name], b[side][name])
    assert mem.state() == disk.state() == parts[0].state()


def test_processes_read_disjoint_examples_covering_each_epoch_once(tmp_path):
    """4 processes' shares of consecutive global batches: disjoint, and over one epoch every example once."""
    ds = load({"source": "synthetic", "num_users": 60, "num_items": 40, "interactions_per_user": 6,
               "num_clusters": 4})
    write_dataset(ds, tmp_path / "p", num_shards=3, config={})
    data = PreparedData(tmp_path / "p")
    n, batch = len(ds.train), 32
    parts = [Batches(data, batch_size=batch, num_negatives=8, history_len=3, seed=1, process_index=p,
                     process_count=4) for p in range(4)]
    indptr, _ = ds.train_csr()
    seen = []
    for _ in range(n // batch):
        for p in parts:
            b = next(p)
            # an example is (user, position): recover its id from the user and the history length (causal)
            seen.append(np.stack([b["user"], b["item"]], axis=1))
    per_process = [parts[p].examples_at(0)[p * 8:(p + 1) * 8] for p in range(4)]
    assert len(set(np.concatenate(per_process).tolist())) == batch      # disjoint shares of one batch
    epoch = np.concatenate([parts[0].examples_at(k * batch) for k in range(n // batch)])
    assert len(np.unique(epoch)) == len(epoch) == (n // batch) * batch   # no example twice in an epoch
    rows = np.concatenate(seen)
    users = np.searchsorted(indptr, epoch, side="right") - 1
    np.testing.assert_array_equal(np.sort(rows[:, 0]), np.sort(users))  # the shares are those examples


@pytest.mark.realdata
def test_movielens_prepared_batches_equal_in_memory(shared_data, tmp_path):
    ds = load({"source": "movielens", "path": str(shared_data / "ml-100k"), "valid_fraction": 0.1})
    write_dataset(ds, tmp_path / "p", num_shards=4, config={})
    data = PreparedData(tmp_path / "p")
    _same_dataset(ds, data.load_users())
    for mode in ("causal", "sample"):
        _batches_equal(ds, data, 30, batch_size=512, num_negatives=16, history_len=20, history_mode=mode, seed=3,
                       negatives_per_row=4)


@pytest.mark.realdata
def test_gowalla_prepared_batches_equal_in_memory(shared_data, tmp_path):
    ds = load({"source": "lightgcn", "path": str(shared_data / "gowalla"), "valid_fraction": 0.1})
    write_dataset(ds, tmp_path / "p", num_shards=8, config={})
    data = PreparedData(tmp_path / "p", verify="size")
    sub = data.load_users(np.arange(0, ds.num_users, 97))
    indptr, items = ds.train_csr()
    sub_indptr, sub_items = sub.train_csr()
    for u in range(0, ds.num_users, 97):
        np.testing.assert_array_equal(items[indptr[u]:indptr[u + 1]], sub_items[sub_indptr[u]:sub_indptr[u + 1]])
    _batches_equal(ds, data, 5, batch_size=1024, num_negatives=64, history_len=50, seed=0)
    # What held-out metrics are computed from: the evaluated users, their excluded and their held-out items.
    from eval.holdout import heldout_users
    evaluated = data.eval_subset("test", max_users=500, seed=0)
    users = heldout_users(ds, max_users=500, seed=0)
    np.testing.assert_array_equal(heldout_users(evaluated, max_users=500, seed=0), users)
    for name in ("seen_csr", "heldout_csr"):
        (a_ptr, a_items), (b_ptr, b_items) = getattr(ds, name)("test"), getattr(evaluated, name)("test")
        for u in users[::25]:
            np.testing.assert_array_equal(a_items[a_ptr[u]:a_ptr[u + 1]], b_items[b_ptr[u]:b_ptr[u + 1]])


def test_epoch_order_is_a_permutation_and_changes_each_epoch():
    for n in (1, 2, 3, 17, 1000, 4099):
        for epoch in (0, 1):
            np.testing.assert_array_equal(np.sort(permute(5, epoch, np.arange(n), n)), np.arange(n))
    a, b = permute(5, 0, np.arange(1000), 1000), permute(5, 1, np.arange(1000), 1000)
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9
    # a batch crossing the epoch boundary takes the rest of epoch 0, then the start of epoch 1
    small = load({"source": "synthetic", "num_users": 30, "num_items": 20, "interactions_per_user": 5,
                  "num_clusters": 4})
    n = len(small.train)
    it = Batches(small, batch_size=n - 3, num_negatives=0, history_len=0, seed=2)
    first, second = it.examples_at(0), it.examples_at(n - 3)
    np.testing.assert_array_equal(np.sort(np.concatenate([first, second[:3]])), np.arange(n))


def test_cached_epoch_order_equals_the_per_position_one():
    """Whole epochs cached or each batch evaluated alone: the same examples, across epoch boundaries, with batches
    longer than an epoch, from threads and after pickling (a worker process)."""
    import concurrent.futures
    import pickle
    for n in (1, 7, 1000, 4099):
        cached, alone = EpochOrder(3, n), EpochOrder(3, n, cache_max=0)
        for start, count in ((0, 64), (n - 5, 64), (3 * n + 2, 2 * n + 9), (10 * n, 1)):
            at = start + np.arange(count)
            want = permute(3, at // n, at % n, n)
            np.testing.assert_array_equal(cached(start, count), want)
            np.testing.assert_array_equal(alone(start, count), want)
            assert cached(start, count).dtype == np.int64
        assert len(cached._epochs) <= 2
    order = EpochOrder(9, 5000)
    starts = [k * 700 for k in range(40)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: order(s, 700), starts))
    for s, g in zip(starts, got):
        np.testing.assert_array_equal(g, permute(9, (s + np.arange(700)) // 5000, (s + np.arange(700)) % 5000, 5000))
    copy = pickle.loads(pickle.dumps(order))
    assert not copy._epochs
    np.testing.assert_array_equal(copy(4990, 30), order(4990, 30))


def test_damaged_preparations_fail_naming_the_file(tmp_path):
    cfg = resolve_config({"source": "parquet", "path": str(_log(tmp_path, files=1, rows=3000))})
    prepare_parquet(cfg, tmp_path / "p", num_shards=2, config={})
    shard = tmp_path / "p" / fmt.shard_name(1, 2)
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="shard-00001-of-00002.*sha256"):
        PreparedData(tmp_path / "p")
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001-of-00002.*missing"):
        PreparedData(tmp_path / "p", verify="size")
    (tmp_path / "p" / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: missing"):
        PreparedData(tmp_path / "p")


def test_rerun_keeps_finished_shards_and_refuses_another_config(tmp_path):
    log = _log(tmp_path, files=2, rows=3000)
    cfg = resolve_config({"source": "parquet", "path": str(log)})
    first = prepare_parquet(cfg, tmp_path / "p", num_shards=3, config={"a": 1})
    kept = tmp_path / "p" / fmt.shard_name(0, 3)
    os.utime(kept, (1, 1))                                   # an old mtime: rewritten files get a new one
    (tmp_path / "p" / fmt.shard_name(2, 3)).unlink()          # as if killed before shard 2 and the manifest
    (tmp_path / "p" / "manifest.json").unlink()
    second = prepare_parquet(cfg, tmp_path / "p", num_shards=3, config={"a": 1})
    assert kept.stat().st_mtime == 1
    assert second["files"] == first["files"]                 # same bytes, shard 2 rewritten identically
    with pytest.raises(DataError, match="another source or config"):
        prepare_parquet(cfg, tmp_path / "p", num_shards=3, config={"a": 2})


def test_null_ids_name_file_and_row(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([1, 2, None, 4]), "item_id": [5, 6, 7, 8],
                             "timestamp": [1, 2, 3, 4]}), d / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: column 'user_id' has a null id in data row 3"):
        prepare_parquet(resolve_config({"source": "parquet", "path": str(d)}), tmp_path / "p", num_shards=1,
                        config={})


def test_prepare_command(tmp_path):
    log = _log(tmp_path, files=1, rows=2000)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "data.prepare", f"data.path={log}", f"out={tmp_path / 'p'}",
                          "num_shards=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert PreparedData(tmp_path / "p").manifest["rows"]["train"] > 0
    bad = subprocess.run([sys.executable, "-m", "data.prepare", f"data.path={log}", "out=x", "num_shard=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("config error:") and "num_shard" in bad.stderr
