"""Learning-rate schedules of the row-sparse optimizers (`optimizer.sparse.schedule`): the rate the jitted update
applies at a step equals the optax schedule's value there, and `constant` trains bit-identically to a plain
float rate."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import smoke_cfg
from train import sparse
from train.state import sparse_learning_rate


def _applied_rate(lr, step: int) -> float:
    """The rate a jitted RowwiseSGD update applies at `step`: a one-row table at 0 and gradient -1 give w = lr."""
    opt = sparse.RowwiseSGD(lr)
    table = jnp.zeros((1, 1), jnp.float32)
    update = jax.jit(opt.update)
    new, _ = update(table, opt.init(table), jnp.array([0], jnp.int32), -jnp.ones((1, 1), jnp.float32),
                    jnp.array([True]), jnp.asarray(step, jnp.int32))
    return float(new[0, 0])


CASES = {
    "cosine": (dict(schedule="cosine", warmup_steps=10, decay_steps=None, end_factor=0.1),
               optax.warmup_cosine_decay_schedule(0.0, 0.5, 10, 100, end_value=0.05)),
    "cosine_decay_steps": (dict(schedule="cosine", warmup_steps=0, decay_steps=40, end_factor=0.0),
                           optax.warmup_cosine_decay_schedule(0.0, 0.5, 0, 40, end_value=0.0)),
    "step": (dict(schedule="step", warmup_steps=5, step_every=20, step_factor=0.5),
             optax.join_schedules([optax.linear_schedule(0.0, 0.5, 5),
                                   optax.exponential_decay(0.5, 20, 0.5, staircase=True)], [5])),
    "step_no_warmup": (dict(schedule="step", warmup_steps=0, step_every=30, step_factor=0.1),
                       optax.exponential_decay(0.5, 30, 0.1, staircase=True)),
    "constant_warmup": (dict(schedule="constant", warmup_steps=8),
                        optax.join_schedules([optax.linear_schedule(0.0, 0.5, 8), optax.constant_schedule(0.5)],
                                             [8])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rate_applied_at_a_step_is_the_optax_schedule(name):
    keys, reference = CASES[name]
    c = smoke_cfg("optimizer.sparse.learning_rate=0.5", *(f"optimizer.sparse.{k}={'null' if v is None else v}"
                                                         for k, v in keys.items()))
    lr = sparse_learning_rate(c.optimizer.sparse, total_steps=100)
    assert callable(lr)
    rates = [_applied_rate(lr, s) for s in (0, 3, 5, 9, 10, 19, 25, 31, 50, 70, 99, 120)]
    expected = [float(reference(s)) for s in (0, 3, 5, 9, 10, 19, 25, 31, 50, 70, 99, 120)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-8)
    assert len(set(np.round(rates, 7))) > 2   # the rate does change over the steps


def test_step_schedule_decays_at_the_boundaries():
    c = smoke_cfg("optimizer.sparse.learning_rate=0.8", "optimizer.sparse.schedule=step",
                  "optimizer.sparse.step_every=10", "optimizer.sparse.step_factor=0.5")
    lr = sparse_learning_rate(c.optimizer.sparse, total_steps=100)
    assert [_applied_rate(lr, s) for s in (0, 9, 10, 19, 20, 35)] == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.1])


def test_constant_is_the_plain_float_and_trains_identically(tmp_path):
    from train.loop import run
    c = smoke_cfg("eval.at_end=false")
    assert sparse_learning_rate(c.optimizer.sparse, 4) == c.optimizer.sparse.learning_rate
    # An explicit constant schedule (a callable) gives the same tables as the float after a few real steps.
    base = run(c, tmp_path / "a")
    sched = run(smoke_cfg("eval.at_end=false", "optimizer.sparse.schedule=cosine", "optimizer.sparse.end_factor=1"),
                tmp_path / "b")
    assert base["train"]["train/loss"] == sched["train"]["train/loss"]
    warm = run(smoke_cfg("eval.at_end=false", "optimizer.sparse.warmup_steps=3"), tmp_path / "c")
    assert warm["train"]["train/loss"] != base["train"]["train/loss"]
