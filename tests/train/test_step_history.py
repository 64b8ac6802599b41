"""Histories pooled in the step (`towers.features.gathered_mean`, `StepConfig.pool_history`): the same means and
gradients as the tower's masked mean over the gathered [B, H, d] rows, and the same training steps."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import smoke_cfg
from towers.features import gathered_mean, masked_mean
from train.input import prepare
from train.loop import build_parts, create_state, load_data, make_batches, prepare_kwargs, select_devices
from train.step import make_step


def _case(hashed: bool):
    rng = np.random.default_rng(0)
    B, H, U, d = 6, 5, 9, 3
    rows = rng.normal(size=(U, d)).astype(np.float32)
    idx = rng.integers(0, U, (B, H, 2) if hashed else (B, H)).astype(np.int32)
    mask = rng.random((B, H)) < 0.6
    mask[0] = False          # an empty history
    mask[1] = True           # a full one
    return rows, idx, mask


@pytest.mark.parametrize("hashed", [False, True])
def test_gathered_mean_is_the_masked_mean_of_the_gathered_rows(hashed):
    rows, idx, mask = _case(hashed)
    emb = rows[idx].sum(axis=2) if hashed else rows[idx]
    want = np.stack([emb[b][mask[b]].mean(0) if mask[b].any() else np.zeros(rows.shape[1], np.float32)
                     for b in range(len(mask))])
    got = np.asarray(gathered_mean(jnp.asarray(rows), jnp.asarray(idx), jnp.asarray(mask)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not got[0].any()

    # The gradient w.r.t. the rows: each row gets the upstream gradient of every example whose history holds it,
    # weighted by 1 / (the example's history length), as through the [B, H, d] block.
    g = np.random.default_rng(1).normal(size=want.shape).astype(np.float32)

    def block(r):
        e = r[idx].sum(axis=2) if hashed else r[idx]
        return jnp.sum(masked_mean(e, jnp.asarray(mask)) * g)

    def pooled(r):
        return jnp.sum(gathered_mean(r, jnp.asarray(idx), jnp.asarray(mask)) * g)

    np.testing.assert_allclose(jax.grad(pooled)(jnp.asarray(rows)), jax.grad(block)(jnp.asarray(rows)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    ("model.user.combine=sum",),
    ("model.item.use_history=true", "data.item_history_len=4"),   # the item tower's audiences too
])
def test_pooled_histories_train_like_the_towers_own_mean(overrides):
    c = smoke_cfg("model.item.id_dropout=0.0", "train.launcher=jit", "train.num_devices=1", *overrides)
    ds = load_data(c)
    parts = build_parts(c, ds, 4, select_devices(c))
    assert parts.step_cfg.pool_history and parts.step_cfg.use_history
    batches = make_batches(c, ds, seed=0)
    prepared = [prepare(next(batches), **prepare_kwargs(parts.step_cfg)) for _ in range(3)]

    def train(pool: bool):
        step = jax.jit(make_step(graphdef=parts.graphdef, cfg=dataclasses.replace(parts.step_cfg, pool_history=pool),
                                 dense_tx=parts.dense_tx, sparse_opts=parts.sparse_opts))
        state, losses = create_state(c, parts), []
        for local, shared in prepared:
            state, metrics = step(state, local, shared)
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
        return losses, jax.device_get(state)

    losses, state = train(True)
    ref_losses, ref_state = train(False)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] != losses[0]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    # The tables did move, so equal tables are not equal initial values.
    init = jax.device_get(create_state(c, parts))
    assert not np.allclose(state["tables"]["item"], init["tables"]["item"])
