"""Split rules, filters and row accounting on hand-made logs."""
import numpy as np
import pytest

from data.assemble import RawLog, assemble
from data.config import resolve_config
from data.errors import DataError
from data.split import canonical_order, tail_counts

# user A: five items, three tied at t=2; B: one item; C: two; D: three, all at t=0.
USERS = ["A"] * 5 + ["B"] + ["C"] * 2 + ["D"] * 3
ITEMS = [10, 11, 12, 13, 14, 10, 11, 12, 13, 14, 15]
TIMES = [1, 2, 2, 2, 3, 7, 5, 4, 0, 0, 0]


def _load(**cfg):
    raw = RawLog("tiny", np.array(USERS), np.array(ITEMS), np.array(TIMES))
    return assemble(raw, resolve_config({"source": "parquet", "path": "unused", **cfg}))


def _items_of(ds, split, user):
    inter = getattr(ds, split)
    row = ds.user_vocab.lookup(np.array([user]))[0]
    return ds.item_vocab.raw_ids[inter.item[inter.user == row]].tolist()


def test_tail_counts_rule():
    n = np.array([0, 1, 2, 3, 5, 10, 100])
    np.testing.assert_array_equal(tail_counts(n, 0.2), [0, 0, 1, 1, 1, 2, 20])
    np.testing.assert_array_equal(tail_counts(n, 0.5), [0, 0, 1, 1, 2, 5, 50])
    np.testing.assert_array_equal(tail_counts(np.array([100]), 0.29), [29])  # not 28 from 28.999999999999996
    np.testing.assert_array_equal(tail_counts(np.array([4, 4]), 0.99), [3, 3])  # at least one train item left
    assert not tail_counts(n, 0.0).any()


def test_temporal_split_counts_and_latest_items_are_test():
    ds = _load(test_fraction=0.4, split_seed=3)
    assert (len(ds.train), len(ds.test)) == (7, 4)
    test_a = _items_of(ds, "test", "A")
    assert 14 in test_a and len(test_a) == 2 and set(test_a) - {14} <= {11, 12, 13}
    assert _items_of(ds, "test", "B") == [] and _items_of(ds, "train", "B") == [10]
    assert _items_of(ds, "test", "C") == [11]  # t=5 is later than t=4
    assert len(_items_of(ds, "test", "D")) == 1
    # Train rows of a user come before (in time) its test rows.
    for user in "ACD":
        row = ds.user_vocab.lookup(np.array([user]))[0]
        assert ds.train.timestamp[ds.train.user == row].max() <= ds.test.timestamp[ds.test.user == row].min()
    assert ds.stats["num_train"] + ds.stats["num_test"] == ds.stats["rows_read"] == 11


def test_tie_break_is_seeded_and_deterministic():
    picks = {seed: _items_of(_load(test_fraction=0.4, split_seed=seed), "test", "A") for seed in range(12)}
    assert picks[5] == _items_of(_load(test_fraction=0.4, split_seed=5), "test", "A")
    assert len({tuple(sorted(p)) for p in picks.values()}) > 1  # different seeds pick different tied items
    order_a = canonical_order(np.zeros(6, np.int32), np.zeros(6, np.int64), tie_seed=1)
    order_b = canonical_order(np.zeros(6, np.int32), np.zeros(6, np.int64), tie_seed=1)
    np.testing.assert_array_equal(order_a, order_b)


def test_validation_is_carved_from_train_tail():
    users = np.repeat(["u"], 10)
    raw = RawLog("v", users, np.arange(10), np.arange(10) * 10)
    ds = assemble(raw, resolve_config({"source": "synthetic", "test_fraction": 0.2, "valid_fraction": 0.5}))
    assert ds.item_vocab.raw_ids[ds.test.item].tolist() == [8, 9]
    assert ds.item_vocab.raw_ids[ds.valid.item].tolist() == [4, 5, 6, 7]
    assert ds.item_vocab.raw_ids[ds.train.item].tolist() == [0, 1, 2, 3]
    assert ds.stats["num_valid"] == 4
    indptr, items = ds.valid_csr()
    assert indptr.tolist() == [0, 4]


def test_min_user_interactions_filters_and_counts():
    ds = _load(test_fraction=0.4, min_user_interactions=3)
    assert sorted(ds.user_vocab.raw_ids.tolist()) == ["A", "D"]
    assert ds.stats["filtered"] == {"min_user_interactions": 3}
    assert ds.stats["users_filtered_min_interactions"] == 2
    assert sum(ds.stats["filtered"].values()) + len(ds.train) + len(ds.test) == ds.stats["rows_read"]
    with pytest.raises(DataError, match="every interaction was filtered"):
        _load(min_user_interactions=50)


def test_duplicates_kept_by_default_and_dropped_on_request():
    users = np.array([1, 1, 1, 2, 2])
    items = np.array([7, 7, 8, 7, 7])
    times = np.array([3, 1, 2, 5, 5])
    cfg = {"source": "synthetic", "test_fraction": 0.0}
    ds = assemble(RawLog("d", users, items, times), resolve_config(cfg))
    assert ds.stats["duplicate_rows"] == 2 and len(ds.train) == 5
    ds = assemble(RawLog("d", users, items, times), resolve_config({**cfg, "drop_duplicates": True}))
    assert ds.stats["filtered"]["duplicates"] == 2 and len(ds.train) == 3
    row = ds.user_vocab.lookup(np.array([1]))[0]
    kept = ds.train.timestamp[(ds.train.user == row) & (ds.item_vocab.raw_ids[ds.train.item] == 7)]
    assert kept.tolist() == [1]  # the earliest repeat survives


def test_given_split_keeps_file_order_for_ties():
    users = np.array([0, 0, 0, 0, 1])
    items = np.array([3, 1, 2, 0, 4])
    is_test = np.array([False, False, False, True, True])
    ds = assemble(RawLog("g", users, items, None, is_test), resolve_config({"source": "lightgcn", "path": "x"}))
    assert ds.stats["split"] == "given"
    indptr, train_items = ds.train_csr()
    assert ds.item_vocab.raw_ids[train_items[indptr[0]:indptr[1]]].tolist() == [3, 1, 2]
    assert ds.item_vocab.raw_ids[ds.test.item].tolist() == [0, 4]
    with pytest.raises(DataError, match="no test split"):
        assemble(RawLog("g", users, items), resolve_config({"source": "synthetic", "split": "given"}))
