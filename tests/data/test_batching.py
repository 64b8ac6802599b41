"""Training batches: shapes, history rules, epoch coverage, determinism and exact resume."""
import numpy as np
import pytest

from data import Batches, DataError, load, user_history
from data.assemble import RawLog, assemble
from data.config import resolve_config


@pytest.fixture(scope="module")
def ds():
    return load({"source": "synthetic", "num_users": 300, "num_items": 200, "interactions_per_user": 15,
                 "num_clusters": 8})


def _user_lists(d):
    indptr, items = d.train_csr()
    return [items[indptr[u]:indptr[u + 1]].tolist() for u in range(d.num_users)]


@pytest.mark.parametrize("m, h", [(16, 5), (0, 0)])
def test_shapes_dtypes_and_gathers(ds, m, h):
    batch = next(Batches(ds, batch_size=32, num_negatives=m, history_len=h))
    assert batch["user"].shape == batch["item"].shape == (32,) and batch["user"].dtype == np.int32
    assert batch["neg_item"].shape == (m,) and batch["neg_item"].dtype == np.int32
    assert batch["history"].shape == (32, h) and batch["history"].dtype == np.int32
    assert batch["item_logq"].dtype == np.float32
    np.testing.assert_array_equal(batch["item_logq"], ds.item_log_prob()[batch["item"]])
    np.testing.assert_array_equal(batch["neg_item_logq"], ds.item_log_prob()[batch["neg_item"]])
    for key, side, rows in (("user_feat", ds.user_features, batch["user"]),
                            ("item_feat", ds.item_features, batch["item"]),
                            ("neg_item_feat", ds.item_features, batch["neg_item"])):
        assert set(batch[key]) == set(side)
        for name, values in side.items():
            np.testing.assert_array_equal(batch[key][name], values[rows])
    if m:
        assert 0 <= batch["neg_item"].min() and batch["neg_item"].max() < ds.num_items


def test_causal_history_is_the_items_just_before(ds):
    lists = _user_lists(ds)
    it = Batches(ds, batch_size=64, num_negatives=0, history_len=4, seed=3)
    for _ in range(5):
        batch = next(it)
        for user, item, hist in zip(batch["user"], batch["item"], batch["history"]):
            seq = lists[user]
            p = seq.index(item)  # (user, item) pairs are distinct in synthetic data
            expected = [x for x in seq[max(0, p - 4):p][::-1] if x != item]
            assert hist.tolist() == expected + [-1] * (4 - len(expected))


def test_sample_history_is_other_train_items_without_the_positive(ds):
    lists = _user_lists(ds)
    batch = next(Batches(ds, batch_size=256, num_negatives=0, history_len=6, history_mode="sample", seed=1))
    for user, item, hist in zip(batch["user"], batch["item"], batch["history"]):
        real = hist[hist >= 0].tolist()
        assert (hist[len(real):] == -1).all() and item not in real
        assert set(real) <= set(lists[user]) and len(set(real)) == len(real)
        assert len(real) == min(6, len(lists[user]) - 1)  # pairs are distinct in synthetic data


def test_repeated_item_is_removed_from_history():
    users = np.zeros(6, dtype=np.int64)
    items = np.array([5, 6, 5, 7, 5, 8])
    raw = RawLog("rep", users, items, np.arange(6))
    d = assemble(raw, resolve_config({"source": "synthetic", "test_fraction": 0.0}))
    for mode in ("causal", "sample"):
        batch = next(Batches(d, batch_size=6, num_negatives=0, history_len=5, history_mode=mode))
        for item, hist in zip(batch["item"], batch["history"]):
            assert item not in hist.tolist()
            real = hist[hist >= 0]
            assert (hist[real.size:] == -1).all()


def test_every_example_once_per_epoch_with_fixed_shapes(ds):
    n = len(ds.train)
    it = Batches(ds, batch_size=97, num_negatives=3, history_len=2, seed=5)
    assert it.examples_per_epoch == n
    pairs = []
    while len(pairs) < 2 * n:
        batch = next(it)
        assert batch["user"].shape == (97,)
        pairs += list(zip(batch["user"].tolist(), batch["item"].tolist()))
    train_pairs = sorted(zip(ds.train.user.tolist(), ds.train.item.tolist()))
    assert sorted(pairs[:n]) == train_pairs and sorted(pairs[n:2 * n]) == train_pairs
    assert pairs[:n] != pairs[n:2 * n]  # reshuffled each epoch


def _same(a, b):
    for key in a:
        if isinstance(a[key], dict):
            _same(a[key], b[key])
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("mode", ["causal", "sample"])
def test_restore_gives_identical_next_batches(ds, mode):
    kw = dict(batch_size=500, num_negatives=7, history_len=3, history_mode=mode, seed=11)
    it = Batches(ds, **kw)
    for _ in range(5):
        next(it)
    state = it.state()
    assert len(ds.train) < 15 * 500  # so the 10 batches below cross an epoch boundary
    expected = [next(it) for _ in range(10)]
    resumed = Batches(ds, **kw)
    resumed.restore(dict(state))
    for a, b in zip(expected, (next(resumed) for _ in range(10))):
        _same(a, b)
    other = next(Batches(ds, **{**kw, "seed": 12}))
    assert not np.array_equal(other["item"], next(Batches(ds, **kw))["item"])
    with pytest.raises(DataError, match="out of range"):
        resumed.restore({"epoch": 0, "position": 10**9})


def test_batch_larger_than_an_epoch(ds):
    small = load({"source": "synthetic", "num_users": 5, "num_items": 30, "interactions_per_user": 4,
                  "num_clusters": 2})
    it = Batches(small, batch_size=3 * len(small.train) + 1, num_negatives=1, history_len=1)
    batch = next(it)
    assert batch["user"].shape == (3 * len(small.train) + 1,) and it.state()["epoch"] == 3


def test_user_history_is_latest_train_items(ds):
    lists = _user_lists(ds)
    users = np.array([0, 5, 17])
    hist = user_history(ds, users, 20)
    assert hist.shape == (3, 20) and hist.dtype == np.int32
    for u, row in zip(users, hist):
        expected = lists[u][::-1][:20]
        assert row.tolist() == expected + [-1] * (20 - len(expected))
    assert user_history(ds, users, 0).shape == (3, 0)


def test_cold_items_are_never_drawn_as_negatives():
    cold_ds = load({"source": "synthetic", "num_users": 300, "num_items": 200, "interactions_per_user": 15,
                    "seed": 3, "cold_item_fraction": 0.2})
    cold = set(cold_ds.cold_items.tolist())
    assert len(cold) == 40
    b = Batches(cold_ds, batch_size=64, num_negatives=256, history_len=0)
    assert b.num_negative_candidates == 160
    drawn = np.concatenate([b.next_batch()["neg_item"] for _ in range(20)])
    assert not cold & set(drawn.tolist())
    assert len(set(drawn.tolist())) > 150  # still uniform over every warm item
