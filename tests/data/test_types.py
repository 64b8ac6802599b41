"""Vocab, Interactions and Dataset helpers."""
import numpy as np
import pytest

from data.errors import DataError
from data.types import Dataset, FeatureSpec, Interactions, Vocab


@pytest.mark.parametrize("raw", [np.array([10, 3, 7, 12]), np.array([5, 6, 7, 8]),
                                 np.array(["b", "a", "zz", "éclair"])])
def test_vocab_lookup_and_save_load_round_trip(tmp_path, raw):
    vocab = Vocab(raw)
    rows = vocab.lookup(raw[::-1])
    np.testing.assert_array_equal(rows, np.arange(len(raw))[::-1])
    assert rows.dtype == np.int32
    path = tmp_path / "vocab.npy"
    vocab.save(path)
    back = Vocab.load(path)
    np.testing.assert_array_equal(back.raw_ids, vocab.raw_ids)
    assert back.raw_ids.dtype == vocab.raw_ids.dtype
    np.testing.assert_array_equal(back.lookup(raw), np.arange(len(raw)))
    with open(path, "rb") as f:  # saved without pickle, so it loads with allow_pickle=False anywhere
        assert np.load(f, allow_pickle=False).dtype.kind in "iU"


def test_vocab_rejects_duplicates_and_reports_missing():
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(np.array([1, 2, 1]))
    with pytest.raises(DataError, match="duplicate"):
        Vocab(np.array(["x", "y", "x"]))
    vocab = Vocab(np.array([100, 5, 42]))
    with pytest.raises(DataError, match="not in the vocabulary.*7"):
        vocab.lookup(np.array([5, 7]))
    np.testing.assert_array_equal(vocab.lookup(np.array([[5, 7], [42, 100]]), missing="minus_one"),
                                  [[1, -1], [2, 0]])
    with pytest.raises(DataError, match="convert"):
        vocab.lookup(np.array(["5"]))


def test_vocab_dense_and_sorted_paths_agree():
    rng = np.random.default_rng(0)
    ids = np.arange(1000, 2000)
    dense, shuffled = Vocab(ids), Vocab(rng.permutation(ids))
    query = rng.integers(900, 2100, 500)
    a = dense.lookup(query, missing="minus_one")
    b = shuffled.lookup(query, missing="minus_one")
    np.testing.assert_array_equal(a >= 0, b >= 0)
    np.testing.assert_array_equal(dense.raw_ids[a[a >= 0]], shuffled.raw_ids[b[b >= 0]])


def test_interactions_checks_lengths_and_fills_time():
    inter = Interactions(np.array([0, 1]), np.array([2, 3]))
    assert len(inter) == 2 and inter.timestamp.dtype == np.int64 and not inter.timestamp.any()
    with pytest.raises(DataError, match="one length"):
        Interactions(np.array([0, 1]), np.array([2]))


def _tiny_dataset():
    # user 0: items 2 (t=5), 0 (t=1) -> time order 0, 2; user 2: item 1; item 3 never trained.
    train = Interactions(np.array([0, 2, 0]), np.array([2, 1, 0]), np.array([5, 3, 1]))
    test = Interactions(np.array([1]), np.array([3]), np.array([9]))
    return Dataset("tiny", train, test, None, Vocab(np.arange(3)), Vocab(np.arange(4)), {}, {}, [], [], {})


def test_item_counts_log_prob_and_csr():
    ds = _tiny_dataset()
    np.testing.assert_array_equal(ds.item_counts(), [1, 1, 1, 0])
    logp = ds.item_log_prob()
    assert logp.dtype == np.float32 and np.isfinite(logp).all()
    np.testing.assert_allclose(logp, np.log([1 / 3] * 4), rtol=1e-6)  # unseen item floored at count 1
    indptr, items = ds.train_csr()
    np.testing.assert_array_equal(indptr, [0, 2, 2, 3])
    np.testing.assert_array_equal(items, [0, 2, 1])  # user 0's items in time order
    indptr, items = ds.test_csr()
    np.testing.assert_array_equal(indptr, [0, 0, 1, 1])
    with pytest.raises(DataError, match="valid"):
        ds.valid_csr()


def test_feature_spec_check():
    spec = FeatureSpec("tags", "multihot", 5, 2)
    spec.check(np.array([[0, 4], [-1, -1]], dtype=np.int32), 2, "item")
    with pytest.raises(DataError, match="values must lie"):
        spec.check(np.array([[0, 5], [-1, -1]], dtype=np.int32), 2, "item")
    with pytest.raises(DataError, match="kind"):
        FeatureSpec("x", "embedding", 3)
