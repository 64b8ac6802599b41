"""Multi-embedding users: the interest clustering (max-min start, single-assignment routing, squash) against a
numpy forward written from the description in `towers.multi_interest`; padding never matters; K = 1 is the
history sum's direction; the user tower with K embeddings; the config checks; and the round-robin merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.types import FeatureSpec
from towers.config import ConfigError, ModelConfig, TowerConfig
from towers.multi_interest import InterestClustering, max_min_init
from towers.two_tower import TwoTower

RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------- numpy reference
def np_squash(z):
    sq = (z * z).sum(-1, keepdims=True)
    norm = np.sqrt(sq)
    return np.where(norm > 0, z * sq / (1 + sq) / np.where(norm > 0, norm, 1), 0.0)


def np_max_min(u, mask, k):
    """Farthest-point picks, one user at a time: first valid item, then the valid item farthest from its
    nearest pick (first position on ties)."""
    valid = np.flatnonzero(mask)
    if not len(valid):
        return [0] * k
    picks = [int(valid[0])]
    while len(picks) < k:
        d = np.array([min(((u[i] - u[p]) ** 2).sum() for p in picks) for i in valid])
        picks.append(int(valid[int(np.argmax(d))]))
    return picks


def np_route(e, mask, S, k, iters):
    """[H, d] history of one user -> [K, d] capsules."""
    u = e @ S
    caps = u[np_max_min(u, mask, k)]
    for _ in range(iters):
        z = np.zeros_like(caps)
        for i in np.flatnonzero(mask):
            z[int(np.argmax(caps @ u[i]))] += u[i]
        caps = np_squash(z)
    return caps


def _history(b=6, h=7, d=5, seed=0):
    r = np.random.default_rng(seed)
    e = r.normal(size=(b, h, d)).astype(np.float32)
    mask = r.random((b, h)) < 0.7
    mask[0] = False                  # no valid item
    mask[1] = False
    mask[1, 3] = True                # a single valid item
    mask[2] = True                   # every item valid
    return e, mask


@pytest.mark.parametrize("k,iters", [(1, 1), (3, 3), (4, 2)])
def test_clustering_matches_numpy(k, iters):
    e, mask = _history()
    mod = InterestClustering(e.shape[-1], k, iters, rngs=nnx.Rngs(0))
    got = np.asarray(mod(jnp.asarray(e), jnp.asarray(mask)))
    S = np.asarray(mod.bilinear.kernel[...], np.float64)
    want = np.stack([np_route(e[b].astype(np.float64), mask[b], S, k, iters) for b in range(len(e))])
    assert got.shape == (len(e), k, e.shape[-1])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got[0], 0.0)    # no valid history: zero capsules


def test_max_min_picks_spread_out_and_skip_padding():
    u = np.array([[[0.0, 0], [0.1, 0], [5, 5], [9, 9], [-4, 0]]], np.float32)
    mask = np.array([[True, True, True, False, True]])
    picks = np.asarray(max_min_init(jnp.asarray(u), jnp.asarray(mask), 3))
    np.testing.assert_array_equal(picks, [[0, 2, 4]])   # item 3 is farther but padding


def test_padding_items_never_affect_the_interests():
    e, mask = _history(seed=1)
    mod = InterestClustering(e.shape[-1], 3, 3, rngs=nnx.Rngs(1))
    base = np.asarray(mod(jnp.asarray(e), jnp.asarray(mask)))
    noisy = np.where(mask[..., None], e, np.random.default_rng(9).normal(size=e.shape) * 100).astype(np.float32)
    np.testing.assert_allclose(np.asarray(mod(jnp.asarray(noisy), jnp.asarray(mask))), base, rtol=1e-6, atol=1e-6)


def test_one_interest_is_the_history_sum_direction():
    e, mask = _history(seed=2)
    mod = InterestClustering(e.shape[-1], 1, 3, rngs=nnx.Rngs(2))
    got = np.asarray(mod(jnp.asarray(e), jnp.asarray(mask)))[:, 0]
    mean = (e * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    mapped = mean @ np.asarray(mod.bilinear.kernel[...])
    has = mask.any(1)
    cos = (got * mapped).sum(-1)[has] / np.linalg.norm(got[has], axis=-1) / np.linalg.norm(mapped[has], axis=-1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    assert (np.linalg.norm(got[has], axis=-1) < 1).all()


def test_gradients_reach_the_map_and_the_history_but_not_padding():
    e, mask = _history(seed=3)
    mod = InterestClustering(e.shape[-1], 3, 2, rngs=nnx.Rngs(3))
    g = jax.grad(lambda x: jnp.sum(mod(x, jnp.asarray(mask)) ** 2))(jnp.asarray(e))
    g = np.asarray(g)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[~mask], 0.0)
    assert np.abs(g[mask]).sum() > 0


# ---------------------------------------------------------------- the user tower with K embeddings
USER_SPECS = [FeatureSpec("age", "categorical", 4)]


def _model(k, **user):
    cfg = ModelConfig(id_dim=6, feature_dim=3, output_dim=4,
                      user=TowerConfig(use_history=True, num_embeddings=k, hidden=[5], **user))
    return TwoTower(cfg, USER_SPECS, [], rngs=nnx.Rngs(0))


def test_user_tower_gives_k_unit_embeddings_from_its_interests():
    e, mask = _history(b=5, h=7, d=6, seed=4)
    model = _model(3)
    feats = {"age": jnp.arange(5, dtype=jnp.int32) % 4}
    id_emb = jnp.asarray(np.random.default_rng(5).normal(size=(5, 6)), jnp.float32)
    q = np.asarray(model.user(feats, id_emb, jnp.asarray(e), jnp.asarray(mask)))
    assert q.shape == (5, 3, 4)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-5)
    # Reference: each interest concatenated with the id row and the feature embedding, then the MLP.
    caps = np.asarray(model.user.interests(jnp.asarray(e), jnp.asarray(mask)))
    f = np.asarray(model.user.features(feats)).reshape(5, -1)
    for k in range(3):
        x = jnp.asarray(np.concatenate([np.asarray(id_emb), caps[:, k], f], -1))
        want = np.asarray(model.user.mlp(x))
        want = want / np.linalg.norm(want, axis=-1, keepdims=True)
        np.testing.assert_allclose(q[:, k], want, rtol=1e-5, atol=1e-5)


def test_one_embedding_is_todays_tower():
    """num_embeddings=1 builds no clustering module: same parameters, same output as a config without it."""
    e, mask = _history(b=4, h=7, d=6, seed=6)
    a, b = _model(1), TwoTower(ModelConfig(id_dim=6, feature_dim=3, output_dim=4,
                                           user=TowerConfig(use_history=True, hidden=[5])), USER_SPECS, [],
                               rngs=nnx.Rngs(0))
    assert a.user.interests is None
    la, lb = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    assert len(la) == len(lb)
    feats = {"age": jnp.zeros(4, jnp.int32)}
    id_emb = jnp.ones((4, 6))
    np.testing.assert_array_equal(np.asarray(a.user(feats, id_emb, jnp.asarray(e), jnp.asarray(mask))),
                                  np.asarray(b.user(feats, id_emb, jnp.asarray(e), jnp.asarray(mask))))


def test_several_embeddings_need_the_history():
    with pytest.raises(ConfigError, match="use_history"):
        TwoTower(ModelConfig(user=TowerConfig(use_history=False, num_embeddings=2)), [], [], rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.item.num_embeddings"):
        TwoTower(ModelConfig(item=TowerConfig(use_history=True, num_embeddings=2)), [], [], rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- inference: K', round-robin merge, search
from towers.inference.multi import active_interests, merge_round_robin, multi_interest_topk  # noqa: E402


def np_round_robin(lists, k):
    out = []
    for r in range(max(len(x) for x in lists)):
        for x in lists:
            if r < len(x) and x[r] >= 0 and x[r] not in out and len(out) < k:
                out.append(int(x[r]))
    return out + [-1] * (k - len(out))


def test_round_robin_merge_hand_case():
    ids = np.array([[[5, 1, 2, 3], [1, 6, 7, 8], [-1, -1, -1, -1]],
                    [[4, 4 + 1, -1, -1], [-1, -1, -1, -1], [9, -1, -1, -1]]])
    np.testing.assert_array_equal(merge_round_robin(ids, 4), [[5, 1, 6, 2], [4, 9, 5, -1]])
    np.testing.assert_array_equal(merge_round_robin(ids, 6), [[5, 1, 6, 2, 7, 3], [4, 9, 5, -1, -1, -1]])


def test_round_robin_merge_matches_reference_and_fills_k():
    r = np.random.default_rng(7)
    k = 6
    lists = np.stack([np.stack([r.permutation(12)[:k] for _ in range(3)]) for _ in range(40)])
    lists[r.random(lists.shape) < 0.1] = -1
    got = merge_round_robin(lists, k)
    for u in range(len(lists)):
        assert got[u].tolist() == np_round_robin(lists[u].tolist(), k)
        if len(set(lists[u].ravel()) - {-1}) >= k:
            assert (got[u] >= 0).all()


def test_active_interests_rule():
    np.testing.assert_array_equal(active_interests([0, 4, 5, 9, 10, 50], 3, 5), [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(active_interests([0, 50], 3, 0), [3, 3])


def test_multi_interest_search_merges_exact_per_interest_lists_with_exclusions():
    from towers.inference.exact import exact_topk
    r = np.random.default_rng(8)
    items = r.normal(size=(30, 4)).astype(np.float32)
    users = r.normal(size=(5, 3, 4)).astype(np.float32)
    users[1, 2] = 0.0                         # an inactive interest
    indptr, ex = np.array([0, 2, 2, 3, 3, 5]), np.array([0, 1, 7, 3, 4])
    got = multi_interest_topk(users, items, 5, exact_topk, exclude_indptr=indptr, exclude_items=ex)
    for u in range(5):
        banned = set(ex[indptr[u]:indptr[u + 1]].tolist())
        lists = []
        for j in range(3):
            if j and not users[u, j].any():
                continue
            order = [int(i) for i in np.argsort(-(items @ users[u, j]), kind="stable") if int(i) not in banned]
            lists.append(order[:5])
        assert got[u].tolist() == np_round_robin(lists, 5)


def test_diversity_metrics_match_numpy():
    from eval.metrics import distinct_categories, intra_list_distance
    r = np.random.default_rng(9)
    emb = r.normal(size=(10, 3))
    ranked = np.array([[0, 1, 2, -1], [3, -1, -1, -1], [4, 5, 6, 7]])
    cats = np.array([[0, 1], [1, -1], [2, -1], [3, 3], [0, -1], [0, 2], [5, -1], [5, 0], [1, 1], [2, 2]])
    ild = intra_list_distance(ranked, emb, 4)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for u, row in enumerate(ranked):
        v = [i for i in row if i >= 0]
        d = [1 - unit[a] @ unit[b] for a in v for b in v if a != b]
        if d:
            np.testing.assert_allclose(ild[u], np.mean(d), rtol=1e-10)
        else:
            assert np.isnan(ild[u])
    np.testing.assert_array_equal(distinct_categories(ranked, cats, 4), [3, 1, 3])
    np.testing.assert_array_equal(distinct_categories(ranked, cats, 2), [2, 1, 2])


def test_k2_run_evaluates_with_merged_lists_and_reports_diversity(tmp_path):
    """The end-of-training evaluation of a K = 2 run goes through `embed_users` ([Q, K, d], K' applied) and
    the round-robin merge; users with a short history search only their first embedding."""
    from tests.helpers import smoke_cfg
    from train.loop import run
    cfg = smoke_cfg("train.total_steps=2", "model.user.use_history=true", "model.user.num_embeddings=2",
                    "model.user.history_per_interest=3", "train.launcher=jit", "train.num_devices=1")
    result = run(cfg, tmp_path)
    model = result["eval"]["model"] if "eval" in result else result["test"]["model"]
    assert 0 <= model["recall@10"] <= 1
    assert 0 < model["coverage@10"] <= 1 and 0 <= model["ild@10"] <= 2

    from data.batching import user_history
    from train.loop import load_data
    from towers.inference.embed import embed_users
    from towers.restore import load_trained
    trained, ds = load_trained(tmp_path), load_data(cfg)
    users = np.arange(40, dtype=np.int32)
    for h in (2, 5):    # K' = min(2, 1 + h // 3): 1 for a 2-item history, 2 for 5 items
        emb = embed_users(trained, ds, users, history_len=h)
        assert emb.shape == (40, 2, 8)
        lengths = (user_history(ds, users, h) >= 0).sum(1)
        np.testing.assert_array_equal(emb[:, 1].any(1), 1 + lengths // 3 >= 2)
        np.testing.assert_allclose(np.linalg.norm(emb[:, 0], axis=1), 1.0, atol=1e-5)

    # `python -m eval` on the run ranks the same merged lists as the end-of-training evaluation.
    from eval.config import validate as eval_validate
    from eval.run import run as eval_run
    m = eval_run(eval_validate({"run_dir": str(tmp_path), "ks": [5, 10], "out_dir": str(tmp_path / "report"),
                                "plots": False}))
    for key in ("recall@5", "recall@10", "ndcg@10"):
        assert m["methods"]["model"][key] == pytest.approx(model[key], abs=1e-9), key
