"""Towers: feature embeddings against numpy, L2 output, DCN-v2 algebra, ID dropout only when training,
content-only item embeddings, and the batched inference helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.types import FeatureSpec
from towers.config import ModelConfig, TowerConfig
from towers.embed import embed_items
from towers.features import FeatureEmbedder, masked_mean
from towers.layers import CrossNetwork, l2_normalize
from towers.two_tower import TwoTower

ITEM_SPECS = [FeatureSpec("category", "categorical", 5), FeatureSpec("tags", "multihot", 7, max_len=3),
              FeatureSpec("quality", "dense", 2)]


def _feats(n, seed=0):
    r = np.random.default_rng(seed)
    tags = r.integers(0, 7, (n, 3)).astype(np.int32)
    tags[:, 2] = -1  # padding slot
    return {"category": r.integers(0, 5, n).astype(np.int32), "tags": tags,
            "quality": r.normal(size=(n, 2)).astype(np.float32)}


def test_feature_embedder_matches_numpy():
    emb = FeatureEmbedder(ITEM_SPECS, 4, rngs=nnx.Rngs(0))
    f = _feats(6)
    out = np.asarray(emb({k: jnp.asarray(v) for k, v in f.items()}))
    assert out.shape == (6, 3, 4)
    cat = np.asarray(emb.layers["category"].embedding[...])
    np.testing.assert_allclose(out[:, 0], cat[f["category"]], rtol=1e-6)
    tag = np.asarray(emb.layers["tags"].embedding[...])
    want = np.stack([tag[row[row >= 0]].mean(0) for row in f["tags"]])
    np.testing.assert_allclose(out[:, 1], want, rtol=1e-5, atol=1e-6)
    lin = emb.layers["quality"]
    np.testing.assert_allclose(out[:, 2], f["quality"] @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...]),
                               rtol=1e-5, atol=1e-6)


def test_masked_mean_of_empty_bag_is_zero():
    x = jnp.ones((2, 3, 4))
    out = masked_mean(x, jnp.array([[1, 0, 1], [0, 0, 0]]))
    np.testing.assert_allclose(out, [[1] * 4, [0] * 4])


def test_cross_layer_algebra():
    cross = CrossNetwork(3, 1, rngs=nnx.Rngs(0))
    x0 = jax.random.normal(jax.random.key(1), (4, 3))
    w, b = np.asarray(cross.up[0].kernel[...]), np.asarray(cross.up[0].bias[...])
    want = np.asarray(x0) * (np.asarray(x0) @ w + b) + np.asarray(x0)
    np.testing.assert_allclose(cross(x0), want, rtol=1e-5, atol=1e-6)


def _model(id_dropout=0.5, **item):
    cfg = ModelConfig(id_dim=8, feature_dim=4, output_dim=8,
                      user=TowerConfig(use_history=True, features=[]),
                      item=TowerConfig(id_dropout=id_dropout, cross_layers=1, hidden=[16], **item))
    return TwoTower(cfg, [], ITEM_SPECS, rngs=nnx.Rngs(0))


def test_outputs_are_unit_norm_and_dropout_only_in_training():
    model = _model()
    f = {k: jnp.asarray(v) for k, v in _feats(64).items()}
    ids = jax.random.normal(jax.random.key(2), (64, 8))
    eval_a, eval_b = model.item(f, ids), model.item(f, ids)
    np.testing.assert_allclose(jnp.linalg.norm(eval_a, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(eval_a, eval_b)  # no randomness without a dropout key
    train = model.item(f, ids, dropout_rng=jax.random.key(3))
    changed = np.any(np.abs(np.asarray(train) - np.asarray(eval_a)) > 1e-6, axis=1)
    assert 0.25 < changed.mean() < 0.75  # about half of the rows lost their id row
    no_id = model.item(f, jnp.zeros_like(ids))
    np.testing.assert_allclose(np.asarray(train)[changed], np.asarray(no_id)[changed], rtol=1e-5, atol=1e-6)


def test_fresh_items_embed_from_features_alone():
    model = _model()
    graphdef, params = nnx.split(model)
    feats = _feats(5)
    table = jax.random.normal(jax.random.key(0), (10, 8))
    known = embed_items(graphdef, params, table, np.array([0, 1, 2, 3, 4]), feats, batch_size=2)
    fresh = embed_items(graphdef, params, table, np.array([-1] * 5), feats, batch_size=4)
    want = model.item({k: jnp.asarray(v) for k, v in feats.items()}, jnp.zeros((5, 8)))
    np.testing.assert_allclose(fresh, want, rtol=1e-5, atol=1e-6)
    assert known.shape == fresh.shape == (5, 8)
    assert not np.allclose(known, fresh)


def test_unknown_feature_name_is_reported():
    cfg = ModelConfig(item=TowerConfig(features=["colour"]))
    with pytest.raises(ValueError, match="colour"):
        TwoTower(cfg, [], ITEM_SPECS, rngs=nnx.Rngs(0))


def test_l2_normalize_zero_vector_is_finite():
    assert np.all(np.isfinite(l2_normalize(jnp.zeros((2, 3)))))
