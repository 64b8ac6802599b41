"""exact_topk against a numpy argsort reference: blocking, padding, exclusions, ties and errors."""

import numpy as np
import pytest

from towers.inference import exact as topk
from towers.inference.exact import exact_topk


def reference_topk(user_emb, item_emb, k, indptr=None, items=None, users=None):
    """Full score matrix in float64, excluded items removed, sorted by (-score, item id)."""
    scores = user_emb.astype(np.float64) @ item_emb.astype(np.float64).T
    num_users, num_items = scores.shape
    out_scores = np.full((num_users, k), -np.inf)
    out_ids = np.full((num_users, k), -1, np.int64)
    for i in range(num_users):
        row = scores[i].copy()
        if indptr is not None:
            r = i if users is None else users[i]
            row[items[indptr[r]:indptr[r + 1]]] = -np.inf
        order = np.lexsort((np.arange(num_items), -row))[:k]
        order = order[np.isfinite(row[order])]
        out_ids[i, :order.size] = order
        out_scores[i, :order.size] = row[order]
    return out_scores, out_ids


def random_csr(rng, num_rows, num_items, max_len):
    lengths = rng.integers(0, max_len + 1, num_rows)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([rng.choice(num_items, n, replace=False) for n in lengths]).astype(np.int32)
    return indptr, items


def int_embeddings(rng, num, dim):
    # Small integers: every score is an exact float32 integer, so ties are frequent and comparisons exact.
    return rng.integers(-2, 3, (num, dim)).astype(np.float32)


# Q, N, k, user_block, item_block. Blocks are tiny so small data crosses many block and tile boundaries:
# Q and N that are not multiples of the blocks, a single tile, k wider than a tile, and tiles wide enough
# for the two-stage (grouped) selection.
GRID = [
    (1, 7, 3, 8, 16),
    (37, 203, 5, 8, 16),       # 13 tiles, last one padded
    (37, 203, 40, 8, 16),      # k wider than a tile
    (19, 500, 3, 8, 256),      # grouped selection inside 2 tiles
    (64, 1000, 7, 16, 1000),   # grouped selection, one tile, padded columns
    (5, 50, 50, 4, 16),        # k = N
]


@pytest.mark.parametrize("q,n,k,user_block,item_block", GRID)
def test_matches_reference_with_ties_and_exclusions(q, n, k, user_block, item_block):
    rng = np.random.default_rng(q * 1000 + n + k)
    user_emb, item_emb = int_embeddings(rng, q, 3), int_embeddings(rng, n, 3)
    indptr, items = random_csr(rng, q, n, max_len=n // 3)
    scores, ids = exact_topk(user_emb, item_emb, k, exclude_indptr=indptr, exclude_items=items,
                             user_block=user_block, item_block=item_block)
    ref_scores, ref_ids = reference_topk(user_emb, item_emb, k, indptr, items)
    assert scores.dtype == np.float32 and ids.dtype == np.int32
    assert scores.shape == ids.shape == (q, k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_grid_exercises_grouped_selection():
    # Guards the grid above: its wide-tile cases must take the two-stage path, or ties there go untested.
    for q, n, k, user_block, item_block in GRID[3:5]:
        assert topk._group_size(topk._tile_width(n, item_block), k) >= 4


def test_all_scores_tied_gives_smallest_ids_first():
    # Zero user embeddings tie every item: the answer is the smallest eligible ids, across tiles and groups.
    n, k = 700, 9
    item_emb = np.random.default_rng(1).normal(size=(n, 4)).astype(np.float32)
    indptr, items = np.array([0, 0, 3]), np.array([0, 2, 5], np.int32)
    for item_block in (64, 1024):
        scores, ids = exact_topk(np.zeros((2, 4), np.float32), item_emb, k, exclude_indptr=indptr,
                                 exclude_items=items, user_block=8, item_block=item_block)
        assert ids.tolist() == [list(range(9)), [1, 3, 4, 6, 7, 8, 9, 10, 11]]
        assert (scores == 0).all()


@pytest.mark.parametrize("n,item_block", [(200, 64), (201, 64), (203, 16), (1000, 1024)])
def test_padded_item_columns_never_win(n, item_block):
    # Every real score is negative and the best items are the last ids, right next to the zero-padded columns
    # (score 0) of the last tile: whole groups of padding (n=200), a group half real and half padding (201, 1000),
    # and the plain top_k path (203).
    item_emb = (np.arange(n, dtype=np.float32) - 1000)[:, None]
    scores, ids = exact_topk(np.ones((1, 1), np.float32), item_emb, 3, user_block=8, item_block=item_block)
    assert ids.tolist() == [[n - 1, n - 2, n - 3]]
    assert scores.tolist() == [[n - 1001.0, n - 1002.0, n - 1003.0]]


def test_float_embeddings_match_reference_scores():
    rng = np.random.default_rng(7)
    user_emb = rng.normal(size=(45, 16)).astype(np.float32)
    item_emb = rng.normal(size=(333, 16)).astype(np.float32)
    indptr, items = random_csr(rng, 45, 333, max_len=30)
    scores, ids = exact_topk(user_emb, item_emb, 20, exclude_indptr=indptr, exclude_items=items,
                             user_block=16, item_block=128)
    ref_scores, ref_ids = reference_topk(user_emb, item_emb, 20, indptr, items)
    # float32 rounding may swap near-equal neighbours, so compare scores, and re-score the returned ids.
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    rescored = np.einsum("qd,qkd->qk", user_emb.astype(np.float64), item_emb.astype(np.float64)[ids])
    np.testing.assert_allclose(scores, rescored, rtol=1e-5, atol=1e-5)
    assert np.mean(ids == ref_ids) > 0.99


@pytest.mark.parametrize("item_block", [8, 64])  # several tiles; one tile
def test_k_equal_n_pads_with_minus_one_and_neg_inf(item_block):
    rng = np.random.default_rng(3)
    n = 30
    indptr, items = np.array([0, 4, 4, 30]), np.array([1, 5, 9, 29] + list(range(26)), np.int32)
    scores, ids = exact_topk(rng.normal(size=(3, 4)), rng.normal(size=(n, 4)), n, exclude_indptr=indptr,
                             exclude_items=items, user_block=8, item_block=item_block)
    for row, eligible in enumerate([n - 4, n, 4]):
        assert (ids[row, :eligible] >= 0).all() and (ids[row, eligible:] == -1).all()
        assert np.isfinite(scores[row, :eligible]).all() and (scores[row, eligible:] == -np.inf).all()
        assert np.all(np.diff(scores[row, :eligible]) <= 0)
    assert set(ids[0, :26].tolist()) == set(range(n)) - {1, 5, 9, 29}
    assert sorted(ids[2, :4].tolist()) == [26, 27, 28, 29]


def test_users_select_rows_of_full_exclusion_csr():
    rng = np.random.default_rng(4)
    user_emb, item_emb = int_embeddings(rng, 6, 2), int_embeddings(rng, 40, 2)
    indptr, items = random_csr(rng, 10, 40, max_len=15)
    users = np.array([9, 0, 3, 3, 7, 1])
    scores, ids = exact_topk(user_emb, item_emb, 12, users=users, exclude_indptr=indptr, exclude_items=items,
                             user_block=8, item_block=16)
    ref_scores, ref_ids = reference_topk(user_emb, item_emb, 12, indptr, items, users)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_no_exclusions_and_default_blocks():
    rng = np.random.default_rng(5)
    user_emb, item_emb = int_embeddings(rng, 11, 3), int_embeddings(rng, 90, 3)
    scores, ids = exact_topk(user_emb, item_emb, 10)
    ref_scores, ref_ids = reference_topk(user_emb, item_emb, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


@pytest.mark.parametrize("user_shape,item_shape,k,kwargs,match", [
    ((3,), (5, 3), 1, {}, r"user_emb \[Q, D\] and item_emb \[N, D\].*\(3,\) and \(5, 3\)"),
    ((2, 4), (5, 3), 1, {}, r"same D, got shapes \(2, 4\) and \(5, 3\)"),
    ((2, 3), (5, 3), 0, {}, r"k must be an int in \[1, N=5\].*got k=0"),
    ((2, 3), (5, 3), 6, {}, r"k must be an int in \[1, N=5\] \(item_emb shape \(5, 3\)\), got k=6"),
    ((2, 3), (5, 3), 2, {"exclude_indptr": np.array([0, 0, 0])}, "together"),
    ((2, 3), (5, 3), 2, {"exclude_indptr": np.array([0, 1, 1]), "exclude_items": np.array([5])},
     "column id 5 is out of range for 5 items"),
    ((2, 3), (5, 3), 2, {"exclude_indptr": np.array([0, 1]), "exclude_items": np.array([1])},
     "selects 1 rows but user_emb has 2 rows"),
    ((2, 3), (5, 3), 2, {"users": np.array([0, 1])}, "pass exclude_indptr/exclude_items too"),
    ((2, 3), (5, 3), 2, {"user_block": 0}, "must be >= 1"),
])
def test_errors(user_shape, item_shape, k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        exact_topk(np.ones(user_shape, np.float32), np.ones(item_shape, np.float32), k, **kwargs)


def test_non_finite_embeddings_rejected():
    item_emb = np.ones((5, 3), np.float32)
    item_emb[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"item_emb \(5, 3\) holds NaN or inf"):
        exact_topk(np.ones((2, 3), np.float32), item_emb, 2)
