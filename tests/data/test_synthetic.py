"""The synthetic source: determinism, planted structure, features, and the oracle's reference recall."""
import numpy as np
import pytest

from data import load
from data.oracle import popularity_recall, synthetic_oracle_recall, synthetic_oracle_scorer
from data.sources.synthetic import item_prob_in_cluster, latent_structure

SMALL = dict(source="synthetic", num_users=1500, num_items=800, interactions_per_user=20, num_clusters=16)


@pytest.fixture(scope="module")
def ds():
    return load(SMALL)


def _columns(d):
    return [d.train.user, d.train.item, d.train.timestamp, d.test.user, d.test.item, d.test.timestamp,
            *d.user_features.values(), *d.item_features.values()]


def test_same_seed_same_data_other_seed_differs(ds):
    again = load(SMALL)
    for a, b in zip(_columns(ds), _columns(again)):
        np.testing.assert_array_equal(a, b)
    other = load({**SMALL, "seed": 1})
    assert len(other.train) != len(ds.train) or not np.array_equal(other.train.item, ds.train.item)


def test_shapes_counts_and_features(ds):
    assert ds.num_users == 1500 and ds.num_items == 800
    per_user = np.bincount(ds.train.user, minlength=ds.num_users) + np.bincount(ds.test.user, minlength=1500)
    assert per_user.min() >= 3
    assert abs(per_user.mean() - 20) < 1.5
    assert ds.stats["duplicate_rows"] == 0  # pairs are distinct by construction
    specs = {s.name: s for s in ds.user_feature_specs + ds.item_feature_specs}
    assert (specs["segment"].size, specs["age_bucket"].size, specs["category"].size) == (16, 8, 16)
    assert specs["tags"].kind == "multihot" and specs["tags"].max_len == 4
    assert ds.item_features["quality"].shape == (800, 1) and ds.item_features["quality"].dtype == np.float32
    tags = ds.item_features["tags"]
    assert ((tags >= 0).sum(axis=1) >= 1).all()
    for row in tags:  # distinct tags, padding only at the end
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real) and (row[len(real):] == -1).all()


def test_time_increases_per_user(ds):
    for split in (ds.train, ds.test):
        same = split.user[1:] == split.user[:-1]
        assert (np.diff(split.timestamp)[same] > 0).all()


def test_planted_structure_is_visible(ds):
    lat = latent_structure(**ds.stats["synthetic"])
    # Users interact mostly within their preferred clusters: category of items matches one of them.
    cats = ds.item_features["category"][ds.train.item]
    preferred = lat.user_clusters[ds.user_vocab.raw_ids[ds.train.user]]
    assert (cats[:, None] == preferred).any(axis=1).all()
    # `segment` is the main cluster for most users (70% kept, plus random hits).
    main = lat.user_clusters[np.arange(1500), lat.user_weights.argmax(axis=1)]
    assert 0.6 < (ds.user_features["segment"] == main).mean() < 0.85
    # Popular items (low rank in their cluster) are drawn more often.
    counts = ds.item_counts()
    p = item_prob_in_cluster(lat)
    assert np.corrcoef(np.log1p(counts), np.log(p))[0, 1] > 0.5
    # Oracle scores are a probability distribution over items for each user.
    scores = synthetic_oracle_scorer(ds)(np.arange(10))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-9)


def test_oracle_recall_clearly_beats_popularity(ds):
    oracle = synthetic_oracle_recall(ds, 10, num_users=500)
    popular = popularity_recall(ds, 10, num_users=500)
    assert oracle > 0.3 and oracle > 3 * popular, (oracle, popular)
    assert synthetic_oracle_recall(ds, 100, num_users=500) > oracle
