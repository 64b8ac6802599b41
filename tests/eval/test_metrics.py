"""Ranking metrics against hand-computed values and a per-user loop reference."""

import math

import numpy as np
import pytest

from eval import metrics


def disc(rank: int) -> float:
    """DCG discount at 1-based rank."""
    return 1.0 / math.log2(rank + 1)


def csr(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(rows) + 1, np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    items = np.array([i for r in rows for i in r], np.int32)
    return indptr, items


# name, ranked row, held-out items, k, recall, ndcg, hitrate, mrr, precision
SINGLE_USER_CASES = [
    ("hit_at_rank_2", [5, 3, 9], [3], 3, 1.0, disc(2), 1.0, 1 / 2, 1 / 3),
    # Fewer held-out items than k: recall divides by |H| = 1 (not k), IDCG covers one rank only.
    ("fewer_heldout_than_k", [1, 2, 3, 4], [2], 4, 1.0, disc(2), 1.0, 1 / 2, 1 / 4),
    ("more_heldout_than_k", [5, 3, 9], [3, 9, 11, 12], 2, 1 / 4, disc(2) / (disc(1) + disc(2)), 1.0, 1 / 2, 1 / 2),
    ("hit_just_past_k", [5, 3, 9], [9], 2, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("all_hits", [7, 8, 9], [9, 8, 7], 3, 1.0, 1.0, 1.0, 1.0, 1.0),
    ("padding_never_hits", [-1, 4, -1, 6], [4, 6, 0], 4, 2 / 3,
     (disc(2) + disc(4)) / (disc(1) + disc(2) + disc(3)), 1.0, 1 / 2, 1 / 2),
    ("no_hit", [1, 2, 3], [4, 5], 3, 0.0, 0.0, 0.0, 0.0, 0.0),
    ("duplicate_heldout_counted_once", [1, 2], [2, 2, 3], 2, 1 / 2, disc(2) / (disc(1) + disc(2)), 1.0, 1 / 2, 1 / 2),
    ("first_and_last", [4, 0, 1, 5], [4, 5], 4, 1.0, (disc(1) + disc(4)) / (disc(1) + disc(2)), 1.0, 1.0, 1 / 2),
    ("k_1_miss_then_hit", [0, 1], [1], 1, 0.0, 0.0, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("name,ranked,held,k,recall,ndcg,hitrate,mrr,precision", SINGLE_USER_CASES,
                         ids=[c[0] for c in SINGLE_USER_CASES])
def test_single_user_hand_computed(name, ranked, held, k, recall, ndcg, hitrate, mrr, precision):
    retrieved = np.array([ranked], np.int32)
    indptr, items = csr([held])
    expected = {"recall": recall, "ndcg": ndcg, "hitrate": hitrate, "mrr": mrr, "precision": precision}
    funcs = {"recall": metrics.recall_at_k, "ndcg": metrics.ndcg_at_k, "hitrate": metrics.hit_rate_at_k,
             "mrr": metrics.mrr_at_k, "precision": metrics.precision_at_k}
    for metric, fn in funcs.items():
        got = fn(retrieved, indptr, items, [k])
        assert set(got) == {k}
        np.testing.assert_allclose(got[k], [expected[metric]], rtol=1e-12, err_msg=metric)
    table = metrics.per_user_metrics(retrieved, indptr, items, k)
    for metric, value in expected.items():
        np.testing.assert_allclose(table[f"{metric}@{k}"], [value], rtol=1e-12, err_msg=metric)


# Four users, K = 4: user 2 has no held-out item and is left out of the means.
RETRIEVED = np.array([[3, 1, 7, -1],
                      [2, 5, 4, 9],
                      [8, 6, -1, -1],
                      [0, 1, 2, 3]], np.int32)
HELD = [[1, 9], [2, 4, 5, 6, 7, 0], [], [3]]
NAN = float("nan")
# Per-user expectations, worked out by hand (hits: u0 at rank 2, u1 at ranks 1-3, u3 at rank 4).
EXPECTED = {
    "recall@1": [0, 1 / 6, NAN, 0], "recall@2": [1 / 2, 2 / 6, NAN, 0], "recall@4": [1 / 2, 3 / 6, NAN, 1],
    "ndcg@1": [0, 1, NAN, 0],
    "ndcg@2": [disc(2) / (disc(1) + disc(2)), 1, NAN, 0],
    "ndcg@4": [disc(2) / (disc(1) + disc(2)),
               (disc(1) + disc(2) + disc(3)) / (disc(1) + disc(2) + disc(3) + disc(4)), NAN, disc(4)],
    "hitrate@1": [0, 1, NAN, 0], "hitrate@2": [1, 1, NAN, 0], "hitrate@4": [1, 1, NAN, 1],
    "mrr@1": [0, 1, NAN, 0], "mrr@2": [1 / 2, 1, NAN, 0], "mrr@4": [1 / 2, 1, NAN, 1 / 4],
    "precision@1": [0, 1, NAN, 0], "precision@2": [1 / 2, 1, NAN, 0], "precision@4": [1 / 4, 3 / 4, NAN, 1 / 4],
}


def test_several_users_and_ks_per_user_and_mean():
    indptr, items = csr(HELD)
    table = metrics.per_user_metrics(RETRIEVED, indptr, items, (1, 2, 4))
    assert set(table) == set(EXPECTED)
    for key, values in EXPECTED.items():
        np.testing.assert_allclose(table[key], values, rtol=1e-12, err_msg=key)
    means = metrics.evaluate_rankings(RETRIEVED, indptr, items, (1, 2, 4))
    assert means.pop("num_users") == 3
    for key, values in EXPECTED.items():
        assert means[key] == pytest.approx(np.nanmean(values), rel=1e-12), key
    assert means["recall@4"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_users_select_rows_of_full_csr():
    # The full CSR has 6 rows; the ranked users are rows 4, 1, 5, 0 (in that order).
    full = [[3], [2, 4, 5, 6, 7, 0], [42], [43], [1, 9], []]
    indptr, items = csr(full)
    users = np.array([4, 1, 5, 0])
    got = metrics.per_user_metrics(RETRIEVED, indptr, items, (1, 2, 4), users=users)
    for key, values in EXPECTED.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-12, err_msg=key)


def reference_metrics(retrieved, held, k):
    """Per-user loop over Python sets, straight from the definitions."""
    out = {name: [] for name in ("recall", "ndcg", "hitrate", "mrr", "precision")}
    for row, truth in zip(retrieved, held):
        truth = set(truth)
        if not truth:
            for values in out.values():
                values.append(np.nan)
            continue
        ranks = [r + 1 for r, item in enumerate(row[:k]) if item in truth]
        out["recall"].append(len(ranks) / len(truth))
        out["precision"].append(len(ranks) / k)
        out["hitrate"].append(float(bool(ranks)))
        out["mrr"].append(1 / ranks[0] if ranks else 0.0)
        ideal = sum(disc(r) for r in range(1, min(k, len(truth)) + 1))
        out["ndcg"].append(sum(disc(r) for r in ranks) / ideal)
    return out


def test_random_rankings_match_loop_reference():
    rng = np.random.default_rng(0)
    num_users, num_items, width = 300, 60, 20
    retrieved = np.stack([rng.permutation(num_items)[:width] for _ in range(num_users)]).astype(np.int32)
    retrieved[rng.random(retrieved.shape) < 0.1] = -1  # scattered padding
    held = [list(rng.choice(num_items, rng.integers(0, 25), replace=True)) for _ in range(num_users)]
    indptr, items = csr(held)
    table = metrics.per_user_metrics(retrieved, indptr, items, (1, 5, 20))
    for k in (1, 5, 20):
        for name, values in reference_metrics(retrieved, held, k).items():
            np.testing.assert_allclose(table[f"{name}@{k}"], values, rtol=1e-12, err_msg=f"{name}@{k}")


def test_coverage_hand_computed():
    retrieved = np.array([[0, 1, 2], [2, 3, -1], [2, 0, 1]], np.int32)
    assert metrics.coverage_at_k(retrieved, 10, 1) == pytest.approx(0.2)  # {0, 2}
    assert metrics.coverage_at_k(retrieved, 10, 2) == pytest.approx(0.4)  # {0, 1, 2, 3}
    assert metrics.coverage_at_k(retrieved, 4, 3) == pytest.approx(1.0)


def test_csr_pairs_selects_rows_in_order_with_repeats():
    indptr, items = csr([[5, 6], [], [7], [8, 9, 1]])
    rows, cols, n = metrics.csr_pairs(indptr, items, [3, 0, 3, 1, 2])
    assert n == 5
    assert rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 4]
    assert cols.tolist() == [8, 9, 1, 5, 6, 8, 9, 1, 7]


@pytest.mark.parametrize("retrieved,held,ks,match", [
    ([[1, 2]], [[1]], (3,), "k must be an int in"),
    ([[1, 2]], [[1]], (), "ks is empty"),
    ([[1, 2]], [[1]], (0,), "k must be an int in"),
    ([1, 2], [[1]], (1,), r"retrieved must be an integer array \[Q, K\]"),
    ([[1.0, 2.0]], [[1]], (1,), "integer array"),
    ([[1, -2]], [[1]], (1,), "must be >= 0, or -1"),
    ([[1, 2, 1]], [[1]], (1,), "lists an item more than once"),
    ([[1, 2], [3, 4]], [[1]], (1,), "truth CSR selects 1 rows but retrieved has 2 rows"),
])
def test_errors(retrieved, held, ks, match):
    indptr, items = csr(held)
    with pytest.raises(ValueError, match=match):
        metrics.evaluate_rankings(np.array(retrieved), indptr, items, ks)


def test_errors_csr_and_users():
    retrieved = np.array([[1, 2]], np.int32)
    with pytest.raises(ValueError, match="indptr must start at 0"):
        metrics.recall_at_k(retrieved, np.array([0, 3]), np.array([1, 2], np.int32), 1)
    with pytest.raises(ValueError, match=r"users must be in \[0, 2\)"):
        metrics.recall_at_k(retrieved, *csr([[1], [2]]), 1, users=[2])
    with pytest.raises(ValueError, match="no user has a held-out item"):
        metrics.evaluate_rankings(retrieved, *csr([[]]), 1)
    with pytest.raises(ValueError, match="num_items=3"):
        metrics.coverage_at_k(np.array([[1, 3]]), 3, 2)
