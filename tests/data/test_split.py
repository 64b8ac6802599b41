"""Split rules, filters and row accounting on hand-made logs."""
import numpy as np
import pytest

from data.assemble import RawLog, assemble
from data.config import resolve_config
from data.errors import DataError
from data.load import load
from data.split import canonical_order, hold_out_items, pick_cold_items, tail_counts

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


def test_cold_items_are_a_seeded_share_of_the_items_with_interactions():
    item = np.array([0, 0, 2, 3, 3, 5, 6, 7, 8, 9, 9, 9])  # 8 active items of 12; 1, 4, 10, 11 have none
    cold = pick_cold_items(item, 12, 0.3, seed=4)
    assert cold.dtype == np.int32 and cold.tolist() == sorted(set(cold.tolist())) and cold.size == 2  # floor(2.4)
    assert set(cold.tolist()) <= {0, 2, 3, 5, 6, 7, 8, 9}
    np.testing.assert_array_equal(cold, pick_cold_items(item, 12, 0.3, seed=4))
    assert len({tuple(pick_cold_items(item, 12, 0.3, seed=s)) for s in range(10)}) > 1
    assert pick_cold_items(item, 12, 0.01, seed=0).size == 1  # any positive share holds out at least one
    assert pick_cold_items(item, 12, 0.99, seed=0).size == 7  # and leaves at least one warm item
    assert pick_cold_items(item, 12, 0.0, seed=0).size == 0


def test_hold_out_items_moves_train_and_valid_rows_to_test_in_time_order():
    user = np.array([0, 0, 0, 0, 1, 1])
    item = np.array([5, 6, 5, 7, 6, 6])
    ts = np.array([1, 2, 3, 4, 1, 9])
    train, valid, test, moved = hold_out_items(user, item, ts, np.array([0, 1, 4]), np.array([2]),
                                               np.array([3, 5]), np.array([5]))
    assert (train.tolist(), valid.tolist(), moved) == ([1, 4], [], 2)
    assert test.tolist() == [0, 2, 3, 5]  # user 0 at t=1, 3, 4, then user 1


def test_cold_item_split_holds_items_out_of_training_and_keeps_the_books():
    kw = dict(source="synthetic", num_users=300, num_items=200, interactions_per_user=8, num_clusters=4,
              valid_fraction=0.2)
    warm = load(kw)
    ds = load({**kw, "cold_item_fraction": 0.25, "cold_item_seed": 1})
    cold = ds.cold_items
    active = np.unique(np.concatenate([warm.train.item, warm.valid.item, warm.test.item]))
    assert cold.size == int(0.25 * active.size) and np.isin(cold, active).all()
    assert not np.isin(ds.train.item, cold).any() and not np.isin(ds.valid.item, cold).any()
    assert ds.item_counts()[cold].sum() == 0 and ds.num_items == warm.num_items  # vocabulary keeps them
    moved = np.isin(warm.train.item, cold).sum() + np.isin(warm.valid.item, cold).sum()
    assert ds.stats["cold_item_rows_moved_to_test"] == moved > 0
    assert ds.stats["cold_item_test_rows"] == moved + np.isin(warm.test.item, cold).sum() == \
        np.isin(ds.test.item, cold).sum()
    assert len(ds.train) + len(ds.valid) + len(ds.test) == ds.stats["rows_read"] == len(warm.train) + \
        len(warm.valid) + len(warm.test)
    # The rest is the split without cold items, less the cold rows; test stays in (user, time) order.
    for split in ("train", "valid", "test"):
        got, want = getattr(ds, split), getattr(warm, split)
        np.testing.assert_array_equal(got.item[~np.isin(got.item, cold)], want.item[~np.isin(want.item, cold)])
    key = ds.test.user.astype(np.int64) * (1 << 40) + ds.test.timestamp
    assert (np.diff(key) >= 0).all()
    assert warm.cold_items.size == 0 and "cold_items" not in warm.stats


def test_a_cold_item_in_train_is_rejected_and_the_fraction_is_range_checked():
    ds = _load(test_fraction=0.4, cold_item_fraction=0.2)
    assert ds.stats["cold_items"] == 1
    with pytest.raises(DataError, match="cold items must be held out"):
        ds.replace(cold_items=np.unique(ds.train.item)[:1].astype(np.int32)).validate()
    with pytest.raises(DataError, match=r"data\.cold_item_fraction=1\.0: must be in \[0, 1\)"):
        _load(cold_item_fraction=1.0)


def _given_split_with_valid(seed: int, n_users: int = 40, n_train: int = 20, **extra):
    """A given split without timestamps (LightGCN-style): user u's train line lists items u*100 + 0..n_train-1
    in increasing order (ids, like file order, grow along the line), one test item each."""
    users = np.repeat(np.arange(n_users), n_train + 1)
    pos = np.tile(np.arange(n_train + 1), n_users)
    items = users * 100 + pos
    is_test = pos == n_train
    cfg = {"source": "lightgcn", "path": "x", "valid_fraction": 0.25, "split_seed": seed, **extra}
    return assemble(RawLog("g", users, items, None, is_test), resolve_config(cfg))


def _valid_positions(ds):
    """Per user, the positions (0 = first in file) of their validation items on their train line."""
    raw = ds.item_vocab.raw_ids
    out = {}
    for row in range(ds.num_users):
        user = ds.user_vocab.raw_ids[row]
        out[user] = sorted((raw[ds.valid.item[ds.valid.user == row]] - user * 100).tolist())
    return out


def test_given_split_validation_is_a_seeded_random_share_not_the_file_tail():
    a, again, b = _given_split_with_valid(0), _given_split_with_valid(0), _given_split_with_valid(1)
    picks_a, picks_b = _valid_positions(a), _valid_positions(b)
    assert picks_a == _valid_positions(again)  # same seed, same slice
    assert picks_a != picks_b  # another seed, another slice
    assert all(len(p) == 5 for p in picks_a.values())  # floor(0.25 * 20) per user
    # Not the tail of the line: the chosen positions spread over the whole line (mean ~9.5 for a uniform
    # share; the tail 15..19 has mean 17), and the first half of the line is picked too.
    chosen = np.concatenate([np.array(p) for p in picks_a.values()])
    assert abs(chosen.mean() - 9.5) < 1.5
    assert (chosen < 10).mean() > 0.35
    # Train and valid partition each user's train line; train keeps its file order.
    indptr, train_items = a.train_csr()
    raw = a.item_vocab.raw_ids
    for row in range(a.num_users):
        line = raw[train_items[indptr[row]:indptr[row + 1]]]
        assert np.all(np.diff(line) > 0) and len(line) == 15
    assert a.stats["num_train"] + a.stats["num_valid"] == 40 * 20


def test_given_split_validation_keeps_a_train_item_for_every_user():
    ds = _given_split_with_valid(3, n_users=30, n_train=2, valid_fraction=0.9)
    assert np.bincount(ds.train.user, minlength=30).min() == 1
    assert np.bincount(ds.valid.user, minlength=30).min() == 1
    single = _given_split_with_valid(3, n_users=5, n_train=1, valid_fraction=0.5)
    assert single.valid is not None and len(single.valid) == 0  # one train item stays in train
