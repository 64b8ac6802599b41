"""`towers.inference.filtered`: filtered top-k against a brute-force numpy reference, on the exact path and the
ANN path (fake ANNs that return too few or wrong candidates, so widening and the exact fallback run)."""
import numpy as np
import pytest

from towers.inference import filtered
from towers.inference.filtered import ConditionLists, ConditionValueError, FilterStats, filtered_topk


def _corpus(rng, n: int, d: int, num_values: int, multihot: bool):
    """Small-integer vectors (exact float32 scores, many ties) and Zipf-like codes: int[N], or int[N, 3] with
    -1 padding and some values repeated within an item."""
    emb = rng.integers(-2, 3, (n, d)).astype(np.float32)
    p = 1.0 / np.arange(1, num_values + 1) ** 1.5
    draw = lambda size: rng.choice(num_values, size=size, p=p / p.sum())   # noqa: E731
    if not multihot:
        return emb, draw(n).astype(np.int32)
    codes = draw((n, 3)).astype(np.int32)
    codes[rng.random((n, 3)) < 0.3] = -1
    codes[::7, 1] = codes[::7, 0]           # a value twice in one item counts once
    return emb, codes


def _holds(codes: np.ndarray, value: int) -> np.ndarray:
    return (codes.reshape(len(codes), -1) == value).any(axis=1)


def _reference(queries, emb, codes, conditions, k, exclude):
    """Full scores, items without the value or excluded dropped, ordered by (score desc, slot asc)."""
    scores = np.full((len(queries), k), -np.inf, np.float32)
    slots = np.full((len(queries), k), -1, np.int64)
    for r, (q, v) in enumerate(zip(queries, conditions)):
        ok = _holds(codes, v)
        ok[list(exclude[r]) if exclude else []] = False
        cand = np.flatnonzero(ok)
        s = emb[cand] @ q
        order = np.lexsort((cand, -s))[:k]
        scores[r, :len(order)], slots[r, :len(order)] = s[order], cand[order]
    return scores, slots


def _csr(exclude):
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in exclude])]).astype(np.int64)
    return indptr, np.concatenate([np.asarray(e, np.int64) for e in exclude])


def _exact_ranking(queries, emb, fetch):
    """The whole corpus's exact top-`fetch` of each query by the tie rule: what a perfect ANN returns."""
    s = queries @ emb.T
    order = np.stack([np.lexsort((np.arange(len(emb)), -row))[:fetch] for row in s])
    return np.take_along_axis(s, order, axis=1), order


def _prefix_ann(queries_all, emb, fractions, calls):
    """An ANN that returns the true ranking but only its first fractions[attempt] of what was asked (NaN / -1
    after), so the first searches leave queries short."""
    def ann(q, fetch, attempt, share):
        calls.append((len(q), fetch, attempt, share))
        s, i = _exact_ranking(q, emb, fetch)
        keep = max(0, int(fetch * fractions[min(attempt, len(fractions) - 1)]))
        s[:, keep:], i[:, keep:] = np.nan, -1
        return s, i
    return ann


def _exclusions(rng, n, q, codes, conditions):
    """Per query: a few of its value's items, a few items without it, one repeated slot."""
    out = []
    for v in conditions:
        mine, other = np.flatnonzero(_holds(codes, v)), np.flatnonzero(~_holds(codes, v))
        ex = list(rng.choice(mine, min(len(mine), rng.integers(0, 6)), replace=False))
        ex += list(rng.choice(other, min(len(other), 3), replace=False))
        out.append(ex + ex[:1])
    return out


@pytest.mark.parametrize("multihot", [False, True])
def test_condition_lists_hold_each_values_slots_in_order(multihot):
    rng = np.random.default_rng(0)
    emb, codes = _corpus(rng, 500, 4, 12, multihot)
    lists = ConditionLists(codes, 12, emb)
    for v in range(12):
        np.testing.assert_array_equal(lists.items(v), np.flatnonzero(_holds(codes, v)))
        np.testing.assert_array_equal(lists.vectors(v), emb[_holds(codes, v)])
    assert lists.counts.tolist() == [int(_holds(codes, v).sum()) for v in range(12)]


@pytest.mark.parametrize("multihot", [False, True])
@pytest.mark.parametrize("with_exclusions", [False, True])
def test_exact_path_equals_the_reference(multihot, with_exclusions, monkeypatch):
    rng = np.random.default_rng(1 + multihot)
    emb, codes = _corpus(rng, 600, 6, 20, multihot)
    queries = rng.integers(-2, 3, (40, 6)).astype(np.float32)
    conditions = rng.integers(0, 20, 40)
    exclude = _exclusions(rng, 600, 40, codes, conditions) if with_exclusions else None
    calls = []
    real = filtered.exact_topk_host
    monkeypatch.setattr(filtered, "exact_topk_host", lambda q, *a: calls.append(len(q)) or real(q, *a))
    stats = FilterStats()
    got_s, got_i = filtered_topk(queries, 15, conditions, ConditionLists(codes, 20, emb),
                                 *(_csr(exclude) if exclude else (None, None)), stats=stats)
    want_s, want_i = _reference(queries, emb, codes, conditions, 15, exclude)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    present = [v for v in np.unique(conditions) if _holds(codes, v).any()]
    assert len(calls) == len(present)   # one matmul per value
    assert stats.queries == stats.exact == 40 and stats.ann == 0
    # Values with fewer than k eligible items: all of them, then padding; every other query gets k.
    eligible = np.array([_holds(codes, v).sum() - len(set(e) & set(np.flatnonzero(_holds(codes, v))))
                         for v, e in zip(conditions, exclude or [[]] * 40)])
    np.testing.assert_array_equal((got_i >= 0).sum(axis=1), np.minimum(15, eligible))
    assert stats.short == int((eligible < 15).sum()) > 0


@pytest.mark.parametrize("multihot", [False, True])
def test_ann_path_widens_and_falls_back_to_the_reference_answer(multihot):
    rng = np.random.default_rng(3 + multihot)
    emb, codes = _corpus(rng, 800, 6, 10, multihot)
    queries = rng.integers(-2, 3, (60, 6)).astype(np.float32)
    conditions = rng.integers(0, 10, 60)
    exclude = _exclusions(rng, 800, 60, codes, conditions)
    lists = ConditionLists(codes, 10, emb)
    calls, stats = [], FilterStats()
    # attempt 0 returns 30% of what it is asked, attempt 1 35%, then the ANN gives up (max_attempts=2):
    # some queries are answered on the first search, some after widening, the rest exactly.
    got_s, got_i = filtered_topk(queries, 12, conditions, lists, *_csr(exclude),
                                 ann=_prefix_ann(queries, emb, [0.3, 0.35], calls), exact_below=40,
                                 overfetch=1.5, max_attempts=2, stats=stats)
    want_s, want_i = _reference(queries, emb, codes, conditions, 12, exclude)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    big = lists.counts[conditions] > 40
    assert stats.ann == int(big.sum()) > 0 and stats.exact == int((~big).sum()) > 0
    assert 0 < stats.widened < stats.ann and stats.exact_fallback > 0, stats
    # The ANN is told the value's share; its whole-corpus fetch is overfetch / share times the value's need
    # (k plus exclusions, a power of two on retries) and doubles on the retry.
    assert {a for *_, a, _ in calls} == {0, 1}
    shares = set((lists.counts / 800).tolist())
    for m, fetch, attempt, share in calls:
        assert share in shares and share > 40 / 800
        assert fetch == 800 or fetch >= 12 * 1.5 * 2 ** attempt / share - 1


def test_an_ann_with_wrong_and_missing_candidates_still_returns_k_valid_items_in_order():
    """Candidates out of score order, of other values, excluded, or missing: whatever comes back
    holds the value, is not excluded, fills k and is ranked by the tie rule."""
    rng = np.random.default_rng(5)
    emb, codes = _corpus(rng, 700, 6, 8, multihot=True)
    queries = rng.integers(-2, 3, (50, 6)).astype(np.float32)
    conditions = rng.integers(0, 8, 50)
    exclude = _exclusions(rng, 700, 50, codes, conditions)

    def noisy_ann(q, fetch, attempt, share):
        ids = np.stack([rng.permutation(700)[:fetch] for _ in q])
        ids[rng.random(ids.shape) < 0.1] = -1
        s = np.einsum("qd,qfd->qf", q, emb[np.maximum(ids, 0)]).astype(np.float32)
        s[rng.random(s.shape) < 0.1] = np.nan
        return s, ids

    stats = FilterStats()
    got_s, got_i = filtered_topk(queries, 10, conditions, ConditionLists(codes, 8, emb), *_csr(exclude),
                                 ann=noisy_ann, exact_below=20, stats=stats)
    assert stats.ann > 0
    for r, v in enumerate(conditions):
        ids = got_i[r][got_i[r] >= 0]
        eligible = np.setdiff1d(np.flatnonzero(_holds(codes, v)), exclude[r])
        assert len(ids) == min(10, len(eligible)) and len(set(ids.tolist())) == len(ids)
        assert np.isin(ids, eligible).all()
        np.testing.assert_array_equal(got_s[r, :len(ids)], emb[ids] @ queries[r])
        assert (np.lexsort((ids, -got_s[r, :len(ids)])) == np.arange(len(ids))).all()


def test_an_empty_ann_answers_every_query_exactly():
    rng = np.random.default_rng(6)
    emb, codes = _corpus(rng, 400, 5, 6, multihot=False)
    queries = rng.integers(-2, 3, (30, 5)).astype(np.float32)
    conditions = rng.integers(0, 6, 30)
    stats = FilterStats()
    got_s, got_i = filtered_topk(
        queries, 7, conditions, ConditionLists(codes, 6, emb), ann=lambda q, f, a, share: (
            np.full((len(q), f), np.nan, np.float32), np.full((len(q), f), -1)), exact_below=0, stats=stats)
    want_s, want_i = _reference(queries, emb, codes, conditions, 7, None)
    np.testing.assert_array_equal(got_i, want_i)
    assert stats.ann == stats.exact_fallback == 30


def test_a_value_without_items_and_bad_conditions():
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(50, 4)).astype(np.float32)
    codes = np.where(np.arange(50) < 25, 0, 2).astype(np.int32)   # value 1 holds nothing
    lists = ConditionLists(codes, 3, emb)
    s, i = filtered_topk(emb[:2], 5, [1, 0], lists)
    assert (i[0] == -1).all() and (s[0] == -np.inf).all() and (i[1] >= 0).all() and (i[1] < 25).all()
    for bad in ([3, 0], [-1, 0], [0], [[0], [1]], [0.5, 1.0]):
        with pytest.raises(ConditionValueError):
            filtered_topk(emb[:2], 5, bad, lists)
    with pytest.raises(ValueError, match="must lie in"):
        ConditionLists(np.full(50, 3), 3, emb)
