"""`combine: sum`: the user tower is the normalised sum of its ID row and its history mean (MF plus a
SimpleX-style behaviour term), with no projection when nothing else feeds it."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from towers.config import ModelConfig, TowerConfig
from towers.two_tower import TwoTower


def _model(combine):
    cfg = ModelConfig(id_dim=8, feature_dim=4, output_dim=8,
                      user=TowerConfig(use_history=True, features=[], combine=combine),
                      item=TowerConfig(features=[]))
    return TwoTower(cfg, [], [], rngs=nnx.Rngs(0))


def test_sum_is_normalised_id_plus_history_mean():
    model = _model("sum")
    assert model.user.mlp is None  # a pure sum of id_dim vectors needs no projection
    r = np.random.default_rng(0)
    ids, hist = r.normal(size=(3, 8)).astype(np.float32), r.normal(size=(3, 4, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    out = np.asarray(model.user({}, jnp.asarray(ids), jnp.asarray(hist), jnp.asarray(mask)))
    pooled = (hist * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    want = ids + pooled
    np.testing.assert_allclose(out, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_concat_projects_and_bad_value_is_refused():
    assert _model("concat").user.mlp is not None  # [id | history] of width 16 -> 8
    with pytest.raises(ValueError, match="combine='mean'"):
        _model("mean")
