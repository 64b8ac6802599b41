"""EASE against an independent numpy reference (one ridge regression per item), and its blocked top-k."""
import numpy as np
import pytest

from eval.ease import (_ease_in_place, ease_from_gram, ease_topk, ease_weights, gram_matrix, interaction_matrix,
                       topk_rows)


def _random_csr(rng, users: int, items: int, max_len: int):
    lengths = rng.integers(0, max_len + 1, users)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return indptr, rng.integers(0, items, indptr[-1]).astype(np.int32)


def _ridge_reference(x: np.ndarray, lam: float) -> np.ndarray:
    """EASE's objective solved column by column: item j regressed on every other item (B_jj = 0 by design)."""
    n = x.shape[1]
    b = np.zeros((n, n))
    for j in range(n):
        others = [i for i in range(n) if i != j]
        xo = x[:, others]
        b[others, j] = np.linalg.solve(xo.T @ xo + lam * np.eye(n - 1), xo.T @ x[:, j])
    return b


def test_closed_form_matches_per_item_ridge_regression():
    rng = np.random.default_rng(0)
    indptr, items = _random_csr(rng, users=12, items=6, max_len=4)
    dense = np.zeros((12, 6))
    dense[np.repeat(np.arange(12), np.diff(indptr)), items] = 1.0  # repeated pairs count once
    got = ease_weights(indptr, items, 6, lam=3.0)
    assert got.dtype == np.float32 and np.all(np.diag(got) == 0)
    np.testing.assert_allclose(got, _ridge_reference(dense, 3.0), atol=1e-6)
    lean = ease_from_gram(gram_matrix(indptr, items, 6), 3.0, in_place=True)
    assert lean.dtype == np.float32 and np.all(np.diag(lean) == 0)
    np.testing.assert_allclose(lean, _ridge_reference(dense, 3.0), atol=1e-5)


def test_in_place_float32_fit_matches_the_float64_inverse_and_its_rankings():
    """The large-catalogue path (float32 Cholesky in one array, mirrored by row blocks that do not divide N)."""
    rng = np.random.default_rng(3)
    indptr, items = _random_csr(rng, users=400, items=301, max_len=30)
    gram = gram_matrix(indptr, items, 301)
    ref = ease_from_gram(gram, 20.0, in_place=False)
    lean = ease_from_gram(gram, 20.0, in_place=True)
    blocked = _ease_in_place(gram, 20.0, block=64)
    assert np.array_equal(lean, blocked)
    np.testing.assert_allclose(lean, ref, atol=1e-5 * np.abs(ref).max())
    users = np.arange(400)
    assert np.mean(ease_topk(lean, indptr, items, users, 10) == ease_topk(ref, indptr, items, users, 10)) > 0.99


def test_in_place_fit_reports_a_gram_matrix_that_is_not_positive_definite():
    gram = np.array([[1.0, 3.0], [3.0, 1.0]])      # eigenvalues 4 and -2: lam=1 leaves it indefinite
    with pytest.raises(np.linalg.LinAlgError, match="raise baselines.ease_lambda"):
        ease_from_gram(gram, 1.0, in_place=True)


def test_interaction_matrix_is_binary_and_selects_rows():
    indptr = np.array([0, 3, 3, 5])
    items = np.array([1, 1, 2, 0, 2], np.int32)
    x = interaction_matrix(indptr, items, 3, users=np.array([2, 0]))
    assert x.toarray().tolist() == [[1, 0, 1], [0, 1, 1]]


def test_topk_rows_breaks_ties_by_smaller_id_and_pads_excluded():
    scores = np.array([[0.5, 2.0, 0.5, 0.5, -np.inf],
                       [1.0, 3.0, 2.0, 0.0, 5.0],
                       [-np.inf, 1.0, -np.inf, -np.inf, -np.inf]], np.float32)
    assert topk_rows(scores, 3).tolist() == [[1, 0, 2], [4, 1, 2], [1, -1, -1]]


def test_topk_rows_matches_a_stable_sort_on_random_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 4, (50, 30)).astype(np.float32)  # few values: many ties at the boundary
    scores[rng.random(scores.shape) < 0.2] = -np.inf
    for k in (1, 5, 30):
        ref = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ref = np.where(np.isfinite(np.take_along_axis(scores, ref, axis=1)), ref, -1)
        assert np.array_equal(topk_rows(scores, k), ref)


def test_ease_topk_ranks_x_times_b_without_training_items():
    rng = np.random.default_rng(2)
    indptr, items = _random_csr(rng, users=40, items=25, max_len=8)
    b = ease_weights(indptr, items, 25, lam=5.0)
    users = np.array([3, 0, 17, 39, 3, 12])
    got = ease_topk(b, indptr, items, users, 10, user_block=4)  # blocks of 4: a partial last block
    for row, u in enumerate(users):
        seen = set(items[indptr[u]:indptr[u + 1]].tolist())
        x = np.zeros(25, np.float32)
        x[list(seen)] = 1.0
        scores = x @ b
        ranked = [i for i in np.argsort(-scores, kind="stable") if i not in seen][:10]
        assert got[row].tolist() == ranked + [-1] * (10 - len(ranked))


def test_ease_rejects_bad_arguments():
    indptr, items = np.array([0, 1]), np.array([0], np.int32)
    with pytest.raises(ValueError, match="lam > 0"):
        ease_weights(indptr, items, 2, lam=0.0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, N=2\]"):
        ease_topk(np.zeros((2, 2), np.float32), indptr, items, [0], 3)
