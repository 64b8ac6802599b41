"""The training feed pads each table's distinct rows to the largest size it has produced (`PadToLargest`), so the
step compiles once per new size; padding changes neither the loss nor any parameter (an L2 penalty included)."""
import functools

import jax
import numpy as np

from tests.helpers import smoke_cfg
from train.input import PadToLargest, grain_feed, prepare
from train.loop import build_parts, create_state, load_data, make_batches, prepare_kwargs, select_devices
from train.step import make_step


def _shared(n, size):
    uniq = np.zeros(size, np.int32)
    uniq[:n] = np.arange(10, 10 + n)
    return {"item_uniq": uniq, "item_valid": np.arange(size) < n}


def test_sizes_only_grow_and_padding_is_invalid_row_zero():
    pad = PadToLargest()
    small = pad(_shared(200, 256))
    assert len(small["item_uniq"]) == 256
    pad(_shared(300, 512))
    again = pad(_shared(200, 256))   # a smaller batch after a larger one keeps the larger size
    assert len(again["item_uniq"]) == 512 and len(again["item_valid"]) == 512
    np.testing.assert_array_equal(again["item_uniq"][:256], _shared(200, 256)["item_uniq"])
    assert not again["item_uniq"][256:].any() and not again["item_valid"][200:].any()
    assert again["item_valid"][:200].all()
    assert pad.sizes == {"item": 512}


def test_feed_sizes_never_shrink():
    c = smoke_cfg("data.num_users=500", "train.global_batch_size=384", "loss.num_negatives=0")   # ~260 users a batch
    ds = load_data(c)
    parts = build_parts(c, ds, 4, select_devices(c))
    batches = make_batches(c, ds, seed=0)
    direct = [prepare(batches.batch_at(k * 384), **prepare_kwargs(parts.step_cfg))[1] for k in range(30)]
    raw = [len(s["user_uniq"]) for s in direct]
    assert len(set(raw)) > 1 and any(b < a for a, b in zip(raw, raw[1:])), raw   # the case being fixed
    feed = grain_feed(make_batches(c, ds, seed=0), functools.partial(prepare, **prepare_kwargs(parts.step_cfg)))
    try:
        fed = [next(feed)[0][1] for _ in range(30)]
    finally:
        feed.close()
    sizes = [len(s["user_uniq"]) for s in fed]
    assert sizes == list(np.maximum.accumulate(raw))
    for s, d in zip(fed, direct):
        n = len(d["user_uniq"])
        np.testing.assert_array_equal(s["user_uniq"][:n], d["user_uniq"])
        np.testing.assert_array_equal(s["user_valid"], np.arange(len(s["user_valid"])) < d["user_valid"].sum())


def test_padded_rows_change_neither_loss_nor_parameters():
    c = smoke_cfg("model.item.id_dropout=0.0", "train.launcher=jit", "train.num_devices=1", "loss.embedding_l2=0.5")
    ds = load_data(c)
    parts = build_parts(c, ds, 4, select_devices(c))
    batches = make_batches(c, ds, seed=0)
    prepared = [prepare(next(batches), **prepare_kwargs(parts.step_cfg)) for _ in range(3)]

    def wider(shared):
        out = dict(shared)
        for name in ("user", "item"):
            n = len(shared[f"{name}_uniq"])
            out[f"{name}_uniq"] = np.concatenate([shared[f"{name}_uniq"], np.zeros(n, np.int32)])
            out[f"{name}_valid"] = np.concatenate([shared[f"{name}_valid"], np.zeros(n, bool)])
        return out

    def train(pad: bool):
        step = jax.jit(make_step(graphdef=parts.graphdef, cfg=parts.step_cfg, dense_tx=parts.dense_tx,
                                 sparse_opts=parts.sparse_opts))
        state, losses = create_state(c, parts), []
        for local, shared in prepared:
            state, metrics = step(state, local, wider(shared) if pad else shared)
            losses.append(float(metrics["loss_sum"] / metrics["count"]))
        return losses, jax.device_get(state)

    losses, state = train(True)
    ref_losses, ref_state = train(False)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
