"""`towers.inference.search.topk_excluding`: what it returns, and what it costs on the common path."""
import numpy as np

from towers.inference import search


def _ranked_candidates(rng, rows: int, width: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32[rows, width] strictly decreasing, distinct ids int64[rows, width]) as an ANN returns them."""
    scores = -np.sort(-rng.standard_normal((rows, width)).astype(np.float32), axis=1)
    ids = np.stack([rng.choice(num_items, width, replace=False) for _ in range(rows)]).astype(np.int64)
    return scores, ids


def _by_tie_rule(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.stack([np.lexsort((i, -s)) for s, i in zip(scores, ids)])
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def test_a_search_without_exclusions_sorts_only_the_rows_out_of_rank_order(monkeypatch):
    rng = np.random.default_rng(0)
    scores, ids = _ranked_candidates(rng, 40, 16, 1000)
    # Three rows where the ANN returned a tie with the larger id first, and one row out of score order.
    for r in (3, 17, 29):
        scores[r, 5] = scores[r, 4]
        ids[r, 4], ids[r, 5] = max(ids[r, 4], ids[r, 5]), min(ids[r, 4], ids[r, 5])
    scores[33, [2, 3]] = scores[33, [3, 2]]
    sorted_rows = []
    real_rank_keys = search.rank_keys
    monkeypatch.setattr(search, "rank_keys", lambda s, i: sorted_rows.append(len(s)) or real_rank_keys(s, i))

    def ann(queries, fetch, attempt):
        assert fetch == 16 and attempt == 0
        return scores.copy(), ids.copy()

    def exact(rows, indptr, items):
        raise AssertionError("every row has 16 candidates: nothing is searched exactly")

    got_s, got_i, stats = search.topk_excluding(ann, exact, np.zeros((40, 4), np.float32), 16, None, None,
                                                num_items=1000)
    want_s, want_i = _by_tie_rule(scores, ids)
    np.testing.assert_array_equal(got_s, want_s)
    np.testing.assert_array_equal(got_i, want_i)
    assert stats.widened == stats.exact_fallback == 0
    assert sorted_rows == [4]   # the 36 rows already in order are kept as they are


def test_exclusions_and_invalid_candidates_are_dropped_and_the_rest_ranked_by_the_tie_rule():
    rng = np.random.default_rng(1)
    scores, ids = _ranked_candidates(rng, 6, 12, 50)
    scores[0, 3] = scores[0, 2]                 # a tie, larger id first or not
    scores[1, -2:], ids[1, -2:] = np.nan, 0     # ScaNN's padding
    excluded = [ids[r, :r] for r in range(6)]   # row r excludes its r best candidates
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
    items = np.concatenate([np.sort(e) for e in excluded]).astype(np.int64)

    got_s, got_i, _ = search.topk_excluding(lambda q, fetch, attempt: (scores[:, :fetch], ids[:, :fetch]),
                                            lambda *a: (_ for _ in ()).throw(AssertionError("no exact search")),
                                            np.zeros((6, 4), np.float32), 4, indptr, items, num_items=50,
                                            overfetch=8)
    for r in range(6):
        keep = ~np.isin(ids[r], excluded[r]) & np.isfinite(scores[r])
        want_s, want_i = _by_tie_rule(scores[r:r + 1, keep], ids[r:r + 1, keep])
        np.testing.assert_array_equal(got_s[r], want_s[0, :4])
        np.testing.assert_array_equal(got_i[r], want_i[0, :4])


def test_exact_topk_host_keeps_the_smaller_ids_among_ties_at_the_kth_place():
    from towers.inference.search import exact_topk_host
    emb = np.zeros((300, 3), np.float32)   # large enough that a partial sort keeps later tied ids (280, ...)
    emb[:, 0] = 1.0                     # every item scores the same
    emb[7] = [2.0, 0, 0]                # but item 7
    scores, ids = exact_topk_host(np.array([[1.0, 0, 0]] * 3, np.float32), emb, 4)
    assert ids.tolist() == [[7, 0, 1, 2]] * 3
    assert scores[0].tolist() == [2.0, 1.0, 1.0, 1.0]
