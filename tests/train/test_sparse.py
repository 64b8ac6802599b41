"""Row-sparse optimizers: sparse step == dense reference on touched rows, untouched rows bit-identical,
numpy references over several steps, hand-computed lazy Adam numbers, and in-place updates under donation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import sparse

N, D = 40, 3


def _optimizers():
    return {
        "sgd": sparse.RowwiseSGD(0.1, weight_decay=0.01),
        "rowwise_adagrad": sparse.RowwiseAdagrad(0.1, initial_accumulator_value=0.1, weight_decay=0.01),
        "lazy_adam": sparse.LazyAdam(0.01, weight_decay=0.01),
    }


def _step_inputs(seed, real_rows, pad_row, num_pad=3):
    """rows = real rows then `num_pad` padding entries whose gradients are large garbage."""
    rng = np.random.default_rng(seed)
    rows = np.array(list(real_rows) + [pad_row] * num_pad, np.int32)
    valid = np.arange(len(rows)) < len(real_rows)
    grads = rng.normal(size=(len(rows), D)).astype(np.float32)
    grads[~valid] = 1e6
    full = np.zeros((N, D), np.float32)
    full[rows[valid]] = grads[valid]
    return jnp.array(rows), jnp.array(grads), jnp.array(valid), jnp.array(full)


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", ["sgd", "rowwise_adagrad", "lazy_adam"])
@pytest.mark.parametrize("pad_row", [0, N, -1], ids=["pad_is_a_real_row", "pad_out_of_bounds", "pad_negative"])
def test_sparse_update_matches_dense_reference(name, pad_row):
    opt = _optimizers()[name]
    table = jnp.array(np.random.default_rng(0).normal(size=(N, D)), jnp.float32)
    state = opt.init(table)
    update, dense = jax.jit(opt.update), jax.jit(opt.dense_reference_update)
    # Two steps; row 0 is real in both (so pad_row=0 collides with it), rows 5 and 7 are touched twice.
    for step, real in enumerate([[0, 5, 7, 12], [7, 0, 30, 5, 39]]):
        rows, grads, valid, full = _step_inputs(step, real, pad_row)
        new_table, new_state = update(table, state, rows, grads, valid, step)
        ref_table, ref_state = dense(table, state, full, step)
        touched = np.zeros(N, bool)
        touched[real] = True
        np.testing.assert_allclose(new_table[touched], ref_table[touched], rtol=1e-6, atol=1e-7)
        for k in state:
            np.testing.assert_allclose(new_state[k][touched], ref_state[k][touched], rtol=1e-6, atol=1e-7)
        # Untouched rows and their state are bit-identical to before the step, in both versions.
        np.testing.assert_array_equal(new_table[~touched], table[~touched])
        np.testing.assert_array_equal(ref_table[~touched], table[~touched])
        _assert_state_equal({k: v[~touched] for k, v in new_state.items()},
                            {k: v[~touched] for k, v in state.items()})
        assert not np.allclose(new_table[touched], table[touched])
        table, state = new_table, new_state


def np_rowwise_adagrad(table, steps, lr_fn, eps, init_acc):
    """float64 loop reference of FBGEMM row-wise Adagrad."""
    w = np.asarray(table, np.float64).copy()
    acc = np.full(w.shape[0], init_acc, np.float64)
    for step, (rows, grads) in enumerate(steps):
        for r, g in zip(rows, np.asarray(grads, np.float64)):
            acc[r] += np.mean(g * g)
            w[r] -= lr_fn(step) * g / (math.sqrt(acc[r]) + eps)
    return w, acc


def test_rowwise_adagrad_several_steps_match_numpy():
    lr_fn = lambda step: 0.5 / (1.0 + step)  # a schedule of the step, as optax schedules are
    opt = sparse.make_sparse_optimizer("rowwise_adagrad", learning_rate=lr_fn, eps=1e-3,
                                       initial_accumulator_value=0.05)
    table = jnp.array(np.random.default_rng(1).normal(size=(N, D)), jnp.float32)
    state = opt.init(table)
    update = jax.jit(opt.update)
    real_steps = [[1, 2, 3], [2, 3, 4, 5], [3, 9], [2, 3, 4, 5, 6, 7]]
    history = []
    for step, real in enumerate(real_steps):
        rows, grads, valid, _ = _step_inputs(10 + step, real, pad_row=N - 1, num_pad=2)
        table_new, state = update(table, state, rows, grads, valid, step)
        history.append((real, np.asarray(grads)[: len(real)]))
        table = table_new
    w0 = np.random.default_rng(1).normal(size=(N, D))
    ref_w, ref_acc = np_rowwise_adagrad(w0.astype(np.float32), history, lr_fn, 1e-3, 0.05)
    np.testing.assert_allclose(table, ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["accum"], ref_acc, rtol=1e-5)
    assert ref_acc[3] > ref_acc[9] > ref_acc[0] == 0.05  # row 3 was touched 4 times, row 9 once, row 0 never


def test_lazy_adam_hand_computed_bias_correction():
    # lr 0.1, b1 0.9, b2 0.999. Row 0: g = 0.5 at step 0, g = -1 at step 1. Row 1: g = 2 at step 1 only.
    # Row 0, step 0: m = 0.05, v = 0.00025, m_hat = 0.5, v_hat = 0.25 -> w = 1 - 0.1 * 1 = 0.9.
    # Row 0, step 1: m = -0.055, v = 0.00124975, m_hat = -0.055 / 0.19 = -0.2894737,
    #   v_hat = 0.00124975 / 0.001999 = 0.6251876 -> w = 0.9 + 0.1 * 0.2894737 / 0.7906880 = 0.9366104.
    # Row 1, step 1 (its first touch, count 1): m_hat = 2, v_hat = 4 -> w = 1 - 0.1 * 2 / 2 = 0.9.
    # (Bias correction by the global step, 2, would give m_hat = 0.2 / 0.19, v_hat = 0.004 / 0.001999 and
    # w = 1 - 0.1 * 0.7441 = 0.92559.)
    opt = sparse.LazyAdam(0.1, b1=0.9, b2=0.999, eps=1e-8)
    table = jnp.ones((3, 1), jnp.float32)
    state = opt.init(table)
    table, state = opt.update(table, state, jnp.array([0, 2]), jnp.array([[0.5], [9.0]]),
                              jnp.array([True, False]), 0)
    np.testing.assert_allclose(table[:, 0], [0.9, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(state["m"][0, 0], 0.05, rtol=1e-6)
    np.testing.assert_allclose(state["v"][0, 0], 0.00025, rtol=1e-5)
    table, state = opt.update(table, state, jnp.array([0, 1]), jnp.array([[-1.0], [2.0]]),
                              jnp.array([True, True]), 1)
    np.testing.assert_allclose(table[:, 0], [0.9366104, 0.9, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(state["count"], [2, 1, 0])
    np.testing.assert_allclose(state["m"][:, 0], [-0.055, 0.2, 0.0], rtol=1e-5)
    np.testing.assert_allclose(state["v"][:, 0], [0.00124975, 0.004, 0.0], rtol=1e-5)


def test_lazy_adam_on_an_always_touched_row_equals_optax_adam():
    opt = sparse.LazyAdam(0.05)
    table = jnp.array(np.random.default_rng(2).normal(size=(6, 4)), jnp.float32)
    state = opt.init(table)
    row = table[4]
    tx = optax.adam(0.05)
    tx_state = tx.init(row)
    for step in range(5):
        g = jnp.array(np.random.default_rng(20 + step).normal(size=(1, 4)), jnp.float32)
        table, state = opt.update(table, state, jnp.array([4]), g, jnp.array([True]), step)
        upd, tx_state = tx.update(g[0], tx_state)
        row = optax.apply_updates(row, upd)
    np.testing.assert_allclose(table[4], row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "lazy_adam"])
def test_donated_update_is_in_place(name):
    num_rows, dim, touched = 200_000, 16, 256
    opt = sparse.make_sparse_optimizer(name, learning_rate=0.1)
    table = jnp.zeros((num_rows, dim), jnp.float32)
    state = opt.init(table)
    rows = jnp.arange(0, num_rows, num_rows // touched, dtype=jnp.int32)[:touched]
    grads = jnp.ones((touched, dim), jnp.float32)
    valid = jnp.arange(touched) < touched - 8
    update = jax.jit(opt.update, donate_argnums=(0, 1))
    # XLA aliases the donated table and state to the outputs and needs no table-sized scratch buffer.
    stats = update.lower(table, state, rows, grads, valid, 0).compile().memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert stats.alias_size_in_bytes >= table.nbytes + state_bytes
    assert stats.temp_size_in_bytes < table.nbytes // 100
    new_table, new_state = update(table, state, rows, grads, valid, 0)
    assert table.is_deleted() and all(x.is_deleted() for x in jax.tree.leaves(state))
    np.testing.assert_allclose(new_table[rows[0]], -0.1 * np.ones(dim), rtol=1e-5)  # both give -lr * sign(g)
    assert float(jnp.abs(new_table).sum()) == pytest.approx(0.1 * dim * (touched - 8), rel=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="unknown sparse optimizer 'adam'; choose one of rowwise_adagrad"):
        sparse.make_sparse_optimizer("adam", learning_rate=0.1)
    opt = sparse.RowwiseSGD(0.1)
    table = jnp.zeros((10, 4))
    with pytest.raises(ValueError, match=r"grads \(2, 3\).*\[U, 4\]"):
        opt.update(table, opt.init(table), jnp.array([1, 2]), jnp.zeros((2, 3)), jnp.array([True, True]), 0)
