"""`python -m eval` of a run trained on a prepared dataset: the same users and numbers as the twin run trained on
the same data in memory, with the records read `chunk_users` users at a time (never every user at once)."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from data import load
from data.prepared.read import PreparedData
from data.prepared.write import write_dataset
from eval.config import EvaluateConfig
from eval.run import run as evaluate
from tests.helpers import REPO, smoke_cfg
from train.loop import run as train

STEPS = ["train.total_steps=2", "checkpoint.every_steps=2", "train.log_every_steps=1"]
HIST = ["data.history_len=5", "model.user.use_history=true"]
SAME = ("num_users", "ks", "methods", "coverage", "popularity_bias", "segments", "skipped", "dataset")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Twin runs of the same seeds: one on synthetic data in memory, one on its prepared copy (3 shards)."""
    root = tmp_path_factory.mktemp("prepared_eval")
    mem_cfg = smoke_cfg("data.valid_fraction=0.1", *HIST, *STEPS)
    write_dataset(load(mem_cfg.data), root / "prepared", num_shards=3, config={})
    disk_cfg = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={root / 'prepared'}", *HIST, *STEPS)
    train(mem_cfg, root / "mem")
    train(disk_cfg, root / "disk")
    return SimpleNamespace(root=root, mem=root / "mem", disk=root / "disk", prepared=root / "prepared")


def _config(run_dir, out_dir, **changes) -> EvaluateConfig:
    c = EvaluateConfig(run_dir=str(run_dir), ks=[5, 10], out_dir=str(out_dir), plots=False)
    for key, value in changes.items():
        setattr(c, key, value)
    return c


def _assert_same(mem: dict, disk: dict):
    for key in SAME:
        assert disk[key] == mem[key], key
    assert {k: v for k, v in disk["ann"].items() if not k.endswith("seconds")} == \
        {k: v for k, v in mem["ann"].items() if not k.endswith("seconds")}
    proto = {k: v for k, v in disk["protocol"].items() if k != "repeats_counted_over"}
    assert proto == mem["protocol"]


@pytest.mark.parametrize("max_users,chunk_users", [(None, 48), (37, 16)])
def test_prepared_eval_equals_in_memory_and_reads_chunks(runs, reads, tmp_path, max_users, chunk_users):
    mem = evaluate(_config(runs.mem, tmp_path / "mem", max_users=max_users))
    assert reads.load_users == [] and reads.records == []                 # the in-memory run reads no shard
    disk = evaluate(_config(runs.disk, tmp_path / "disk", max_users=max_users, chunk_users=chunk_users))
    _assert_same(mem, disk)
    assert set(mem["methods"]) == {"model", "model_ann", "most_popular", "ease"} and mem["num_users"] > 0
    pd = PreparedData(runs.prepared)
    candidates = int((pd.split_rows("test") > 0).sum())
    # The held-out users' records are read a chunk at a time, each user once; EASE's Gram matrix streams the
    # train split with chunks of the same size; nothing reads every user at once.
    assert max(reads.load_users) <= chunk_users < pd.num_users
    assert max(reads.records) <= chunk_users
    assert sum(reads.load_users) == (candidates if max_users is None else max_users)
    assert disk["dataset"]["num_heldout"] == int(pd.split_rows("test").sum())
    assert ("repeats_counted_over" in disk["protocol"]) == (max_users is not None)
    # The metrics are the run's: the trained model beats nothing by accident only if they differ per method.
    assert disk["methods"]["model"] != disk["methods"]["most_popular"]


def test_prepared_ease_skipped_reads_only_the_sample(runs, reads, tmp_path):
    c = _config(runs.disk, tmp_path / "disk", max_users=20, chunk_users=8)
    c.baselines.ease = False
    disk = evaluate(c)
    assert "ease" not in disk["methods"] and disk["num_users"] == 20
    assert sum(reads.records) == 20 and max(reads.records) <= 8   # only the sampled users' records


def test_command_line_on_a_prepared_run(runs, tmp_path):
    evaluate(_config(runs.mem, tmp_path / "mem", max_users=30))
    mem = json.loads((tmp_path / "mem" / "metrics.json").read_text())
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "eval", f"run_dir={runs.disk}", f"out_dir={out}", "ks=[5,10]",
                           "max_users=30", "chunk_users=7", "plots=false"], cwd=REPO, text=True,
                          capture_output=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_same(mem, json.loads((out / "metrics.json").read_text()))
