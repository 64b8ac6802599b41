"""The evaluation protocol, the same for every ranking and every entry point: all items are ranked, a user's
training items are excluded (and validation items too when ranking for test), and the truth is the user's
held-out items that were not excluded, so a repeat of an excluded item never sits in recall's denominator and a
user whose held-out items are all repeats is not evaluated."""
import numpy as np
import pytest

from data.errors import DataError
from data.oracle import recall_of_scores
from data.types import Dataset, Interactions, Vocab
from eval.config import EvaluateConfig
from eval.ease import ease_topk
from eval.holdout import evaluate, heldout, heldout_users
from eval.report import markdown, summary
from eval.run import evaluate_embeddings, rank_methods

NUM_ITEMS = 6


def _inter(rows: list[tuple[int, list[int]]]) -> Interactions:
    pairs = [(u, i) for u, items in rows for i in items]
    return Interactions(np.array([u for u, _ in pairs], np.int32), np.array([i for _, i in pairs], np.int32))


def _dataset(train, test, valid=None) -> Dataset:
    num_users = max(u for u, _ in train + test) + 1
    return Dataset(name="hand", train=_inter(train), test=_inter(test), valid=None if valid is None else _inter(valid),
                   user_vocab=Vocab(np.arange(num_users)), item_vocab=Vocab(np.arange(NUM_ITEMS)),
                   user_features={}, item_features={}, user_feature_specs=[], item_feature_specs=[], stats={})


def _embeddings(scores: dict[int, dict[int, float]], num_users: int) -> tuple[np.ndarray, np.ndarray]:
    """score(u, i) = user_emb[u] . item_emb[i] = scores[u][i] (0 where not given)."""
    user_emb = np.zeros((num_users, NUM_ITEMS), np.float32)
    for u, by_item in scores.items():
        for i, s in by_item.items():
            user_emb[u, i] = s
    return user_emb, np.eye(NUM_ITEMS, dtype=np.float32)


def _config(**baselines) -> EvaluateConfig:
    c = EvaluateConfig(run_dir="unused", ks=[1, 2])
    c.segments.user_activity_edges = [1, 3]
    for key, value in baselines.items():
        setattr(c.baselines, key, value)
    return c


# User 0 consumed item 1 again in test (a repeat of a training item), user 1's only test item is a repeat.
REPEATS = _dataset(train=[(0, [0, 1]), (1, [3]), (2, [0])], test=[(0, [1, 2]), (1, [3]), (2, [4])])
# Each user points hardest at an excluded training item, then at its one reachable test item.
REPEAT_SCORES = {0: {1: 2.0, 2: 1.0}, 1: {3: 2.0, 5: 1.0}, 2: {0: 2.0, 4: 1.0}}


def test_a_test_item_repeating_a_train_item_is_not_in_the_truth():
    users = heldout_users(REPEATS)
    assert users.tolist() == [0, 2]            # user 1 has nothing reachable left to find: not evaluated
    user_emb, item_emb = _embeddings(REPEAT_SCORES, REPEATS.num_users)
    # Each evaluated user's top-1 is its one reachable test item: recall@1 = 1 (not 1/2 for user 0).
    m = evaluate_embeddings(user_emb[users], item_emb, REPEATS, users, _config(ease=False))
    assert m["methods"]["model"]["recall@1"] == pytest.approx(1.0)
    assert m["methods"]["model"]["ndcg@1"] == pytest.approx(1.0)
    ev = evaluate(user_emb[users], item_emb, REPEATS, users, [1, 2])          # the end-of-training report
    assert ev["model"]["recall@1"] == pytest.approx(1.0)
    # Segments score the same truth: both users have 1-2 training items.
    (bucket,) = m["segments"]["user_activity"]
    assert bucket["num_users"] == 2 and bucket["metrics"]["model"]["recall@1"] == pytest.approx(1.0)
    expected = {"split": "test", "excluded_splits": ["train"], "heldout_rows": 4, "repeat_rows_dropped": 2,
                "users_dropped": 1}
    assert m["protocol"] == expected and ev["protocol"] == expected
    assert "training items excluded; 2 of 4 held-out rows repeat an excluded item" in summary(m)


def test_the_reference_recall_uses_the_same_truth():
    user_emb, item_emb = _embeddings(REPEAT_SCORES, REPEATS.num_users)
    assert recall_of_scores(REPEATS, lambda rows: user_emb[rows] @ item_emb.T, 1, num_users=None) == 1.0


# User 0: train [0], valid [1], test [2]. Users 1-4 make item 1 the most popular after item 0 and item 1 the
# item that co-occurs with item 0 (so EASE, too, would put the validation item first if it were not excluded).
VALID = _dataset(train=[(0, [0])] + [(u, [0, 1]) for u in range(1, 5)] + [(5, [0, 2])],
                 valid=[(0, [1])] + [(u, [5]) for u in range(1, 5)] + [(5, [4])],
                 test=[(0, [2])] + [(u, [3]) for u in range(1, 6)])
# Every user points harder at its validation item than at its test item (user 0 hardest at its train item).
VALID_SCORES = {0: {0: 3.0, 1: 2.0, 2: 1.0}, **{u: {5: 2.0, 3: 1.0} for u in range(1, 5)}, 5: {4: 2.0, 3: 1.0}}


def test_validation_items_are_excluded_when_ranking_for_test():
    users = np.array([0], np.int32)
    user_emb, item_emb = _embeddings(VALID_SCORES, VALID.num_users)
    m = evaluate_embeddings(user_emb[users], item_emb, VALID, users, _config(ease_lambda=1.0))
    assert set(m["methods"]) == {"model", "model_ann", "most_popular", "ease"}
    for name, metrics in m["methods"].items():
        assert metrics["recall@1"] == pytest.approx(1.0), name           # the test item, not the valid one
    ev = evaluate(user_emb[users], item_emb, VALID, users, [1, 2])
    assert ev["model"]["recall@1"] == pytest.approx(1.0) and ev["most_popular"]["recall@1"] == pytest.approx(1.0)
    assert m["protocol"]["excluded_splits"] == ["train", "valid"] == ev["protocol"]["excluded_splits"]
    assert "training and validation items excluded." in markdown(m)
    everyone = heldout_users(VALID)
    m = evaluate_embeddings(user_emb[everyone], item_emb, VALID, everyone, _config(ease=False, most_popular=False))
    assert m["methods"]["model"]["recall@1"] == pytest.approx(1.0)
    assert recall_of_scores(VALID, lambda rows: user_emb[rows] @ item_emb.T, 1, num_users=None) == 1.0


def test_ranking_for_validation_excludes_training_items_only():
    users = heldout_users(VALID, "valid")
    assert users.tolist() == list(range(6))
    user_emb, item_emb = _embeddings(VALID_SCORES, VALID.num_users)
    c = _config(ease=False, most_popular=False)
    c.split, c.ann.enabled = "valid", False
    m = evaluate_embeddings(user_emb[[0]], item_emb, VALID, np.array([0]), c)
    assert m["methods"]["model"]["recall@1"] == pytest.approx(1.0)      # the valid item, top once item 0 is out
    assert m["protocol"]["excluded_splits"] == ["train"]
    ev = evaluate(user_emb[[0]], item_emb, VALID, np.array([0]), [1], split="valid", baselines=False)
    assert ev["model"]["recall@1"] == pytest.approx(1.0)


def test_dataset_splits_truth_from_exclusions_per_split():
    ds = _dataset(train=[(0, [0, 3]), (1, [2])], valid=[(0, [0, 1])], test=[(0, [1, 4, 3, 5]), (1, [2, 0])])
    assert ds.seen_splits("valid") == ["train"] and ds.seen_splits("test") == ["train", "valid"]
    indptr, items = ds.seen_csr("test")
    assert indptr.tolist() == [0, 3, 4] and items.tolist() == [0, 1, 3, 2]   # train + valid, sorted, distinct
    indptr, items = ds.heldout_csr("valid")
    assert (indptr.tolist(), items.tolist()) == ([0, 1, 1], [1])              # valid item 0 repeats train
    indptr, items = ds.heldout_csr("test")
    assert (indptr.tolist(), items.tolist()) == ([0, 2, 3], [4, 5, 0])       # time order kept, 1 and 3 seen
    with pytest.raises(DataError, match="'valid' or 'test', got 'train'"):
        ds.seen_splits("train")


def test_no_method_ever_ranks_a_training_or_validation_item_for_test():
    rng = np.random.default_rng(0)
    num_users, num_items = 40, 30
    # Random lists drawn with replacement: many test items repeat a train or valid item of the same user.
    splits = {name: [(u, rng.integers(0, num_items, rng.integers(1, 6)).tolist()) for u in range(num_users)]
              for name in ("train", "valid", "test")}
    ds = _dataset(**splits).replace(item_vocab=Vocab(np.arange(num_items)))
    users = heldout_users(ds)
    seen = [set(splits["train"][u][1]) | set(splits["valid"][u][1]) for u in users]
    assert any(set(splits["test"][u][1]) & s for u, s in zip(users, seen))       # the data does hold repeats
    c = _config(ease_lambda=1.0)
    c.ks = [1, 5, 20]
    user_emb, item_emb = rng.normal(size=(len(users), 8)), rng.normal(size=(num_items, 8))
    rankings, _ = rank_methods(user_emb, item_emb, ds, users, heldout(ds, users), c, {})
    assert set(rankings) == {"model", "model_ann", "most_popular", "ease"}
    for name, ranked in rankings.items():
        for row, excluded in zip(ranked, seen):
            assert not set(row.tolist()) & excluded, name
            assert (row >= 0).sum() == min(20, num_items - len(excluded)), name     # every other item is eligible


def test_ease_exclusions_must_align_with_the_ranked_users():
    b = np.zeros((3, 3), np.float32)
    indptr, items = np.array([0, 1, 2]), np.array([0, 1], np.int32)
    assert ease_topk(b, indptr, items, [0, 1], 2, exclude_indptr=np.array([0, 2, 2]),
                     exclude_items=np.array([0, 2])).tolist() == [[1, -1], [0, 1]]
    with pytest.raises(ValueError, match="exclusion CSR has 1 rows but 2 users are ranked"):
        ease_topk(b, indptr, items, [0, 1], 2, exclude_indptr=np.array([0, 1]), exclude_items=np.array([0]))
