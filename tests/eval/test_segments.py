"""Segments and popularity bias on hand-made cases."""
import numpy as np
import pytest

from eval.segments import (activity_buckets, item_segment_metrics, popularity_bias, popularity_percentile,
                           popularity_segments, restrict_csr, user_segment_metrics)


def test_activity_buckets_labels_and_membership():
    labels, bucket = activity_buckets([0, 1, 4, 5, 19, 20, 50, 700], [1, 5, 20, 50])
    assert labels == ["0", "1-4", "5-19", "20-49", "50+"]
    assert bucket.tolist() == [0, 1, 1, 2, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="increasing"):
        activity_buckets([1], [5, 5])


def test_popularity_segments_by_cumulative_share():
    # 20 interactions. By popularity: item 0 (10, share before it 0) head; item 2 (5, before 0.50) torso;
    # item 3 (3, before 0.75) torso; item 4 (2, before 0.90) tail; item 1 has none: cold.
    seg = popularity_segments([10, 0, 5, 3, 2], (0.5, 0.8))
    assert seg.tolist() == [0, 3, 1, 1, 2]
    # Equal counts rank by smaller id: shares before them 0, .25, .50, .75.
    assert popularity_segments([5, 5, 5, 5], (0.5, 0.8)).tolist() == [0, 0, 1, 1]
    assert popularity_segments([5, 5, 5, 5, 5], (0.5, 0.8)).tolist() == [0, 0, 0, 1, 2]


def test_restrict_csr_keeps_rows_and_drops_items():
    indptr, items = restrict_csr(np.array([0, 2, 3, 6]), np.array([0, 1, 2, 1, 3, 4]),
                                 np.array([True, False, True, False, True]))
    assert indptr.tolist() == [0, 1, 2, 3] and items.tolist() == [0, 2, 4]


def test_item_segment_recall_counts_only_that_segments_heldout_items():
    counts = np.array([10, 0, 5, 3, 2])  # segments: 0 head, 1 cold, 2 torso, 3 torso, 4 tail
    truth_indptr = np.array([0, 3, 5])
    truth_items = np.array([0, 2, 4,    # user 0: head 0, torso 2, tail 4
                            1, 3])      # user 1: cold 1, torso 3
    ranked = np.array([[0, 4, 3],       # user 0 finds head and tail items
                       [3, 0, 2]])      # user 1 finds its torso item
    segs = {s["name"]: s for s in item_segment_metrics({"m": ranked}, truth_indptr, truth_items, [1, 2],
                                                       counts, (0.5, 0.8))}
    assert list(segs) == ["head", "torso", "tail", "cold"]
    assert segs["head"]["metrics"]["m"] == {"recall@1": 1.0, "recall@2": 1.0}
    assert segs["head"]["num_users"] == 1 and segs["head"]["num_items"] == 1
    # torso: user 0 misses item 2 (0), user 1 finds item 3 at rank 1 (1): mean 0.5 at both k.
    assert segs["torso"]["metrics"]["m"] == {"recall@1": 0.5, "recall@2": 0.5}
    assert segs["tail"]["metrics"]["m"] == {"recall@1": 0.0, "recall@2": 1.0}
    assert segs["cold"]["metrics"]["m"] == {"recall@1": 0.0, "recall@2": 0.0}
    assert segs["torso"]["train_share"] == pytest.approx(8 / 20)


def test_user_segments_average_per_bucket():
    truth_indptr, truth_items = np.array([0, 1, 2, 4]), np.array([5, 6, 7, 8])
    ranked = np.array([[5, 1], [1, 6], [1, 2]])
    rows = user_segment_metrics({"m": ranked}, truth_indptr, truth_items, [1, 2], lengths=[2, 3, 12],
                                edges=[1, 10])
    assert [(r["name"], r["num_users"]) for r in rows] == [("1-9", 2), ("10+", 1)]
    assert rows[0]["metrics"]["m"]["recall@1"] == 0.5 and rows[0]["metrics"]["m"]["recall@2"] == 1.0
    assert rows[0]["metrics"]["m"]["hitrate@1"] == 0.5
    assert rows[1]["metrics"]["m"]["recall@2"] == 0.0


def test_popularity_percentile_uses_mid_ranks():
    assert popularity_percentile([1, 3, 3, 7]).tolist() == [0.0, 50.0, 50.0, 100.0]


def test_popularity_bias_compares_recommended_with_heldout():
    counts = np.array([1, 3, 3, 7])                     # percentiles 0, 50, 50, 100
    ranked = np.array([[3, 1], [3, -1]])                 # top-1: 100, 100; top-2 adds 50 (padding ignored)
    out = popularity_bias({"m": ranked}, np.array([0, 2]), counts, [1, 2], bins=4)
    assert out["heldout"]["mean_percentile"] == 25.0
    assert out["methods"]["m"]["mean_percentile@1"] == 100.0
    assert out["methods"]["m"]["mean_percentile@2"] == pytest.approx(250 / 3)
    assert out["heldout"]["histogram"] == [0.5, 0.0, 0.5, 0.0]  # 0 in the first bin, 50 in the third
    assert out["methods"]["m"]["histogram@1"] == [0.0, 0.0, 0.0, 1.0]
