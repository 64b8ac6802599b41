"""End-to-end training on the tiny smoke config: it trains, checkpoints, resumes, evaluates; 1 device and
4 devices (pmap, shard_map) agree on the same global batch."""
import json

import jax
import numpy as np
import pytest

from tests.helpers import smoke_cfg
from train.loop import run


def _final_state(run_dir, cfg):
    """Restores the last checkpoint of a finished run (single-copy state)."""
    from train.checkpoint import Checkpointer
    from train.loop import build, load_data, select_devices, total_steps
    ds = load_data(cfg)
    _, _, _, state, _ = build(cfg, ds, total_steps(cfg, len(ds.train)), select_devices(cfg))
    from train.state import abstract_state
    ckpt = Checkpointer(run_dir / "ckpt", every_steps=1, max_to_keep=3, async_save=False)
    step, state, extra = ckpt.restore_latest(abstract_state(state))
    ckpt.close()
    return step, jax.device_get(state)


def test_smoke_run_trains_checkpoints_and_evaluates(tmp_path):
    cfg = smoke_cfg()
    result = run(cfg, tmp_path)
    assert result["steps"] == 4
    assert np.isfinite(result["train"]["train/loss"])
    ev = result["eval"]
    for who in ("model", "most_popular"):
        for k in (5, 10):
            assert 0.0 <= ev[who][f"recall@{k}"] <= 1.0
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 4]
    saved = json.loads((tmp_path / "final_metrics.json").read_text())
    assert saved["eval"]["model"]["recall@10"] == pytest.approx(ev["model"]["recall@10"])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines][:2] == [2, 4]
    assert (tmp_path / "vocab" / "item.npy").exists() and (tmp_path / "config.yaml").exists()
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_continues_from_latest_checkpoint(tmp_path):
    run(smoke_cfg("eval.at_end=false"), tmp_path)
    result = run(smoke_cfg("train.total_steps=6", "eval.at_end=false"), tmp_path)
    assert result["steps"] == 6
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # steps 1-4 were not trained again


def test_training_lowers_the_loss(tmp_path):
    cfg = smoke_cfg("train.total_steps=60", "train.log_every_steps=20", "eval.at_end=false",
                    "checkpoint.every_steps=1000", "optimizer.dense.learning_rate=0.01",
                    "optimizer.sparse.learning_rate=0.2")
    run(cfg, tmp_path)
    losses = [json.loads(l)["train/loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("launcher", ["shard_map", "pmap_4"])
def test_one_device_equals_four_devices(tmp_path, launcher):
    """Same global batches: the 4-device run (cross-device negatives via all_gather, psum'd grads) must
    reproduce the 1-device run's loss and parameters."""
    common = ["eval.at_end=false", "train.total_steps=3", "checkpoint.every_steps=3",
              "model.item.id_dropout=0.0"]
    one = smoke_cfg(*common, "train.launcher=jit", "train.num_devices=1")
    kind = "pmap" if launcher == "pmap_4" else launcher
    four = smoke_cfg(*common, f"train.launcher={kind}", "train.num_devices=4")
    r1 = run(one, tmp_path / "one")
    r4 = run(four, tmp_path / "four")
    assert r1["train"]["train/loss"] == pytest.approx(r4["train"]["train/loss"], rel=1e-5)
    _, s1 = _final_state(tmp_path / "one", one)
    _, s4 = _final_state(tmp_path / "four", four)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
