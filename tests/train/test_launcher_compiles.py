"""Each launcher compiles the training step once: the state it places on the devices has the layout the step
returns, so the second step reuses the first step's program (pmap once compiled it again, seconds on CPU)."""
import logging

import jax
import pytest

from tests.helpers import smoke_cfg
from train.input import prepare
from train.loop import build, load_data, make_batches, prepare_kwargs, select_devices


class _Compiles(logging.Handler):
    """Collects JAX's "Finished XLA compilation of <program>" messages (emitted with `jax.log_compiles`)."""

    def __init__(self):
        super().__init__()
        self.programs = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Finished XLA compilation of"):
            self.programs.append(message.split(" in ")[0])


@pytest.mark.parametrize("launcher", ["pmap", "shard_map", "jit"])
def test_steps_after_the_first_compile_nothing(launcher):
    c = smoke_cfg(f"train.launcher={launcher}", "eval.at_end=false")
    ds = load_data(c)
    _, _, run_step, state, step_cfg = build(c, ds, 4, select_devices(c))
    batches = make_batches(c, ds, seed=0)
    use = prepare_kwargs(step_cfg)

    def step(state):
        state, metrics = run_step(state, *run_step.put_batch(*prepare(next(batches), **use)))
        jax.block_until_ready(metrics)
        return state

    state = step(state)                      # compiles the step
    compiles, jax_log = _Compiles(), logging.getLogger("jax")
    jax_log.addHandler(compiles)
    try:
        with jax.log_compiles(True):
            for _ in range(2):
                state = step(state)
    finally:
        jax_log.removeHandler(compiles)
    assert compiles.programs == []
