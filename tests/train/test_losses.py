"""The retrieval loss chain against float64 numpy references, on one device and across 4 fake devices."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from train import losses

NDEV = 4


# ---------------------------------------------------------------- numpy references
def np_log_softmax_ce(logits, label_cols, keep=None):
    """Per-row CE over the columns in `keep` (bool [B, C]); dropped columns are removed, not masked."""
    out = []
    for i, row in enumerate(np.asarray(logits, np.float64)):
        kept = row if keep is None else row[keep[i]]
        m = kept.max()
        out.append(m + math.log(np.exp(kept - m).sum()) - row[label_cols[i]])
    return np.array(out)


def np_accidental_hits(label_ids, cand_ids, label_cols):
    hits = np.zeros((len(label_ids), len(cand_ids)), bool)
    for i, lid in enumerate(label_ids):
        for j, cid in enumerate(cand_ids):
            hits[i, j] = cid == lid and j != label_cols[i]
    return hits


def np_retrieval(q, cands, label_cols, *, temperature=1.0, logq=None, label_ids=None, cand_ids=None):
    logits = np.asarray(q, np.float64) @ np.asarray(cands, np.float64).T / temperature
    if logq is not None:
        logits = logits - np.asarray(logq, np.float64)[None, :]
    keep = None if label_ids is None else ~np_accidental_hits(label_ids, cand_ids, label_cols)
    return np_log_softmax_ce(logits, label_cols, keep)


# One compiled program per call signature: much faster than op-by-op dispatch on a 2-core CPU.
retrieval_loss = jax.jit(losses.retrieval_loss, static_argnames=(
    "temperature", "axis_name", "remove_accidental_hits", "gather_negatives", "num_hard_negatives", "recall_ks",
    "in_batch_negatives", "loss_type", "ccl_margin", "ccl_negative_weight", "negative_power"))


def rand(key, *shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


# ---------------------------------------------------------------- the small functions
def test_scores_and_temperature_match_numpy():
    q, c = rand(0, 3, 5), rand(1, 7, 5)
    np.testing.assert_allclose(losses.scores(q, c), np.asarray(q) @ np.asarray(c).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.apply_temperature(losses.scores(q, c), 0.1),
                               np.asarray(q) @ np.asarray(c).T / 0.1, rtol=1e-5, atol=1e-5)
    assert losses.scores(q.astype(jnp.bfloat16), c.astype(jnp.bfloat16)).dtype == jnp.float32


def test_logq_correction_subtracts_and_lowers_popular_candidates():
    logits = rand(2, 3, 4)
    logq = jnp.log(jnp.array([0.01, 0.1, 1.0, 5.0]))
    out = losses.apply_logq_correction(logits, logq)
    np.testing.assert_allclose(out, np.asarray(logits) - np.log([0.01, 0.1, 1.0, 5.0])[None, :], rtol=1e-6)
    # The popular candidate (expected count 5) goes down, the rare one (0.01) goes up.
    assert np.all(out[:, 3] < logits[:, 3]) and np.all(out[:, 0] > logits[:, 0])


def test_log_expected_count():
    np.testing.assert_allclose(losses.log_expected_count(jnp.array([0.5, 0.01]), 8), np.log([4.0, 0.08]),
                               rtol=1e-6)


def test_accidental_hits_and_softmax_cross_entropy_match_numpy():
    label_ids = np.array([5, 7, 5, 9])
    cand_ids = np.array([5, 7, 5, 9, 7, 11])
    label_cols = np.arange(4)
    hits = losses.accidental_hits(jnp.array(label_ids), jnp.array(cand_ids), jnp.array(label_cols))
    np.testing.assert_array_equal(hits, np_accidental_hits(label_ids, cand_ids, label_cols))
    assert int(hits.sum()) == 3  # (0, 2), (2, 0), (1, 4)
    logits = rand(3, 4, 6)
    masked = losses.mask_accidental_hits(logits, jnp.array(label_ids), jnp.array(cand_ids), jnp.array(label_cols))
    np.testing.assert_array_equal(np.asarray(masked)[~np.asarray(hits)], np.asarray(logits)[~np.asarray(hits)])
    assert np.all(np.asarray(masked)[np.asarray(hits)] < -1e37)
    ce = losses.softmax_cross_entropy(masked, jnp.array(label_cols))
    np.testing.assert_allclose(ce, np_log_softmax_ce(logits, label_cols, ~np.asarray(hits)), rtol=1e-5)


def test_hard_negative_mining_matches_numpy():
    logits, label_cols = rand(4, 5, 8), np.array([0, 3, 7, 2, 2])
    kept, new_cols = losses.hard_negative_mining(logits, jnp.array(label_cols), 3)
    assert kept.shape == (5, 4) and np.all(new_cols == 0)
    x = np.asarray(logits)
    for i, col in enumerate(label_cols):
        others = np.delete(x[i], col)
        np.testing.assert_allclose(kept[i], [x[i, col], *np.sort(others)[::-1][:3]], rtol=1e-6)
    with pytest.raises(ValueError, match="num_hard=8"):
        losses.hard_negative_mining(logits, jnp.array(label_cols), 8)


def test_in_batch_recall_hits_matches_numpy():
    logits, label_cols = rand(5, 16, 10), np.arange(16) % 10
    order = np.argsort(-np.asarray(logits), axis=1)
    for k in (1, 3, 10):
        expected = sum(label_cols[i] in order[i, :k] for i in range(16))
        assert float(losses.in_batch_recall_hits(logits, jnp.array(label_cols), k)) == expected
    mask = (np.arange(16) < 10).astype(np.float32)
    expected = sum(label_cols[i] in order[i, :3] for i in range(10))
    assert float(losses.in_batch_recall_hits(logits, jnp.array(label_cols), 3, jnp.array(mask))) == expected


# ---------------------------------------------------------------- retrieval_loss, one device
def test_hand_computed_2x3():
    # logits = q @ [c; neg_c].T = [[2, 0, 1], [0, 3, 1]], labels on the diagonal:
    # row 0: log(e^2 + e^0 + e^1) - 2 = 0.4076060, row 1: log(e^0 + e^3 + e^1) - 3 = 0.1698460.
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    c = jnp.array([[2.0, 0.0], [0.0, 3.0]])
    neg = jnp.array([[1.0, 1.0]])
    loss_sum, count, extras = retrieval_loss(q, c, neg_c=neg, temperature=1.0, remove_accidental_hits=False)
    np.testing.assert_allclose(loss_sum, 0.40760596 + 0.16984602, rtol=1e-6)
    assert float(count) == 2.0 and float(extras["pos_score_sum"]) == 5.0
    # Temperature 0.5 and log q = [log 0.5, log 2, 0]: row 0 logits [4 - log .5, 0 - log 2, 2] -> 0.0697560,
    # row 1 logits [0 - log .5, 6 - log 2, 2] -> 0.0454955.
    loss_sum, _, _ = retrieval_loss(q, c, neg_c=neg, temperature=0.5, remove_accidental_hits=False,
                                           candidate_logq=jnp.log(jnp.array([0.5, 2.0])), neg_logq=jnp.zeros(1))
    np.testing.assert_allclose(loss_sum, 0.06975603 + 0.04549549, rtol=1e-5)


def test_whole_corpus_equals_full_softmax():
    # Items 0..2 are the batch positives, items 3..5 the negatives: every item is a candidate exactly once.
    items, q = rand(6, 6, 4), rand(7, 3, 4)
    loss_sum, count, _ = retrieval_loss(q, items[:3], neg_c=items[3:], temperature=0.2,
                                               remove_accidental_hits=False)
    full = np.asarray(q, np.float64) @ np.asarray(items, np.float64).T / 0.2
    expected = sum(np.log(np.exp(full[i]).sum()) - full[i, i] for i in range(3))
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)
    assert float(count) == 3


def test_logq_sign_helps_rare_positive():
    # Equal scores everywhere. Row 0's positive is rare (log q = log .02), row 1's popular (log q = log 1.8).
    # Subtracting log q raises the rare positive and lowers the popular negative, so row 0's loss drops below
    # log 2 (the uncorrected value); adding log q would push it above.
    q, c = jnp.ones((2, 3)), jnp.ones((2, 3))
    logq = jnp.log(jnp.array([0.02, 1.8]))
    loss_sum, _, _ = retrieval_loss(q[:1], c[:1], neg_c=c[1:], temperature=1.0, candidate_logq=logq[:1],
                                           neg_logq=logq[1:], remove_accidental_hits=False)
    assert float(loss_sum) < 0.1  # adding log q instead would give log(1 + 1.8 / .02) = 4.5
    np.testing.assert_allclose(loss_sum, np.log1p(0.02 / 1.8), rtol=1e-5)  # = log(1 + e^(log .02 - log 1.8))


def test_accidental_hits_are_masked_except_the_label():
    ids = np.array([5, 7, 5, 9])
    neg_ids = np.array([7, 11])
    q, c, neg = rand(8, 4, 3), rand(9, 4, 3), rand(10, 2, 3)
    loss_sum, _, extras = retrieval_loss(q, c, neg_c=neg, temperature=0.5, candidate_ids=jnp.array(ids),
                                                neg_ids=jnp.array(neg_ids))
    cands, cand_ids = np.concatenate([c, neg]), np.concatenate([ids, neg_ids])
    expected = np_retrieval(q, cands, np.arange(4), temperature=0.5, label_ids=ids, cand_ids=cand_ids)
    np.testing.assert_allclose(loss_sum, expected.sum(), rtol=1e-5)
    assert float(extras["accidental_hits_sum"]) == 3
    unmasked, _, _ = retrieval_loss(q, c, neg_c=neg, temperature=0.5, remove_accidental_hits=False)
    assert abs(float(unmasked) - float(loss_sum)) > 1e-3


def test_mixed_negatives_with_logq_match_numpy():
    b, m, n_items = 6, 5, 50
    q, c, neg = rand(11, b, 4), rand(12, b, 4), rand(13, m, 4)
    ids = np.array([3, 8, 3, 20, 31, 8])
    neg_ids = np.array([8, 40, 41, 3, 42])
    freq = np.linspace(0.001, 0.05, n_items)
    logq = np.log(b * freq[ids])
    neg_logq = np.full(m, np.log(m / n_items))
    loss_sum, count, _ = retrieval_loss(
        q, c, temperature=0.3, candidate_ids=jnp.array(ids), candidate_logq=jnp.array(logq, jnp.float32),
        neg_c=neg, neg_ids=jnp.array(neg_ids), neg_logq=jnp.array(neg_logq, jnp.float32))
    expected = np_retrieval(q, np.concatenate([c, neg]), np.arange(b), temperature=0.3,
                            logq=np.concatenate([logq, neg_logq]), label_ids=ids,
                            cand_ids=np.concatenate([ids, neg_ids]))
    np.testing.assert_allclose(loss_sum, expected.sum(), rtol=1e-5)
    assert float(count) == b


def test_mask_removes_padding_rows_and_columns():
    q, c, neg = rand(14, 5, 3), rand(15, 5, 3), rand(16, 2, 3)
    ids = jnp.array([1, 2, 3, 0, 0])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    padded = retrieval_loss(q, c, neg_c=neg, temperature=0.5, candidate_ids=ids, neg_ids=jnp.array([4, 5]),
                                   mask=mask, recall_ks=(1,))
    real = retrieval_loss(q[:3], c[:3], neg_c=neg, temperature=0.5, candidate_ids=ids[:3],
                                 neg_ids=jnp.array([4, 5]), recall_ks=(1,))
    np.testing.assert_allclose(padded[0], real[0], rtol=1e-6)
    assert float(padded[1]) == 3.0
    for key in real[2]:
        np.testing.assert_allclose(padded[2][key], real[2][key], rtol=1e-6)
    grads = jax.grad(lambda q: retrieval_loss(q, c, temperature=0.5, remove_accidental_hits=False,
                                                     mask=mask)[0])(q)
    assert np.all(np.asarray(grads)[3:] == 0) and np.any(np.asarray(grads)[:3] != 0)


def test_hard_negatives_in_retrieval_loss():
    q, c = rand(17, 4, 3), rand(18, 4, 3)
    loss_sum, _, _ = retrieval_loss(q, c, temperature=1.0, remove_accidental_hits=False,
                                           num_hard_negatives=1)
    logits = np.asarray(q, np.float64) @ np.asarray(c, np.float64).T
    expected = 0.0
    for i in range(4):
        hardest = np.max(np.delete(logits[i], i))
        expected += np.logaddexp(logits[i, i], hardest) - logits[i, i]
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)


def test_bfloat16_inputs_give_a_finite_loss():
    q, c = rand(19, 4, 8).astype(jnp.bfloat16), rand(20, 4, 8).astype(jnp.bfloat16)
    loss_sum, _, _ = retrieval_loss(q, c, temperature=0.05, candidate_ids=jnp.array([1, 1, 2, 2]))
    assert np.isfinite(float(loss_sum))


def test_errors_are_clear():
    q, c = jnp.ones((4, 3)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match="remove_accidental_hits=True needs item ids"):
        losses.retrieval_loss(q, c, temperature=1.0)
    with pytest.raises(ValueError, match=r"q has shape \(4, 3\) and c has shape \(5, 3\)"):
        losses.retrieval_loss(q, jnp.ones((5, 3)), temperature=1.0, remove_accidental_hits=False)
    with pytest.raises(ValueError, match=r"candidate_ids has shape \(3,\).*needs shape \(4,\)"):
        losses.retrieval_loss(q, c, temperature=1.0, candidate_ids=jnp.arange(3))
    with pytest.raises(ValueError, match="temperature=0.0 must be > 0"):
        losses.retrieval_loss(q, c, temperature=0.0, remove_accidental_hits=False)
    with pytest.raises(ValueError, match="needs both candidate_logq and neg_logq"):
        losses.retrieval_loss(q, c, temperature=1.0, remove_accidental_hits=False, neg_c=jnp.ones((2, 3)),
                              candidate_logq=jnp.zeros(4))
    with pytest.raises(ValueError, match="neg_ids/neg_logq were given without neg_c"):
        losses.retrieval_loss(q, c, temperature=1.0, candidate_ids=jnp.arange(4), neg_ids=jnp.arange(2))
    with pytest.raises(ValueError, match=r"neg_c has shape \(2, 5\)"):
        losses.retrieval_loss(q, c, temperature=1.0, remove_accidental_hits=False, neg_c=jnp.ones((2, 5)))


# ---------------------------------------------------------------- across 4 devices
def _global_case():
    """A global batch of 8 rows (2 per device) with duplicate ids across devices and 4 negatives (1 per device)."""
    q, c, neg = rand(21, 8, 4), rand(22, 8, 4), rand(23, NDEV, 4)
    ids = jnp.array([0, 1, 2, 0, 3, 4, 1, 5])
    neg_ids = jnp.array([2, 9, 4, 8])
    logq = jnp.log(8 * jnp.linspace(0.01, 0.2, 8))
    neg_logq = jnp.full((NDEV,), jnp.log(NDEV / 100.0))
    mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32)
    return dict(q=q, c=c, neg_c=neg, candidate_ids=ids, neg_ids=neg_ids, candidate_logq=logq, neg_logq=neg_logq,
                mask=mask)


def _loss(axis_name=None, **kw):
    def f(q, c, neg_c, candidate_ids, neg_ids, candidate_logq, neg_logq, mask):
        loss_sum, count, extras = losses.retrieval_loss(
            q, c, temperature=0.2, candidate_ids=candidate_ids, neg_c=neg_c, neg_ids=neg_ids,
            candidate_logq=candidate_logq, neg_logq=neg_logq, mask=mask, axis_name=axis_name, recall_ks=(2,), **kw)
        return loss_sum, count, extras["accidental_hits_sum"], extras["hits@2_sum"]
    return f


def test_pmap_matches_single_device_loss_and_grads():
    assert jax.device_count() >= NDEV, "tests/conftest.py should provide 4 fake CPU devices"
    case = _global_case()
    single = jax.jit(_loss())(**case)
    split = {k: v.reshape(NDEV, v.shape[0] // NDEV, *v.shape[1:]) for k, v in case.items()}
    per_device = jax.pmap(_loss("data"), axis_name="data")(**split)
    for got, want in zip(per_device, single):
        np.testing.assert_allclose(np.sum(got), want, rtol=1e-5)
    assert float(single[2]) > 0  # the case really has cross-device accidental hits

    # pmap's gradient of each device's loss sums the other devices' terms through all_gather's transpose.
    grad_single = jax.jit(jax.grad(lambda q, c: _loss()(q, c, *list(case.values())[2:])[0], argnums=(0, 1)))(
        case["q"], case["c"])
    grad_fn = jax.pmap(jax.grad(lambda q, c, *rest: _loss("data")(q, c, *rest)[0], argnums=(0, 1)),
                       axis_name="data")
    grad_pmap = grad_fn(*split.values())
    for got, want in zip(grad_pmap, grad_single):
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6)


def test_shard_map_matches_single_device_loss():
    case = _global_case()
    single = jax.jit(_loss())(**case)
    mesh = jax.make_mesh((NDEV,), ("data",))

    def body(*args):
        return tuple(jax.lax.psum(x, "data") for x in _loss("data")(*args))

    args = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in case.values()]
    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"), out_specs=P()))(*args)
    for got, want in zip(sharded, single):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mixture_logq_is_the_expected_count_in_both_samples():
    from train.step import StepConfig, candidate_logq

    B, M, N = 8, 4, 50
    p_pos = np.array([0.5, 0.2, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])
    p_neg = np.array([0.5, 1e-4, 0.01, 0.2])
    local = {"item_logq": jnp.log(jnp.asarray(p_pos, jnp.float32)),
             "neg_item_logq": jnp.log(jnp.asarray(p_neg, jnp.float32)), "neg_item": jnp.zeros(M, jnp.int32)}
    per_source = StepConfig(1.0, B, M, N, True, True, 0.0, False, True, False)
    pos, neg, row = candidate_logq(local, per_source)
    assert row is None
    np.testing.assert_allclose(pos, np.log(B * p_pos), rtol=1e-5)
    np.testing.assert_allclose(neg, np.full(M, np.log(M / N)), rtol=1e-5)
    mixture = StepConfig(1.0, B, M, N, True, True, 0.0, False, True, False, logq_mixture=True)
    pos, neg, _ = candidate_logq(local, mixture)
    np.testing.assert_allclose(pos, np.log(B * p_pos + M / N), rtol=1e-5)
    np.testing.assert_allclose(neg, np.log(B * p_neg + M / N), rtol=1e-5)
    # The rare negative's correction is about the uniform sampler's; a popular one's about the data's.
    assert abs(float(neg[1]) - np.log(M / N)) < 0.01 and abs(float(neg[0]) - np.log(B * 0.5)) < 0.1
    # Without uniform negatives the union is the batch alone.
    pos, _, _ = candidate_logq(local, StepConfig(1.0, B, 0, N, True, True, 0.0, False, True, False, logq_mixture=True))
    np.testing.assert_allclose(pos, np.log(B * p_pos), rtol=1e-5)
    # Uniform negatives only: every candidate, the label too, has the uniform sampler's constant count.
    pos, neg, _ = candidate_logq(local, StepConfig(1.0, B, M, N, True, True, 0.0, False, True, False,
                                                in_batch_negatives=False))
    np.testing.assert_allclose(pos, np.full(B, np.log(M / N)), rtol=1e-5)
    np.testing.assert_allclose(neg, np.full(M, np.log(M / N)), rtol=1e-5)


# ---------------------------------------------------------------- CCL and uniform-only negatives
def unit(key, *shape):
    x = rand(key, *shape)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def np_ccl(q, cands, label_cols, keep, margin, weight):
    """Per-row CCL by loops: keep[i, j] says whether column j is a negative of row i."""
    cos = np.asarray(q, np.float64) @ np.asarray(cands, np.float64).T
    out = []
    for i in range(len(q)):
        negs = [max(cos[i, j] - margin, 0.0) for j in range(cos.shape[1]) if keep[i, j] and j != label_cols[i]]
        out.append(max(1.0 - cos[i, label_cols[i]], 0.0) + (weight * np.mean(negs) if negs else 0.0))
    return np.array(out)


def test_ccl_hand_computed():
    # One row, cosines: label 0.6, negatives 0.95, 0.2, 0.9 (at the margin: costs nothing).
    raw = jnp.array([[0.6, 0.95, 0.2, 0.9]])
    removed = jnp.zeros((1, 4), bool)
    got = losses.cosine_contrastive_loss(raw, jnp.array([0]), removed, margin=0.9, negative_weight=3.0)
    np.testing.assert_allclose(got, [0.4 + 3.0 * (0.05 + 0.0 + 0.0) / 3], rtol=1e-6)
    # A removed column leaves the mean (it is not averaged in as a zero).
    removed = removed.at[0, 2].set(True)
    got = losses.cosine_contrastive_loss(raw, jnp.array([0]), removed, margin=0.9, negative_weight=3.0)
    np.testing.assert_allclose(got, [0.4 + 3.0 * 0.05 / 2], rtol=1e-6)


def test_ccl_in_retrieval_loss_matches_numpy_with_hits_and_padding():
    b, m = 6, 5
    q, c, neg = unit(21, b, 8), unit(22, b, 8), unit(23, m, 8)
    ids = np.array([3, 8, 3, 20, 31, 8])
    neg_ids = np.array([8, 40, 41, 3, 42])
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
    cand_ids = np.concatenate([ids, neg_ids])
    keep = ~np_accidental_hits(ids, cand_ids, np.arange(b))
    keep[:, 5] = False  # the padding row is nobody's negative
    for in_batch in (True, False):
        k = keep.copy()
        if not in_batch:
            k[:, :b] = False
        loss_sum, count, _ = retrieval_loss(
            q, c, temperature=0.1, candidate_ids=jnp.array(ids), neg_c=neg, neg_ids=jnp.array(neg_ids),
            mask=jnp.array(mask), loss_type="ccl", ccl_margin=0.2, ccl_negative_weight=7.0,
            in_batch_negatives=in_batch)
        want = np_ccl(q, np.concatenate([c, neg]), np.arange(b), k, 0.2, 7.0)
        np.testing.assert_allclose(loss_sum, (want * mask).sum(), rtol=1e-5)
        assert float(count) == 5
    # Without in-batch negatives the loss really changes (the case has in-batch cosines above the margin).
    with_ib = retrieval_loss(q, c, temperature=0.1, candidate_ids=jnp.array(ids), neg_c=neg,
                             neg_ids=jnp.array(neg_ids), loss_type="ccl", ccl_margin=0.2)[0]
    without = retrieval_loss(q, c, temperature=0.1, candidate_ids=jnp.array(ids), neg_c=neg,
                             neg_ids=jnp.array(neg_ids), loss_type="ccl", ccl_margin=0.2,
                             in_batch_negatives=False)[0]
    assert abs(float(with_ib) - float(without)) > 1e-3


def test_uniform_only_softmax_matches_numpy():
    b, m = 5, 6
    q, c, neg = rand(31, b, 4), rand(32, b, 4), rand(33, m, 4)
    ids, neg_ids = np.array([1, 2, 3, 4, 5]), np.array([9, 2, 10, 11, 12, 13])
    loss_sum, _, extras = retrieval_loss(q, c, temperature=0.5, candidate_ids=jnp.array(ids), neg_c=neg,
                                         neg_ids=jnp.array(neg_ids), in_batch_negatives=False, recall_ks=(1,))
    cand_ids = np.concatenate([ids, neg_ids])
    keep = ~np_accidental_hits(ids, cand_ids, np.arange(b))
    keep[:, :b] = np.eye(b, dtype=bool)  # of the in-batch columns only the row's own label stays
    logits = np.asarray(q, np.float64) @ np.concatenate([c, neg]).T / 0.5
    np.testing.assert_allclose(loss_sum, np_log_softmax_ce(logits, np.arange(b), keep).sum(), rtol=1e-5)
    # The in-batch recall metric still ranks against every real candidate.
    ranking = np.where(np_accidental_hits(ids, cand_ids, np.arange(b)), -np.inf, logits)
    want_hits = sum(int((ranking[i] > ranking[i, i]).sum() < 1) for i in range(b))
    assert float(extras["hits@1_sum"]) == want_hits


def test_ccl_and_uniform_only_errors():
    q, c = unit(41, 3, 4), unit(42, 3, 4)
    with pytest.raises(ValueError, match="loss_type"):
        losses.retrieval_loss(q, c, temperature=1.0, remove_accidental_hits=False, loss_type="bpr")
    with pytest.raises(ValueError, match="in_batch_negatives=False"):
        losses.retrieval_loss(q, c, temperature=1.0, remove_accidental_hits=False, in_batch_negatives=False)
    with pytest.raises(ValueError, match="num_hard_negatives"):
        losses.retrieval_loss(q, c, temperature=1.0, remove_accidental_hits=False, loss_type="ccl",
                              num_hard_negatives=1)


@pytest.mark.parametrize("kw", [dict(loss_type="ccl", ccl_margin=0.0, ccl_negative_weight=2.0),
                                dict(loss_type="ccl", ccl_margin=0.0, in_batch_negatives=False),
                                dict(in_batch_negatives=False)])
def test_ccl_and_uniform_only_pmap_match_single_device(kw):
    case = _global_case()
    single = jax.jit(_loss(**kw))(**case)
    split = {k: v.reshape(NDEV, v.shape[0] // NDEV, *v.shape[1:]) for k, v in case.items()}
    per_device = jax.pmap(_loss("data", **kw), axis_name="data")(**split)
    for got, want in zip(per_device, single):
        np.testing.assert_allclose(np.sum(got), want, rtol=1e-5)
    assert float(single[0]) != float(jax.jit(_loss())(**case)[0])  # not the default loss by accident


# ---------------------------------------------------------------- BSL, per-row negatives, user dropout
def np_bsl(logits, label_cols, keep, power):
    """Per-row -log(e^label / (e^label + (sum over kept non-label columns of e^z)^power)), in float64."""
    out = []
    for i, row in enumerate(np.asarray(logits, np.float64)):
        negs = [row[j] for j in range(len(row)) if keep[i, j] and j != label_cols[i]]
        neg_lse = np.logaddexp.reduce(negs) if negs else -np.inf
        out.append(np.logaddexp(0.0, power * neg_lse - row[label_cols[i]]))
    return np.array(out)


def test_bsl_cross_entropy_matches_numpy_and_power_one_is_the_softmax():
    logits = rand(51, 5, 7) * 3
    labels = jnp.array([0, 3, 6, 2, 1])
    keep = np.ones((5, 7), bool)
    keep[1, 4] = keep[2, 0] = False
    masked = jnp.where(jnp.asarray(keep), logits, losses.masked_value(jnp.float32))
    for power in (1.22, 0.7):
        np.testing.assert_allclose(losses.bsl_cross_entropy(masked, labels, power),
                                   np_bsl(logits, np.asarray(labels), keep, power), rtol=1e-5)
    np.testing.assert_allclose(losses.bsl_cross_entropy(masked, labels, 1.0),
                               np_log_softmax_ce(logits, np.asarray(labels), keep), rtol=1e-5)
    # A row whose every negative is masked costs nothing, with finite gradients.
    lonely = jnp.where(jnp.arange(7)[None, :] == 2, 1.0, losses.masked_value(jnp.float32))
    assert float(losses.bsl_cross_entropy(lonely, jnp.array([2]), 1.5)[0]) == 0.0
    assert np.all(np.isfinite(jax.grad(lambda z: losses.bsl_cross_entropy(z, jnp.array([2]), 1.5).sum())(lonely)))


def test_bsl_in_retrieval_loss_matches_numpy_with_logq_and_hits():
    b, m = 6, 5
    q, c, neg = rand(52, b, 4), rand(53, b, 4), rand(54, m, 4)
    ids, neg_ids = np.array([3, 8, 3, 20, 31, 8]), np.array([8, 40, 41, 3, 42])
    logq = np.log(b * np.linspace(0.01, 0.3, b))
    neg_logq = np.full(m, np.log(m / 50))
    kw = dict(temperature=0.3, candidate_ids=jnp.array(ids), candidate_logq=jnp.array(logq, jnp.float32),
              neg_c=neg, neg_ids=jnp.array(neg_ids), neg_logq=jnp.array(neg_logq, jnp.float32))
    loss_sum, _, _ = retrieval_loss(q, c, negative_power=1.22, **kw)
    cand_ids = np.concatenate([ids, neg_ids])
    logits = (np.asarray(q, np.float64) @ np.concatenate([c, neg]).T / 0.3
              - np.concatenate([logq, neg_logq])[None, :])
    keep = ~np_accidental_hits(ids, cand_ids, np.arange(b))
    np.testing.assert_allclose(loss_sum, np_bsl(logits, np.arange(b), keep, 1.22).sum(), rtol=1e-5)
    # Power 1 is the default softmax to the bit, and another power really changes the loss.
    assert float(retrieval_loss(q, c, negative_power=1.0, **kw)[0]) == float(retrieval_loss(q, c, **kw)[0])
    assert abs(float(loss_sum) - float(retrieval_loss(q, c, **kw)[0])) > 1e-2
    with pytest.raises(ValueError, match="negative_power=0.0 must be > 0"):
        losses.retrieval_loss(q, c, negative_power=0.0, **kw)


def _row_case(b=8, m=4, per_row=3, seed=60):
    """Shared and per-row negatives with accidental hits in both (ids small so they collide)."""
    q, c, neg = rand(seed, b, 4), rand(seed + 1, b, 4), rand(seed + 2, m, 4)
    row_neg = rand(seed + 3, b, per_row, 4)
    ids = jnp.array([0, 1, 2, 0, 3, 4, 1, 5][:b])
    neg_ids = jnp.array([2, 9, 4, 8][:m])
    row_ids = jnp.array(np.random.default_rng(seed).integers(0, 6, (b, per_row)), jnp.int32)
    row_ids = row_ids.at[0, 1].set(0).at[3, 2].set(0)  # rows 0 and 3 (item 0) draw their own positive
    logq = jnp.log(b * jnp.linspace(0.01, 0.2, b))
    neg_logq = jnp.full((m,), jnp.log(m / 100.0))
    row_logq = jnp.log(per_row / 100.0 + jnp.linspace(0.0, 0.1, b * per_row).reshape(b, per_row))
    mask = jnp.array([1, 1, 1, 1, 1, 1, 1, 0][:b], jnp.float32)
    return dict(q=q, c=c, neg_c=neg, candidate_ids=ids, neg_ids=neg_ids, candidate_logq=logq, neg_logq=neg_logq,
                mask=mask, row_neg_c=row_neg, row_neg_ids=row_ids, row_neg_logq=row_logq)


def np_row_retrieval(case, temperature, power=1.0):
    """Per-row loss by loops: row i's candidates are the batch, the shared negatives and row i's own."""
    f = {k: np.asarray(v, np.float64) for k, v in case.items()}
    b = len(f["q"])
    out = []
    for i in range(b):
        cands = np.concatenate([f["c"], f["neg_c"], f["row_neg_c"][i]])
        ids = np.concatenate([f["candidate_ids"], f["neg_ids"], f["row_neg_ids"][i]])
        logq = np.concatenate([f["candidate_logq"], f["neg_logq"], f["row_neg_logq"][i]])
        logits = cands @ f["q"][i] / temperature - logq
        keep = (ids != ids[i]) | (np.arange(len(ids)) == i)
        keep[:b] &= (f["mask"] > 0) | (np.arange(b) == i)
        out.append(np_bsl(logits[None], [i], keep[None], power)[0])
    return np.array(out)


def test_row_negatives_match_numpy_with_logq_hits_and_padding():
    case = _row_case()
    mask = np.asarray(case["mask"])
    for power in (1.0, 1.3):
        loss_sum, count, extras = retrieval_loss(temperature=0.2, negative_power=power, recall_ks=(2,), **case)
        want = np_row_retrieval(case, 0.2, power)
        np.testing.assert_allclose(loss_sum, (want * mask).sum(), rtol=1e-5)
        assert float(count) == 7
    # Each row's own hits are masked in its row only: the two planted ones, besides those drawn at random.
    row_ids, ids = np.asarray(case["row_neg_ids"]), np.asarray(case["candidate_ids"])
    shared_hits = np_accidental_hits(ids, np.concatenate([ids, case["neg_ids"]]), np.arange(8))
    want_hits = ((row_ids == ids[:, None]).sum(1) + shared_hits.sum(1)) @ mask
    assert float(extras["accidental_hits_sum"]) == want_hits and (row_ids == ids[:, None]).sum() >= 2
    # Without the per-row negatives the loss is the one of the shared candidates alone.
    base = {k: v for k, v in case.items() if not k.startswith("row_")}
    assert abs(float(retrieval_loss(temperature=0.2, **base)[0]) - float(loss_sum)) > 1e-2


def test_row_negatives_pmap_matches_single_device_loss_and_grads():
    case = _row_case()
    names = list(case)

    def f(axis_name=None):
        def loss(*args):
            loss_sum, count, extras = losses.retrieval_loss(**dict(zip(names, args)), temperature=0.2,
                                                            axis_name=axis_name, negative_power=1.2, recall_ks=(2,))
            return loss_sum, count, extras["accidental_hits_sum"], extras["hits@2_sum"]
        return loss

    single = jax.jit(f())(*case.values())
    # Every array splits by its leading axis: rows (and their own negatives) and the shared negatives alike.
    split = [v.reshape(NDEV, v.shape[0] // NDEV, *v.shape[1:]) for v in case.values()]
    per_device = jax.pmap(f("data"), axis_name="data")(*split)
    for got, want in zip(per_device, single):
        np.testing.assert_allclose(np.sum(got), want, rtol=1e-5)
    # Gradients w.r.t. q, c and the rows' own negatives (argnums 0, 1, 8).
    argnums = (0, 1, names.index("row_neg_c"))
    grad_single = jax.jit(jax.grad(lambda *a: f()(*a)[0], argnums=argnums))(*case.values())
    grad_pmap = jax.pmap(jax.grad(lambda *a: f("data")(*a)[0], argnums=argnums), axis_name="data")(*split)
    for got, want in zip(grad_pmap, grad_single):
        np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-4, atol=1e-6)
        assert np.any(np.asarray(want) != 0)


def test_row_negatives_errors():
    case = _row_case()
    with pytest.raises(ValueError, match=r"row_neg_c has shape \(8, 3, 5\)"):
        losses.retrieval_loss(temperature=1.0, **{**case, "row_neg_c": jnp.ones((8, 3, 5))})
    with pytest.raises(ValueError, match=r"row_neg_ids has shape \(8, 2\)"):
        losses.retrieval_loss(temperature=1.0, **{**case, "row_neg_ids": jnp.zeros((8, 2), jnp.int32)})
    with pytest.raises(ValueError, match="candidate_logq and row_neg_logq"):
        losses.retrieval_loss(temperature=1.0, **{**case, "row_neg_logq": None})
    with pytest.raises(ValueError, match="row_neg_ids/row_neg_logq were given without row_neg_c"):
        losses.retrieval_loss(temperature=1.0, **{**case, "row_neg_c": None})


def test_row_negatives_logq_is_each_samplers_count():
    from train.step import StepConfig, candidate_logq

    B, M, R, N = 4, 6, 3, 60
    p_pos, p_neg = np.array([0.5, 0.2, 0.1, 0.05]), np.linspace(0.01, 0.2, M)
    p_row = np.linspace(1e-4, 0.3, B * R).reshape(B, R)
    local = {"item_logq": jnp.log(jnp.asarray(p_pos, jnp.float32)),
             "neg_item_logq": jnp.log(jnp.asarray(p_neg, jnp.float32)), "neg_item": jnp.zeros(M, jnp.int32),
             "row_neg_item_logq": jnp.log(jnp.asarray(p_row, jnp.float32)),
             "row_neg_item": jnp.zeros((B, R), jnp.int32)}
    base = dict(temperature=1.0, global_batch=B, global_negatives=M, num_items=N, logq_correction=True,
                remove_accidental_hits=True, embedding_l2=0.0, use_user_table=False, use_item_table=True,
                use_history=False, negatives_per_row=R)
    pos, neg, row = candidate_logq(local, StepConfig(**base))
    np.testing.assert_allclose(pos, np.log(B * p_pos), rtol=1e-5)
    np.testing.assert_allclose(neg, np.full(M, np.log(M / N)), rtol=1e-5)
    np.testing.assert_allclose(row, np.full((B, R), np.log(R / N)), rtol=1e-5)
    pos, neg, row = candidate_logq(local, StepConfig(**base, logq_mixture=True))
    np.testing.assert_allclose(pos, np.log(B * p_pos + (M + R) / N), rtol=1e-5)
    np.testing.assert_allclose(neg, np.log(B * p_neg + (M + R) / N), rtol=1e-5)
    np.testing.assert_allclose(row, np.log(B * p_row + (M + R) / N), rtol=1e-5)
    # Uniform samplers only: the label has their joint count, each negative its own sampler's.
    pos, neg, row = candidate_logq(local, StepConfig(**base, in_batch_negatives=False))
    np.testing.assert_allclose(pos, np.full(B, np.log((M + R) / N)), rtol=1e-5)
    np.testing.assert_allclose(neg, np.full(M, np.log(M / N)), rtol=1e-5)
    np.testing.assert_allclose(row, np.full((B, R), np.log(R / N)), rtol=1e-5)


def test_apply_dropout_matches_numpy_with_a_fixed_mask():
    x = rand(70, 4, 6)
    keep = np.random.default_rng(0).random((4, 6)) > 0.3
    np.testing.assert_allclose(losses.apply_dropout(x, jnp.asarray(keep), 0.3),
                               np.where(keep, np.asarray(x) / 0.7, 0.0), rtol=1e-6)
    assert losses.dropout(x, 0.0, jax.random.key(1)) is x
    dropped = np.asarray(losses.dropout(jnp.ones((200, 50)), 0.25, jax.random.key(2)))
    np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((dropped == 0).mean() - 0.25) < 0.02


# ---------------------------------------------------------------- the options in a training step
def _smoke_step(*overrides):
    """One real training step of the smoke config (4 devices, pmap) with overrides: (state before and after,
    the batch, the metrics)."""
    from tests.helpers import smoke_cfg
    from train.input import prepare
    from train.loop import build, load_data, make_batches, prepare_kwargs, select_devices

    c = smoke_cfg(*overrides)
    ds = load_data(c)
    _, _, launcher, state, step_cfg = build(c, ds, 1, select_devices(c))
    before = jax.device_get(launcher.get_state(state))
    batch = next(make_batches(c, ds))
    local, shared = launcher.put_batch(*prepare(batch, **prepare_kwargs(step_cfg)))
    new, metrics = launcher(state, local, shared)
    return before, jax.device_get(launcher.get_state(new)), batch, jax.device_get(metrics)


def _item_table(state):
    table = np.asarray(state["tables"]["item"])
    return table.reshape(-1, table.shape[-1]) if table.ndim == 3 else table


def test_a_step_with_row_negatives_bsl_and_user_dropout_updates_the_rows_own_negatives():
    before, after, batch, metrics = _smoke_step("loss.negatives_per_row=6", "loss.bsl_negative_power=1.2",
                                                "loss.user_dropout=0.2", "model.item.id_dropout=0.0")
    assert batch["row_neg_item"].shape == (16, 6)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(metrics))
    changed = np.flatnonzero(np.any(_item_table(before) != _item_table(after), axis=1))
    only_row = np.setdiff1d(batch["row_neg_item"], np.concatenate([batch["item"], batch["neg_item"]]))
    assert only_row.size and np.isin(only_row, changed).all()  # the sparse update reaches them (no id dropout)
    touched = np.concatenate([batch["item"], batch["neg_item"], batch["row_neg_item"].ravel(),
                              batch["history"].ravel()])
    assert np.isin(changed, touched).all()


def test_user_dropout_acts_in_training_only():
    from flax import nnx

    from tests.helpers import smoke_cfg
    from towers.two_tower import TwoTower
    from train.input import prepare
    from train.loop import build, load_data, make_batches, prepare_kwargs, select_devices
    from train.step import loss_fn, user_embeddings

    c = smoke_cfg("loss.user_dropout=0.5", "model.item.id_dropout=0.0", "model.user.id_dropout=0.0")
    ds = load_data(c)
    _, graphdef, _, state, step_cfg = build(c, ds, 1, select_devices(c))
    model = TwoTower(c.model, ds.user_feature_specs, ds.item_feature_specs, rngs=nnx.Rngs(0))
    _, params = nnx.split(model)
    local, shared = prepare(next(make_batches(c, ds)), **prepare_kwargs(step_cfg))
    rows = {k: jnp.asarray(state["tables"][k])[shared[f"{k}_uniq"]] for k in ("user", "item")}
    local = jax.tree.map(jnp.asarray, local)

    def loss(cfg, seed):
        return float(loss_fn(params, rows, local, jax.random.key(seed), graphdef=graphdef, cfg=cfg,
                             axis_name=None)[0])

    off = dataclasses.replace(step_cfg, user_dropout=0.0)
    assert loss(step_cfg, 1) != loss(step_cfg, 2) and loss(off, 1) == loss(off, 2)
    # The dropped-out q is renormalised (the smoke towers normalise), and the tower itself is untouched.
    x = {"user_id": rows["user"][local["user_idx"]], "history": rows["item"][local["history_idx"]],
         "history_mask": local["history_mask"]}
    q = user_embeddings(model, x, local, jax.random.key(3), step_cfg)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=1), 1.0, rtol=1e-5)
    plain = user_embeddings(model, x, local, jax.random.key(3), off)
    assert np.mean(np.isclose(np.asarray(q), 0.0)) > 0.3 and not np.any(np.isclose(np.asarray(plain), 0.0))


def test_loss_option_config_rules():
    from tests.helpers import smoke_cfg
    from train.config import ConfigError

    with pytest.raises(ConfigError, match=r"loss.bsl_negative_power=1.2: applies to the softmax only"):
        smoke_cfg("loss.name=ccl", "model.normalize=true", "loss.bsl_negative_power=1.2")
    with pytest.raises(ConfigError, match=r"loss.negatives_per_row=4: cannot be combined with item audiences"):
        smoke_cfg("loss.negatives_per_row=4", "model.item.use_history=true", "data.item_history_len=3")
    with pytest.raises(ConfigError, match=r"loss.user_dropout=1.0"):
        smoke_cfg("loss.user_dropout=1.0")
    # The rows' own negatives are negatives enough without the in-batch and shared ones.
    assert smoke_cfg("loss.in_batch_negatives=false", "loss.num_negatives=0", "loss.negatives_per_row=4")
