"""Cold items on real MovieLens: items held out of training entirely, embedded from their features alone, are
retrieved for the users who later interact with them far better than a random ranking of the same items."""
import numpy as np
import pytest

from scripts.bench_cold_items import cold_item_recall, cold_truth
from tests.helpers import compose_cfg
from towers.embed import embed_items
from towers.inference.embed import trained_item_rows
from towers.two_tower import feature_names

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    from data.load import load
    from towers.restore import load_trained
    from train.config import validate
    from train.loop import run

    # Two epochs on one device: far from converged, which makes the margin over random a conservative check.
    c = validate(compose_cfg("+experiment=movielens", f"data.path={shared_data / 'ml-100k'}",
                             "data.cold_item_fraction=0.1", "train.num_epochs=2", "train.launcher=jit",
                             "train.progress=false", "eval.at_end=false", "checkpoint.async_save=false"))
    run_dir = tmp_path_factory.mktemp("cold_run")
    run(c, run_dir)
    return load_trained(run_dir), load(c.data), c.data.history_len


def test_cold_items_from_features_beat_a_random_ranking_of_the_same_items(trained):
    model, ds, history_len = trained
    assert ds.cold_items.size == 168 and ds.item_counts()[ds.cold_items].sum() == 0
    r = cold_item_recall(model, ds, (20, 100), history_len=history_len)
    users, truth_indptr, _ = cold_truth(ds)
    print(f"\ncold items ml-100k: {r['num_cold_items']} items, {r['num_users']} users, recall@100 from features "
          f"{r['features_only']['recall@100']:.4f} vs random {r['random']['recall@100']:.4f} "
          f"(recall@20 {r['features_only']['recall@20']:.4f} vs {r['random']['recall@20']:.4f})")
    assert r["num_users"] == users.size > 800 and truth_indptr[-1] == ds.stats["cold_item_test_rows"]
    assert r["random"]["recall@100"] == pytest.approx(100 / 168)
    # Under a random ranking a user's hits are hypergeometric, so the mean recall's spread is exact: about
    # 0.008 at k=100 and 0.005 at k=20 here. Demand at least 5 of those above random (2 epochs give ~15).
    for k in (100, 20):
        margin = 5 * _random_recall_std(np.diff(truth_indptr), ds.cold_items.size, k)
        assert r["features_only"][f"recall@{k}"] > r["random"][f"recall@{k}"] + max(margin, 0.02), k


def _random_recall_std(held: np.ndarray, num_cold: int, k: int) -> float:
    """Standard deviation of the users' mean recall@k when each ranks the cold items at random."""
    p = min(k, num_cold) / num_cold
    var = p * (1 - p) / held * (num_cold - held) / max(num_cold - 1, 1)
    return float(np.sqrt(var.sum()) / held.size)


def test_items_without_training_data_embed_from_features_alone(trained):
    model, ds, _ = trained
    rows = trained_item_rows(np.arange(ds.num_items), ds.item_counts())
    warm = np.flatnonzero(ds.item_counts() > 0)
    assert (rows[ds.cold_items] == -1).all() and np.array_equal(rows[warm], warm)
    # Their embeddings do not depend on the ID table at all: scrambling the cold rows changes nothing for them,
    # while the same scrambling of the warm rows does move the warm items.
    table = np.asarray(model.tables["item"])
    scrambled = table.copy()
    scrambled[ds.cold_items] = np.random.default_rng(0).normal(size=(ds.cold_items.size, table.shape[1]))
    scrambled[warm[:5]] *= -1
    picks = np.concatenate([ds.cold_items[:5], warm[:5]]).astype(np.int32)
    feats = {k: ds.item_features[k][picks] for k in feature_names(model.model)[1]}
    a = embed_items(model.graphdef, model.params, table, trained_item_rows(picks, ds.item_counts()), feats)
    b = embed_items(model.graphdef, model.params, scrambled, trained_item_rows(picks, ds.item_counts()), feats)
    np.testing.assert_array_equal(a[:5], b[:5])
    assert np.abs(a[5:] - b[5:]).max() > 1e-3
