"""Conditional retrieval (`model.user.condition`): the condition field of the user tower against a numpy forward,
'no condition' and condition dropout, the batches' conditions (the positive's value; one drawn value of a
multihot feature, the same whatever the process count), the config checks, and a conditional model trained on
1 device and on 4 devices giving the same model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.batching import Batches
from data.types import CONDITION, FeatureSpec
from tests.helpers import smoke_cfg, trains_the_same_on_one_and_four_devices
from towers.config import ConfigError, ModelConfig, TowerConfig
from towers.two_tower import TwoTower, drop_condition
from train.loop import load_data

GENRE = FeatureSpec("genre", "categorical", 5)
TAGS = FeatureSpec("tags", "multihot", 7, 3)
AGE = FeatureSpec("age", "categorical", 4)


def _a(v) -> np.ndarray:
    return np.asarray(v[...], dtype=np.float64)


def _model(condition="genre", **user_kw) -> TwoTower:
    user = TowerConfig(**{"use_history": False, "condition": condition, **user_kw})
    cfg = ModelConfig(id_dim=6, feature_dim=3, output_dim=5, user=user, item=TowerConfig())
    return TwoTower(cfg, [AGE], [GENRE, TAGS, FeatureSpec("q", "dense", 1)], rngs=nnx.Rngs(0))


def _np_user(tower, id_emb, age, code):
    """The user tower by hand: [id row, age embedding, condition embedding (row code + 1)] -> linear -> L2."""
    x = np.concatenate([id_emb, _a(tower.features.layers["age"].embedding)[age],
                        _a(tower.condition.embedding)[code + 1]], axis=1)
    (layer,) = tower.mlp.layers
    y = x @ _a(layer.kernel) + _a(layer.bias)
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def test_condition_is_one_more_field_as_numpy_says():
    model = _model()
    rng = np.random.default_rng(0)
    id_emb = rng.normal(size=(9, 6)).astype(np.float32)
    age = rng.integers(0, 4, 9).astype(np.int32)
    code = np.array([0, 1, 2, 3, 4, -1, 2, -1, 0], np.int32)
    got = model.user({"age": age, CONDITION: code}, jnp.asarray(id_emb))
    np.testing.assert_allclose(np.asarray(got), _np_user(model.user, id_emb, age, code), rtol=1e-5, atol=1e-6)
    # the condition changes the embedding, and an absent condition is 'none' (row 0) for every user
    none = model.user({"age": age}, jnp.asarray(id_emb))
    np.testing.assert_allclose(np.asarray(none), _np_user(model.user, id_emb, age, np.full(9, -1)), rtol=1e-5,
                               atol=1e-6)
    assert not np.allclose(np.asarray(got)[:5], np.asarray(none)[:5])


def test_condition_dropout_feeds_none_at_its_rate():
    codes = jnp.full((4000,), 2, jnp.int32)
    out = np.asarray(drop_condition(codes, 0.3, jax.random.key(3)))
    assert set(np.unique(out)) == {-1, 2}
    assert (out == -1).mean() == pytest.approx(0.3, abs=0.03)
    np.testing.assert_array_equal(np.asarray(drop_condition(codes, 0.0, jax.random.key(3))), 2)
    # the tower itself never drops it (the step does, so the loss knows): training and inference agree
    model = _model(condition_dropout=0.5)
    feats = {"age": np.zeros(8, np.int32), CONDITION: np.full(8, 2, np.int32)}
    np.testing.assert_array_equal(np.asarray(model.user(feats, jnp.zeros((8, 6)), dropout_rng=jax.random.key(1))),
                                  np.asarray(model.user(feats, jnp.zeros((8, 6)))))


def test_condition_config_errors():
    with pytest.raises(ConfigError, match="not an item feature"):
        _model(condition="colour")
    with pytest.raises(ConfigError, match="dense"):
        _model(condition="q")
    with pytest.raises(ConfigError, match="num_embeddings"):
        _model(use_history=True, num_embeddings=2)
    user = TowerConfig(use_history=False)
    with pytest.raises(ConfigError, match="user"):
        TwoTower(ModelConfig(user=user, item=TowerConfig(condition="genre")), [], [GENRE], rngs=nnx.Rngs(0))


def test_batches_carry_the_positives_value_and_draw_one_of_several():
    ds = load_data(smoke_cfg())
    cat = ds.item_features["category"]
    b = next(Batches(ds, batch_size=64, num_negatives=0, history_len=0, condition="category"))
    np.testing.assert_array_equal(b["user_feat"][CONDITION], cat[b["item"]])

    tags = ds.item_features["tags"]
    drawn = []
    it = Batches(ds, batch_size=64, num_negatives=4, history_len=2, condition="tags", seed=1)
    for _ in range(40):
        batch = next(it)
        c, items = batch["user_feat"][CONDITION], batch["item"]
        own = tags[items]
        has = (own >= 0).any(1)
        assert ((c[:, None] == own).any(1) | (~has & (c == -1))).all()   # one of the positive's own values
        drawn.append((c, own))
    # uniform over the item's values: for items with 2+ tags, the first slot is drawn about 1/count of the time
    c = np.concatenate([d[0] for d in drawn])
    own = np.concatenate([d[1] for d in drawn])
    count = (own >= 0).sum(1)
    two = count == 2
    assert two.sum() > 200
    assert np.mean(c[two] == own[two, 0]) == pytest.approx(0.5, abs=0.08)
    # the other arrays do not change with the condition, and two processes' halves make the whole batch
    plain = Batches(ds, batch_size=64, num_negatives=4, history_len=2, seed=1).batch_at(0)
    conditioned = Batches(ds, batch_size=64, num_negatives=4, history_len=2, condition="tags", seed=1).batch_at(0)
    for key in ("item", "neg_item", "history"):
        np.testing.assert_array_equal(plain[key], conditioned[key])
    whole = Batches(ds, batch_size=64, num_negatives=4, history_len=2, condition="tags", seed=1).batch_at(64)
    halves = [Batches(ds, batch_size=64, num_negatives=4, history_len=2, condition="tags", seed=1,
                      process_index=p, process_count=2).batch_at(64)["user_feat"][CONDITION] for p in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(halves), whole["user_feat"][CONDITION])


def test_conditional_model_trains_the_same_on_one_and_four_devices(tmp_path):
    state = trains_the_same_on_one_and_four_devices(
        tmp_path, "eval.at_end=false", "train.total_steps=3", "checkpoint.every_steps=3", "model.item.id_dropout=0.0",
        "model.user.condition=tags", "model.user.condition_dropout=0.0", launcher="pmap")
    # the tags table (7 values in the smoke data + 'none') is a user-tower parameter
    assert np.asarray(state["params"]["user"]["condition"]["embedding"]).shape[1] == 4


# ---------------------------------------------------------------- evaluation within each condition's items
def test_conditional_evaluation_matches_a_brute_force_reference():
    from eval.conditional import evaluate_conditional
    from eval.holdout import heldout_users
    ds = load_data(smoke_cfg())
    users = heldout_users(ds)
    rng = np.random.default_rng(0)
    item_emb = rng.normal(size=(ds.num_items, 6)).astype(np.float32)
    user_base = rng.normal(size=(ds.num_users, 6)).astype(np.float32)
    shift = rng.normal(size=(next(s.size for s in ds.item_feature_specs if s.name == "tags"), 6)).astype(np.float32)

    def embed(rows, codes):
        out = user_base[rows]
        return out if codes is None else out + shift[codes]

    got = evaluate_conditional(embed, item_emb, ds, users, "tags", [3, 10], post_filter_depths=(10, ds.num_items))
    tags = ds.item_features["tags"]
    seen_ind, seen = ds.seen_csr("test")
    truth_ind, truth = ds.heldout_csr("test")
    recalls = {"conditional": [], "post_filter": []}
    for u in users:
        held = set(truth[truth_ind[u]:truth_ind[u + 1]].tolist())
        excluded = set(seen[seen_ind[u]:seen_ind[u + 1]].tolist())
        for c in sorted({int(t) for i in held for t in tags[i] if t >= 0}):
            want = {i for i in held if c in tags[i]}
            cand = [i for i in range(ds.num_items) if c in tags[i] and i not in excluded]
            for method, q in (("conditional", embed(np.array([u]), np.array([c]))[0]), ("post_filter", user_base[u])):
                scores = item_emb[cand] @ q
                top = [cand[j] for j in sorted(range(len(cand)), key=lambda j: (-scores[j], cand[j]))[:10]]
                recalls[method].append(len(want & set(top)) / len(want))
    assert got["num_queries"] == len(recalls["conditional"])
    for method in recalls:
        assert got[method]["recall@10"] == pytest.approx(np.mean(recalls[method]), abs=1e-9)
    assert got["conditional"]["recall@10"] != got["post_filter"]["recall@10"]
    # post-filtering the whole ranking is the exact search within the value; a top-10 filtered holds less
    assert got[f"post_filter@{ds.num_items}"] == got["post_filter"]
    assert got["post_filter@10"]["recall@10"] < got["post_filter"]["recall@10"]
    assert sum(v["queries"] for v in got["per_value"]) == got["num_queries"]
    assert got["tail_values"] and set(got["tail_values"]) < {v["code"] for v in got["per_value"]}


# ---------------------------------------------------------------- the filtered softmax of training
def test_outside_condition_matches_numpy():
    from train.losses import outside_condition
    rng = np.random.default_rng(1)
    rows = np.array([0, 3, -1, 5], np.int32)
    values = rng.integers(-1, 6, (7, 3)).astype(np.int32)
    want = np.array([[r >= 0 and r not in v for v in values] for r in rows])
    np.testing.assert_array_equal(np.asarray(outside_condition(jnp.asarray(rows), jnp.asarray(values))), want)
    own = rng.integers(-1, 6, (4, 5, 2)).astype(np.int32)
    want = np.array([[r >= 0 and r not in v for v in own[i]] for i, r in enumerate(rows)])
    np.testing.assert_array_equal(np.asarray(outside_condition(jnp.asarray(rows), jnp.asarray(own))), want)


def test_filtered_softmax_is_the_softmax_over_the_rows_own_value():
    """Each row's loss is the cross entropy over its label and the candidates (in-batch, shared and own
    negatives) having the row's value, with log q; a row without a condition keeps every candidate."""
    from train.losses import retrieval_loss
    rng = np.random.default_rng(2)
    b, m, mr, d, t = 6, 4, 3, 5, 0.5
    q, c = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    neg, own = rng.normal(size=(m, d)), rng.normal(size=(b, mr, d))
    ids = np.arange(b) + 100
    neg_ids, own_ids = np.arange(m) + 200, np.arange(b * mr).reshape(b, mr) + 300
    logq, neg_logq, own_logq = rng.normal(size=b), rng.normal(size=m), rng.normal(size=(b, mr))
    c_val = rng.integers(-1, 3, (b, 2))
    c_val[:, 0] = rng.integers(0, 3, b)               # each positive has a value
    row = c_val[:, 0].copy()
    row[4] = -1                                       # a row fed no condition
    n_val, o_val = rng.integers(-1, 3, (m, 2)), rng.integers(-1, 3, (b, mr, 2))
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss_sum, count, _ = retrieval_loss(
        f(q), f(c), temperature=t, candidate_ids=jnp.asarray(ids), candidate_logq=f(logq), neg_c=f(neg),
        neg_ids=jnp.asarray(neg_ids), neg_logq=f(neg_logq), row_neg_c=f(own), row_neg_ids=jnp.asarray(own_ids),
        row_neg_logq=f(own_logq), row_condition=jnp.asarray(row), candidate_condition=jnp.asarray(c_val),
        neg_condition=jnp.asarray(n_val), row_neg_condition=jnp.asarray(o_val))
    total = 0.0
    for i in range(b):
        cols = [(q[i] @ c[j] / t - logq[j], row[i] < 0 or j == i or row[i] in c_val[j]) for j in range(b)]
        cols += [(q[i] @ neg[j] / t - neg_logq[j], row[i] < 0 or row[i] in n_val[j]) for j in range(m)]
        cols += [(q[i] @ own[i, j] / t - own_logq[i, j], row[i] < 0 or row[i] in o_val[i, j]) for j in range(mr)]
        kept = np.array([x for x, keep in cols if keep])
        total += np.log(np.exp(kept).sum()) - cols[i][0]
    assert float(count) == b
    assert float(loss_sum) == pytest.approx(total, rel=1e-5)
    plain, _, _ = retrieval_loss(
        f(q), f(c), temperature=t, candidate_ids=jnp.asarray(ids), candidate_logq=f(logq), neg_c=f(neg),
        neg_ids=jnp.asarray(neg_ids), neg_logq=f(neg_logq), row_neg_c=f(own), row_neg_ids=jnp.asarray(own_ids),
        row_neg_logq=f(own_logq))
    assert float(plain) > float(loss_sum)   # fewer negatives, smaller loss
