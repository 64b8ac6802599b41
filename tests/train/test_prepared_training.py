"""Training on a prepared dataset (records read from shards per batch) equals training on the same data in memory:
the same losses, parameters and held-out metrics, for the same seeds."""
import json

import jax
import numpy as np
import pytest

from data import load
from data.prepared.write import write_dataset
from tests.helpers import smoke_cfg
from tests.train.test_loop import _final_state
from train.loop import run

STEPS = ["train.total_steps=6", "checkpoint.every_steps=3", "train.log_every_steps=1"]


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _train_both(tmp_path, data_overrides: list[str], prepared_overrides: list[str], extra: list[str]):
    mem_cfg = smoke_cfg(*data_overrides, *STEPS, *extra)
    write_dataset(load(mem_cfg.data), tmp_path / "prepared", num_shards=3, config={})
    disk_cfg = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={tmp_path / 'prepared'}", *prepared_overrides, *STEPS, *extra)
    mem = run(mem_cfg, tmp_path / "mem")
    disk = run(disk_cfg, tmp_path / "disk")
    return mem_cfg, disk_cfg, mem, disk


def _assert_same_run(tmp_path, mem_cfg, disk_cfg, mem, disk):
    np.testing.assert_allclose(_losses(tmp_path / "mem"), _losses(tmp_path / "disk"), rtol=1e-6)
    _, a = _final_state(tmp_path / "mem", mem_cfg)
    _, b = _final_state(tmp_path / "disk", disk_cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-8)
    assert mem["eval"]["model"] == pytest.approx(disk["eval"]["model"], rel=1e-6)
    assert mem["eval"]["num_users"] == disk["eval"]["num_users"] > 0


def test_synthetic_prepared_trains_like_in_memory(tmp_path):
    hist = ["data.history_len=5", "model.user.use_history=true"]
    _assert_same_run(tmp_path, *_train_both(tmp_path, ["data.valid_fraction=0.1"], hist, hist))


@pytest.mark.realdata
def test_movielens_prepared_trains_like_in_memory(tmp_path, shared_data):
    data = ["data=movielens", f"data.path={shared_data / 'ml-100k'}"]
    keep = ["data.history_len=10", "model.user.use_history=true", "eval.max_users=200",
            "train.global_batch_size=64"]
    _assert_same_run(tmp_path, *_train_both(tmp_path, data, [], keep))


def test_resume_on_another_prepared_dataset_is_refused(tmp_path):
    """A run resumed with data.path pointing at a different preparation (other contents) stops before training,
    naming what changed, rather than continuing on data its checkpoint did not see."""
    from data.schema import ConfigError
    for name, seed in (("a", 0), ("b", 1)):
        write_dataset(load(smoke_cfg(f"data.seed={seed}").data), tmp_path / name, num_shards=2, config={})
    first = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={tmp_path / 'a'}", *STEPS)
    run(first, tmp_path / "run")
    longer = ["train.total_steps=9", "checkpoint.every_steps=3", "train.log_every_steps=1"]
    other = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={tmp_path / 'b'}", *longer)
    with pytest.raises(ConfigError, match=r"refused.*data\.(contents|vocabularies)"):
        run(other, tmp_path / "run")
