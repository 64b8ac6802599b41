"""ScaNN search for evaluation: recall against exact top-k, exclusions, the overlap metric, and that the
searcher is the one the serving index builds."""
import numpy as np
import pytest

from eval.ann import ann_topk, build_index, overlap_at_k
from towers.inference.exact import exact_topk
from serve.scann_index import ScaNNIndex

pytest.importorskip("scann")


def _clustered(rng, n: int, dim: int, clusters: int) -> np.ndarray:
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _exclusions(rng, q: int, n: int, max_len: int):
    lengths = rng.integers(0, max_len + 1, q)
    lengths[0] = max_len * 4  # one heavy user: its own over-fetch group
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return indptr, rng.integers(0, n, indptr[-1]).astype(np.int32)


def test_tree_index_recall_against_exact_on_clustered_data():
    rng = np.random.default_rng(0)
    items, users = _clustered(rng, 20_000, 32, 100), _clustered(rng, 300, 32, 100)
    indptr, excluded = _exclusions(rng, 300, 20_000, 20)
    index = build_index(items, 10)
    assert index.params["mode"] == "tree_ah" and index.params["num_leaves"] == 141
    approx = ann_topk(index, users, 10, exclude_indptr=indptr, exclude_items=excluded)
    _, exact = exact_topk(users, items, 10, exclude_indptr=indptr, exclude_items=excluded)
    assert overlap_at_k(approx, exact, [10])["overlap@10"] >= 0.9
    for row in range(300):  # excluded items never come back, and no row is cut short
        assert not set(approx[row].tolist()) & set(excluded[indptr[row]:indptr[row + 1]].tolist())
    assert (approx >= 0).all()


def test_brute_force_below_the_threshold_equals_exact_search_with_exclusions():
    rng = np.random.default_rng(1)
    items, users = rng.normal(size=(500, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    indptr, excluded = _exclusions(rng, 40, 500, 30)
    index = build_index(items, 20)
    assert index.params == {"mode": "brute_force"}
    approx = ann_topk(index, users, 20, exclude_indptr=indptr, exclude_items=excluded)
    _, exact = exact_topk(users, items, 20, exclude_indptr=indptr, exclude_items=excluded)
    assert np.array_equal(approx, exact)


def test_rows_with_too_few_eligible_items_are_padded():
    items = np.eye(4, dtype=np.float32)
    approx = ann_topk(build_index(items, 3), np.ones((1, 4), np.float32), 3,
                      exclude_indptr=np.array([0, 2]), exclude_items=np.array([0, 2], np.int32))
    assert approx.tolist() == [[1, 3, -1]]


def test_users_short_of_candidates_in_the_probed_leaves_get_full_rows_without_fake_item_0():
    rng = np.random.default_rng(2)
    items = _clustered(rng, 3000, 8, 30)
    # One of 300 leaves (about 10 items) probed per query: far fewer than the 50 asked for. ScaNN pads such a
    # result with id 0 and NaN scores; the search widens instead (as serving does), so every row is full.
    index = build_index(items, 50, brute_force_below=1000, num_leaves=300, num_leaves_to_search=1)
    approx = ann_topk(index, items[:20], 50)
    assert index.params["mode"] == "tree_ah"
    _, exact = exact_topk(items[:20], items, 50)
    # Widened until 50 candidates are found (16 of 300 leaves here): approximate, but far from empty (~0.87).
    assert overlap_at_k(approx, exact, [50])["overlap@50"] >= 0.75
    for row, want in zip(approx, exact):
        assert (row >= 0).all() and len(set(row.tolist())) == row.size
        assert 0 not in row or 0 in want   # item 0 only where it really ranks, never as padding


def test_eval_builds_the_index_serving_builds_for_the_same_corpus():
    rng = np.random.default_rng(3)
    items = _clustered(rng, 3000, 8, 30)
    # (settings, expected tree): round(sqrt(3000)) = 55 leaves, ceil(55 / 10) = 6 searched; None = exact.
    cases = [({"brute_force_below": 1000}, (55, 6)), ({"brute_force_below": 1000, "num_leaves": 40}, (40, 4)),
             ({"brute_force_below": 5000}, None)]
    for kw, tree in cases:
        served = ScaNNIndex(**kw).index(items, np.arange(3000))
        params = build_index(items, 10, **kw).params
        assert params["mode"] == served.params()["mode"] == ("brute_force" if tree is None else "tree_ah"), kw
        if tree is not None:
            assert (params["num_leaves"], params["num_leaves_to_search"]) == tree
            assert (served.num_leaves, served.num_leaves_to_search) == tree
    with pytest.raises(ValueError, match=r"ann: num_leaves=100 must be smaller than the 100 items.*brute_force"):
        build_index(items[:100], 10, brute_force_below=10, num_leaves=100)
    with pytest.raises(ValueError, match="num_leaves=100 must be smaller than the 100 items"):
        ScaNNIndex(brute_force_below=10, num_leaves=100).index(items[:100], np.arange(100))


def test_overlap_at_k_by_hand():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    approx = np.array([[2, 9, 1, 4], [6, 7, -1, -1], [3, -1, -1, -1]])
    # k=2: row 0 {2,9} vs {1,2}: 1/2; row 1 {6,7} vs {5,6}: 1/2; row 2 has no exact items and is skipped.
    # k=4: row 0 finds 2, 1, 4 of 4: 3/4; row 1 finds 6 of its 2 real items: 1/2.
    assert overlap_at_k(approx, exact, [2, 4]) == {"overlap@2": 0.5, "overlap@4": 0.625}
