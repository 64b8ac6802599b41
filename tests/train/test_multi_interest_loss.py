"""The sampled softmax of a user with K embeddings: the positive's best-matching embedding ranks every candidate
(`losses.best_interest`), against a float64 numpy reference, on one device and across 4 fake devices, and a
whole training run with a K = 2 user tower on 1 device and on 4 devices giving the same model."""
import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import trains_the_same_on_one_and_four_devices
from tests.train.test_losses import NDEV, np_retrieval, rand
from train import losses


def np_best_interest(q, c):
    q, c = np.asarray(q, np.float64), np.asarray(c, np.float64)
    return np.stack([q[i, int(np.argmax(q[i] @ c[i]))] for i in range(len(q))])


def test_best_interest_picks_the_embedding_nearest_the_positive():
    q = jnp.array([[[1.0, 0], [0, 1]], [[1.0, 0], [0, 1]], [[0.5, 0.5], [0.5, 0.5]]])
    c = jnp.array([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(losses.best_interest(q, c)), [[1, 0], [0, 1], [0.5, 0.5]])
    flat = rand(1, 3, 2)
    assert losses.best_interest(flat, c) is flat   # one embedding per user: unchanged


def _case():
    """8 rows, K = 3 embeddings each, 4 shared negatives (1 per device), duplicate ids, one padding row."""
    q = rand(31, 8, 3, 4)
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    return dict(q=q, c=rand(32, 8, 4), neg_c=rand(33, NDEV, 4), candidate_ids=jnp.array([0, 1, 2, 0, 3, 4, 1, 5]),
                neg_ids=jnp.array([2, 9, 4, 8]), candidate_logq=jnp.log(8 * jnp.linspace(0.01, 0.2, 8)),
                neg_logq=jnp.full((NDEV,), jnp.log(NDEV / 100.0)),
                mask=jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32))


def _loss(axis_name=None):
    def f(q, c, neg_c, candidate_ids, neg_ids, candidate_logq, neg_logq, mask):
        loss_sum, count, _ = losses.retrieval_loss(
            losses.best_interest(q, c), c, temperature=0.2, candidate_ids=candidate_ids, neg_c=neg_c,
            neg_ids=neg_ids, candidate_logq=candidate_logq, neg_logq=neg_logq, mask=mask, axis_name=axis_name)
        return loss_sum, count
    return f


def test_multi_interest_softmax_matches_numpy():
    case = _case()
    got, count = jax.jit(_loss())(**case)
    cands = np.concatenate([case["c"], case["neg_c"]])
    ids = np.concatenate([case["candidate_ids"], case["neg_ids"]])
    logq = np.concatenate([case["candidate_logq"], case["neg_logq"]])
    qb = np_best_interest(case["q"], case["c"])
    real = np.asarray(case["mask"]) > 0
    # The padding row (7) is no candidate of the others: numpy drops its column by scoring it at -inf.
    cands_np = cands.astype(np.float64).copy()
    per_row = []
    for i in np.flatnonzero(real):
        keep_cols = np.ones(len(cands), bool)
        keep_cols[7] = False
        row = np_retrieval(qb[i:i + 1], cands_np[keep_cols], [i], temperature=0.2, logq=logq[keep_cols],
                           label_ids=ids[i:i + 1], cand_ids=ids[keep_cols])
        per_row.append(row[0])
    np.testing.assert_allclose(float(got), np.sum(per_row), rtol=1e-5)
    assert float(count) == real.sum()
    # Not the same as the first embedding, nor the mean of the K: the choice matters on this case.
    first = jax.jit(lambda **kw: _loss()(**dict(kw, q=kw["q"][:, :1])))(**case)[0]
    assert abs(float(first) - float(got)) > 1e-3


def test_multi_interest_loss_and_grads_pmap_match_single_device():
    case = _case()
    single = jax.jit(_loss())(**case)
    split = {k: v.reshape(NDEV, v.shape[0] // NDEV, *v.shape[1:]) for k, v in case.items()}
    per_device = jax.pmap(_loss("data"), axis_name="data")(**split)
    for got, want in zip(per_device, single):
        np.testing.assert_allclose(np.sum(got), want, rtol=1e-5)
    rest = list(case.values())[2:]
    grad_single = jax.jit(jax.grad(lambda q, c: _loss()(q, c, *rest)[0], argnums=(0, 1)))(case["q"], case["c"])
    grad_pmap = jax.pmap(jax.grad(lambda q, c, *r: _loss("data")(q, c, *r)[0], argnums=(0, 1)),
                         axis_name="data")(*split.values())
    for got, want in zip(grad_pmap, grad_single):
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6)
    # Only each real row's chosen embedding gets a gradient.
    g = np.asarray(grad_single[0])
    chosen = np.argmax(np.einsum("bkd,bd->bk", case["q"], case["c"]), axis=1)
    for i in range(8):
        others = [k for k in range(3) if k != chosen[i]]
        np.testing.assert_array_equal(g[i, others], 0.0)


def test_k2_user_tower_trains_the_same_on_one_and_four_devices(tmp_path):
    s1 = trains_the_same_on_one_and_four_devices(
        tmp_path, "eval.at_end=false", "train.total_steps=3", "checkpoint.every_steps=3", "model.item.id_dropout=0.0",
        "model.user.use_history=true", "model.user.num_embeddings=2", "model.user.interest_routing_iters=2",
        "model.user.hidden=[8]")
    bilinear = [k for k in jax.tree_util.tree_flatten_with_path(s1)[0] if "interests" in jax.tree_util.keystr(k[0])]
    assert bilinear, "the clustering module's map is part of the trained state"
