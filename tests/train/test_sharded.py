"""ID tables split by rows over the mesh's `model` axis (4 fake CPU devices): the same training as with
replicated tables (loss and every parameter), a quarter of each table per device, Orbax checkpoints that
restore straight into the split layout, and a run that resumes with split tables."""
import json

import jax
import numpy as np
import pytest

from data.batching import Batches
from tests.helpers import smoke_cfg
from train.checkpoint import Checkpointer
from train.input import prepare
from train.loop import build, load_data, run, select_devices
from train.mesh import table_bytes_per_device

COMMON = ("model.item.id_dropout=0.0", "eval.at_end=false")
STEPS = 4


def _batches(c, ds, step_cfg, n):
    batches = Batches(ds, batch_size=c.train.global_batch_size, num_negatives=c.loss.num_negatives,
                      history_len=c.data.history_len, history_mode=c.data.history_mode, seed=c.seed)
    use = dict(use_user_table=step_cfg.use_user_table, use_item_table=step_cfg.use_item_table,
               use_history=step_cfg.use_history)
    return [prepare(next(batches), **use) for _ in range(n)]


def _train(*overrides, steps=STEPS):
    """(losses, final state on the host, launcher, device state) after `steps` steps of the real step on the
    batches `python -m train` would feed."""
    c = smoke_cfg(*COMMON, *overrides)
    ds = load_data(c)
    _, _, launcher, state, step_cfg = build(c, ds, steps, select_devices(c))
    losses = []
    for local, shared in _batches(c, ds, step_cfg, steps):
        state, metrics = launcher(state, *launcher.put_batch(local, shared))
        losses.append(float(metrics["loss_sum"] / metrics["count"]))
    return losses, jax.device_get(state), launcher, state


@pytest.fixture(scope="module")
def replicated():
    return _train("train.launcher=jit", "train.num_devices=1")


@pytest.fixture(scope="module")
def sharded():
    return _train("train.launcher=shard_map", "mesh=sharded")


@pytest.mark.parametrize("launcher", ["shard_map", "jit"])
def test_split_tables_train_like_replicated_ones(replicated, sharded, launcher):
    losses, state, lau, dev_state = sharded if launcher == "shard_map" else \
        _train(f"train.launcher={launcher}", "mesh=sharded")
    ref_losses, ref_state = replicated[:2]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] != losses[0]  # it trained
    got = jax.tree.leaves(state)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # Each of the 4 devices holds a quarter of every table and of its row-wise optimizer state.
    assert lau.model_size == 4
    for name, table in dev_state["tables"].items():
        rows, dim = table.shape
        assert [s.data.shape for s in table.addressable_shards] == [(rows // 4, dim)] * 4
        assert {s.data.shape for s in dev_state["table_opt"][name]["accum"].addressable_shards} == {(rows // 4,)}
        assert table_bytes_per_device(dev_state["tables"])[name] == table.nbytes // 4


def test_split_tables_restore_straight_into_their_layout(sharded, tmp_path):
    _, host, launcher, dev_state = sharded
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=1, max_to_keep=1, async_save=False)
    ckpt.save(STEPS, dev_state, {"data": {}}, force=True)
    step, restored, _ = ckpt.restore_latest(launcher.abstract_state(dev_state))
    ckpt.close()
    assert step == STEPS
    for name, table in restored["tables"].items():
        assert table.sharding == launcher.table_sharding
        assert {s.data.shape[0] for s in table.addressable_shards} == {table.shape[0] // 4}
        np.testing.assert_array_equal(np.asarray(table), host["tables"][name])


def test_run_with_split_tables_resumes(sharded, tmp_path):
    args = ("train.launcher=shard_map", "mesh=sharded", "checkpoint.every_steps=2", "train.log_every_steps=2")
    run(smoke_cfg(*COMMON, *args, "train.total_steps=2"), tmp_path)
    result = run(smoke_cfg(*COMMON, *args, f"train.total_steps={STEPS}"), tmp_path)
    assert result["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # steps 1-2 were restored, not trained again
    # The resumed run ends where four uninterrupted steps of the same step function do.
    _, want, launcher, dev_state = sharded
    ckpt = Checkpointer(tmp_path / "ckpt", every_steps=2, max_to_keep=3, async_save=False)
    step, got, _ = ckpt.restore_latest(launcher.abstract_state(dev_state))
    ckpt.close()
    assert step == STEPS
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
