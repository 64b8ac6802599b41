"""Training batches: shapes, history rules, epoch coverage, determinism and exact resume."""
import numpy as np
import pytest

from data import Batches, DataError, load, user_history
from data.batching import item_audience_mean
from data.assemble import RawLog, assemble
from data.config import resolve_config
from data.types import CONDITION
from tests.helpers import smoke_cfg


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


# ---------------------------------------------------------------- item audiences (item_history_len)
def _item_audiences(d):
    indptr, items = d.train_csr()
    out = [[] for _ in range(d.num_items)]
    for u in range(d.num_users):
        for i in items[indptr[u]:indptr[u + 1]]:
            out[i].append(u)
    return out


def test_audience_csr_inverts_the_user_csr(ds):
    indptr, users, slot = ds.item_audience_csr()
    auds = _item_audiences(ds)
    for i in range(ds.num_items):
        assert users[indptr[i]:indptr[i + 1]].tolist() == auds[i]
    # slot: train example e (user-CSR order) is that entry of its item's audience.
    u_indptr, items = ds.train_csr()
    owners = np.repeat(np.arange(ds.num_users), np.diff(u_indptr))
    np.testing.assert_array_equal(users[slot], owners)
    assert np.all((slot >= indptr[items]) & (slot < indptr[items + 1]))


def test_sampled_audiences_are_other_train_users_of_the_item(ds):
    auds = _item_audiences(ds)
    it = Batches(ds, batch_size=256, num_negatives=32, history_len=0, item_history_len=4, seed=3)
    for batch in (next(it), next(it)):
        assert batch["item_history"].shape == (256, 4) and batch["item_history"].dtype == np.int32
        assert batch["neg_item_history"].shape == (32, 4) and batch["neg_item_history"].dtype == np.int32
        for user, item, aud in zip(batch["user"], batch["item"], batch["item_history"]):
            real = aud[aud >= 0].tolist()
            assert (aud[len(real):] == -1).all() and user not in real and len(set(real)) == len(real)
            assert set(real) <= set(auds[item]) and len(real) == min(4, len(auds[item]) - 1)
        for item, aud in zip(batch["neg_item"], batch["neg_item_history"]):
            real = aud[aud >= 0].tolist()
            assert set(real) <= set(auds[item]) and len(real) == min(4, len(auds[item]))
    # Popular items' audiences differ from batch to batch (a sample, not a fixed prefix).
    top = int(np.argmax(ds.item_counts()))
    seen = {tuple(a) for b in (next(it) for _ in range(20)) for i, a in zip(b["neg_item"], b["neg_item_history"])
            if i == top}
    assert len(auds[top]) > 8 and len(seen) > 1
    # Off by default: the batch has no audience keys, so older runs resume on identical batches.
    assert "item_history" not in next(Batches(ds, batch_size=8, num_negatives=2, history_len=0))


def test_repeated_pair_leaves_the_user_out_of_the_audience():
    users = np.array([0, 0, 1, 2, 0])
    items = np.array([5, 5, 5, 5, 6])
    d = assemble(RawLog("rep", users, items, np.arange(5)), resolve_config({"source": "synthetic",
                                                                          "test_fraction": 0.0}))
    batch = next(Batches(d, batch_size=5, num_negatives=0, history_len=0, item_history_len=4))
    for user, aud in zip(batch["user"], batch["item_history"]):
        assert user not in aud.tolist()


def test_audience_sampling_resumes_exactly(ds):
    kw = dict(batch_size=500, num_negatives=7, history_len=3, history_mode="sample", seed=5, item_history_len=3)
    it = Batches(ds, **kw)
    next(it)
    state = it.state()
    expected = [next(it) for _ in range(3)]
    resumed = Batches(ds, **kw)
    resumed.restore(dict(state))
    for a, b in zip(expected, (next(resumed) for _ in range(3))):
        _same(a, b)
        np.testing.assert_array_equal(a["item_history"], b["item_history"])
        np.testing.assert_array_equal(a["neg_item_history"], b["neg_item_history"])


def test_item_audience_mean_is_the_mean_user_row(ds):
    table = np.random.default_rng(0).normal(size=(ds.num_users, 3)).astype(np.float32)
    means, has = item_audience_mean(ds, table)
    auds = _item_audiences(ds)
    for i in range(ds.num_items):
        assert has[i] == bool(auds[i])
        want = table[auds[i]].mean(axis=0) if auds[i] else np.zeros(3)
        np.testing.assert_allclose(means[i], want, rtol=1e-5, atol=1e-6)
    sub, sub_has = item_audience_mean(ds, table, np.array([3, -1, 0]))
    np.testing.assert_allclose(sub[[0, 2]], means[[3, 0]])
    assert not sub_has[1] and (sub[1] == 0).all()
    with pytest.raises(DataError, match="user table"):
        item_audience_mean(ds, table[:5])


# ---------------------------------------------------------------- per-row negatives (loss.negatives_per_row)
def test_row_negatives_are_each_rows_own_uniform_draws_and_leave_the_rest_unchanged():
    from train.input import prepare

    cold_ds = load({"source": "synthetic", "num_users": 300, "num_items": 200, "interactions_per_user": 15,
                    "seed": 3, "cold_item_fraction": 0.2})
    kw = dict(batch_size=64, num_negatives=16, history_len=3, seed=4)
    plain, with_rows = Batches(cold_ds, **kw).next_batch(), Batches(cold_ds, negatives_per_row=50, **kw).next_batch()
    for key, value in plain.items():  # drawn after everything else: the other arrays are the same
        for name, array in (value.items() if isinstance(value, dict) else [(None, value)]):
            np.testing.assert_array_equal(with_rows[key] if name is None else with_rows[key][name], array)
    rows = with_rows["row_neg_item"]
    assert rows.shape == (64, 50) and rows.dtype == np.int32
    assert not set(cold_ds.cold_items.tolist()) & set(rows.ravel().tolist())  # the same pool as the shared ones
    assert len({tuple(r) for r in rows}) == 64  # each row its own draws
    np.testing.assert_array_equal(with_rows["row_neg_item_logq"], cold_ds.item_log_prob()[rows])
    for name, values in cold_ds.item_features.items():
        np.testing.assert_array_equal(with_rows["row_neg_item_feat"][name], values[rows])
    # The step's de-duplicated item rows cover them: uniq[row_neg_idx] gives back their ids.
    local, shared = prepare(with_rows, use_user_table=True, use_item_table=True, use_history=True)
    np.testing.assert_array_equal(shared["item_uniq"][local["row_neg_idx"]], rows)
    np.testing.assert_array_equal(shared["item_uniq"][local["history_idx"]][with_rows["history"] >= 0],
                                  with_rows["history"][with_rows["history"] >= 0])
    np.testing.assert_array_equal(shared["item_uniq"][local["neg_idx"]], with_rows["neg_item"])


@pytest.mark.parametrize("span", [50, 10**9])
def test_unique_rows_equals_numpy_unique_for_dense_and_sparse_ids(span):
    from train.input import unique_rows

    rng = np.random.default_rng(span % 97)
    ids = rng.integers(-1, span, (40, 7)).astype(np.int64)  # -1 is padding
    uniq, valid, inverse = unique_rows(ids, ids.size)
    want = np.unique(ids[ids >= 0])
    np.testing.assert_array_equal(uniq[valid], want)
    np.testing.assert_array_equal(uniq[inverse][ids >= 0], ids[ids >= 0])
    assert not valid[len(want):].any() and (inverse[ids < 0] == 0).all()


def test_batches_carry_only_the_features_asked_for_and_nothing_else_changes():
    """The training loop asks for the side features its towers read: the other arrays are the same, and a
    conditional tower's feature is carried even when the item tower does not read it."""
    from train.loop import load_data, make_batches
    cfg = smoke_cfg("model.user.features=[]", "model.item.features=[quality]", "model.user.condition=tags")
    ds = load_data(cfg)
    every = Batches(ds, batch_size=16, num_negatives=8, history_len=5, seed=cfg.seed, condition="tags")
    some = make_batches(cfg, ds)
    assert set(ds.user_features) and set(ds.item_features) > {"quality", "tags"}
    a, b = every.batch_at(32), some.batch_at(32)
    assert set(b["user_feat"]) == {CONDITION} and set(b["item_feat"]) == set(b["neg_item_feat"]) == {"quality", "tags"}
    for key in ("user", "item", "neg_item", "history", "item_logq", "neg_item_logq"):
        np.testing.assert_array_equal(a[key], b[key])
    for key in ("item_feat", "neg_item_feat"):
        for name, values in b[key].items():
            np.testing.assert_array_equal(a[key][name], values)
    np.testing.assert_array_equal(a["user_feat"][CONDITION], b["user_feat"][CONDITION])


@pytest.mark.parametrize("rows", [(0, 64), (16, 32), (48, 64)])
def test_owners_equal_a_search_and_numpy_unique_of_the_share(rows):
    """`_owners` (one sort of the example ids) gives each example's user and the share's distinct users with
    their inverse exactly as a binary search of the unsorted ids and `np.unique` do."""
    from data.batching import _owners

    rng = np.random.default_rng(rows[0])
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 4, 200))]).astype(np.int64)  # some users empty
    ex = rng.choice(indptr[-1], 64, replace=False).astype(np.int64)
    user, uniq, inv = _owners(indptr, ex, rows)
    want_user = np.searchsorted(indptr, ex, side="right") - 1
    want_uniq, want_inv = np.unique(want_user[rows[0]:rows[1]], return_inverse=True)
    np.testing.assert_array_equal(user, want_user)
    np.testing.assert_array_equal(uniq, want_uniq)
    np.testing.assert_array_equal(inv, want_inv)
    assert (indptr[user] <= ex).all() and (ex < indptr[user + 1]).all()
