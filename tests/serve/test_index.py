"""Top-k backends: BruteForce against a numpy argsort reference, ScaNN recall against exact search, exclusions,
upsert/delete semantics, save/load round trips, errors, and concurrent searches during mutations."""
import threading

import numpy as np
import pytest

from serve.index import BruteForce, UnknownIdError
from serve.indexes import make_index
from serve.scann_index import ScaNNIndex


def clustered(n: int, d: int, rng, clusters: int = 50) -> np.ndarray:
    """Unit vectors around random centres: the shape of trained item embeddings."""
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def reference_topk(queries, items, ids, k, exclude=None):
    """numpy: full scores, excluded items at -inf, stable argsort; pads like the index does."""
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    for r, ex in enumerate(exclude or []):
        scores[r, np.isin(ids, np.asarray(ex))] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, axis=1)
    pad = "" if ids.dtype.kind == "U" else -1
    return top, np.where(top > -np.inf, ids[order], np.asarray(pad, ids.dtype))


def make_ids(n, kind, rng):
    raw = rng.permutation(10 * n)[:n]  # distinct, unordered, not equal to the row numbers
    return np.array([f"item-{v}" for v in raw]) if kind == "str" else raw.astype(np.int64) * 7 - 3


@pytest.fixture(scope="module")
def scann_30k():
    """A tree-AH ScaNN index over 30k clustered items (D=32) and queries drawn near the same centres."""
    rng = np.random.default_rng(0)
    both = clustered(30_200, 32, rng)
    items, queries = both[:30_000], both[30_000:]
    index = ScaNNIndex().index(items, np.arange(30_000) + 1_000_000)
    return index, items, queries


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (7, 7), (300, 1), (300, 17), (300, 300)])
@pytest.mark.parametrize("id_kind", ["int", "str"])
@pytest.mark.parametrize("with_exclusions", [False, True])
def test_brute_force_equals_numpy_argsort(n, k, id_kind, with_exclusions):
    rng = np.random.default_rng(n * 31 + k)
    items, queries, ids = rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(5, 6)), make_ids(n, id_kind, rng)
    exclude = None
    if with_exclusions:  # some queries lose many items (then the tail pads), one id is not in the index
        exclude = [rng.choice(ids, size=rng.integers(0, n + 1), replace=False).tolist() for _ in range(5)]
        exclude[0] = exclude[0] + (["nope"] if id_kind == "str" else [-999_999])
    scores, got = BruteForce().index(items, ids).search(queries, k, exclude=exclude)
    want_scores, want = reference_topk(queries, items, ids, k, exclude)
    assert scores.shape == got.shape == (5, k) and scores.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_scann_recall_at_10_against_exact(scann_30k):
    index, items, queries = scann_30k
    assert not index.is_exact and index.num_leaves == round(np.sqrt(30_000))
    _, got = index.search(queries, 10)
    _, want = reference_topk(queries, items, index.ids(), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want.tolist())])
    assert recall >= 0.95, recall


def test_scann_exclusions_widen_to_k_results(scann_30k):
    """Excluding each query's exact top 200 leaves far fewer than k candidates in the first ANN pass."""
    index, items, queries = scann_30k
    q = queries[:20]
    _, top200 = reference_topk(q, items, index.ids(), 200)
    exclude = [row.tolist() for row in top200]
    scores, got = index.search(q, 25, exclude=exclude)
    assert np.isfinite(scores).all() and (got >= 1_000_000).all()
    for row, ex in zip(got, exclude):
        assert len(set(row.tolist())) == 25 and not set(row.tolist()) & set(ex)
    _, want = reference_topk(q, items, index.ids(), 25, exclude)
    assert np.mean([len(set(a) & set(b)) / 25 for a, b in zip(got.tolist(), want.tolist())]) >= 0.9


def test_small_scann_index_is_exact_and_equals_brute_force():
    rng = np.random.default_rng(1)
    items, queries, ids = clustered(500, 8, rng), clustered(9, 8, rng), make_ids(500, "int", rng)
    small = make_index({"type": "scann"}).index(items, ids)
    assert small.is_exact and small.params()["mode"] == "brute_force"
    for a, b in zip(small.search(queries, 12), BruteForce().index(items, ids).search(queries, 12)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["brute_force", "scann_tree"])
def test_upsert_delete_and_save_load_round_trip(backend, tmp_path):
    rng = np.random.default_rng(2)
    items = clustered(3000, 16, rng)
    make = BruteForce if backend == "brute_force" else (lambda: ScaNNIndex(brute_force_below=100))
    ids = np.arange(3000)
    index = make().index(items, ids)
    items_before, ids_before = items.copy(), ids.copy()
    assert index.is_exact == (backend == "brute_force")
    # A new item with a large norm is every query's best match; an existing id takes a new vector.
    fresh = 5 * clustered(1, 16, rng)
    index.upsert(np.concatenate([fresh, items[:1]]), [5000, 7])
    assert len(index) == 3001
    np.testing.assert_array_equal(index.embeddings()[list(index.ids()).index(7)], items[0])
    assert index.search(fresh, 1)[1][0, 0] == 5000
    # Deleted ids never come back: not in searches over the whole corpus, not after more upserts, not after load.
    gone = [5000, 0, *range(100, 400)]
    index.delete(gone)
    index.upsert(clustered(50, 16, rng), np.arange(9000, 9050))
    assert len(index) == 3001 - len(gone) + 50
    queries = clustered(30, 16, rng)
    for idx in (index, _round_trip(index, tmp_path)):
        scores, got = idx.search(queries, len(idx))
        assert not set(got.ravel().tolist()) & set(gone)
        assert all(len(set(row)) == len(idx) for row in got.tolist())
    np.testing.assert_array_equal(items, items_before)  # the caller's arrays are never rewritten
    np.testing.assert_array_equal(ids, ids_before)
    loaded = _round_trip(index, tmp_path)
    assert loaded.params() == index.params() and type(loaded) is type(index)
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    np.testing.assert_array_equal(loaded.embeddings(), index.embeddings())
    (loaded_scores, loaded_ids), (scores, ids) = loaded.search(queries, 10), index.search(queries, 10)
    np.testing.assert_array_equal(loaded_ids, ids)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)  # ScaNN's SIMD sums may differ by an ulp
    assert (loaded.search(5 * items[200:201], 1)[1] != 200).all()
    if backend == "scann_tree":  # retraining on the current corpus keeps every id and drops none back in
        index.rebuild()
        assert not index.is_exact and len(index) == len(loaded)
        assert not set(index.search(queries, len(index))[1].ravel().tolist()) & set(gone)
    assert index.search(np.zeros((0, 16)), 3)[1].shape == (0, 3)


def _round_trip(index, tmp_path):
    directory = tmp_path / f"saved-{len(list(tmp_path.iterdir()))}"
    index.save(directory)
    assert not list(directory.rglob("*.pkl"))  # ids live in ids.npy, never in ScaNN's docid pickle
    return type(index).load(directory)


def test_string_ids_upsert_longer_ids_and_delete():
    rng = np.random.default_rng(3)
    items = clustered(40, 4, rng)
    index = BruteForce().index(items, [f"i{j}" for j in range(40)])
    index.upsert(10 * items[3:4], ["a-much-longer-item-id"])
    assert index.search(items[3:4], 1)[1][0, 0] == "a-much-longer-item-id"
    index.delete(["a-much-longer-item-id", "i3"])
    _, got = index.search(items[3:4], 38)
    assert "i3" not in got and "a-much-longer-item-id" not in got and got.dtype.kind == "U"


def test_errors_are_clear():
    rng = np.random.default_rng(4)
    index = BruteForce().index(rng.normal(size=(20, 4)), np.arange(20))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
        index.search(np.zeros((1, 4)), 0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 20\]"):
        index.search(np.zeros((1, 4)), 21)
    with pytest.raises(ValueError, match=r"\[n, 4\].*\(20, 4\).*got shape \(2, 5\)"):
        index.search(np.zeros((2, 5)), 3)
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        index.search(np.zeros(4), 3)
    with pytest.raises(ValueError, match="repeats ids"):
        BruteForce().index(np.zeros((3, 2)), [1, 2, 1])
    with pytest.raises(ValueError, match="3 ids but the embeddings have 2 rows"):
        BruteForce().index(np.zeros((2, 2)), [1, 2, 3])
    with pytest.raises(ValueError, match="NaN or inf"):
        BruteForce().index(np.array([[np.nan, 0.0]]), [1])
    with pytest.raises(ValueError, match=r"upsert embeddings must be a float array \[n, 4\]"):
        index.upsert(np.zeros((1, 3)), [99])
    with pytest.raises(TypeError, match="holds int ids"):
        index.upsert(np.zeros((1, 4)), ["x"])
    with pytest.raises(UnknownIdError, match=r"\[77, 78\]; nothing was deleted"):
        index.delete([3, 77, 78])
    assert len(index) == 20 and 3 in index.ids()
    with pytest.raises(ValueError, match="one id list per query"):
        index.search(np.zeros((2, 4)), 3, exclude=[[1]])
    with pytest.raises(ValueError, match="must be scann or brute_force"):
        make_index({"type": "faiss"})


def test_concurrent_searches_during_upserts_and_deletes():
    """Searches in threads never see a half-applied mutation: every result id is live at some point and
    every row has k distinct ids."""
    rng = np.random.default_rng(5)
    index = ScaNNIndex(brute_force_below=100).index(clustered(2000, 8, rng), np.arange(2000))
    queries, errors = clustered(16, 8, rng), []

    def searcher():
        try:
            for _ in range(30):
                _, got = index.search(queries, 20)
                assert all(len(set(row)) == 20 for row in got.tolist())
                assert ((got < 2000) | (got >= 10_000)).all() and not np.isin(got, np.arange(0, 2000, 2)[:100]).any()
        except Exception as e:  # noqa: BLE001 - reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    index.delete(np.arange(0, 200, 2))  # deleted before any search starts: must never show up
    for t in threads:
        t.start()
    for i in range(20):
        index.upsert(clustered(5, 8, rng), np.arange(10_000 + 5 * i, 10_005 + 5 * i))
        index.delete([10_000 + 5 * i])
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(index) == 2000 - 100 + 20 * 4
