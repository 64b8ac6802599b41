"""Multi-process training: two `python -m train` processes on localhost (2 fake CPU devices each, joined by
`jax.distributed.initialize` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, Gloo
collectives) give the same losses, parameters and held-out metrics as one process with 4 devices, with the ID
tables split across both processes and each process feeding its own share of every global batch."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers import REPO, smoke_cfg
from tests.train.test_loop import _final_state
from train import distributed
from train.config import ConfigError, DistributedConfig
from train.loop import run

ARGS = ["+debug=smoke", "train.launcher=shard_map", "mesh=sharded", "train.total_steps=3",
        "checkpoint.every_steps=3", "train.log_every_steps=1", "eval.max_users=50"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("prepared, grouped", [(False, False), (True, False), (False, True)],
                         ids=["in_memory", "prepared", "three_steps_per_dispatch"])
def test_two_processes_train_like_one_process(tmp_path, prepared, grouped):
    """Each process reads only its half of every global batch (from memory, or the records of its users from a
    prepared dataset's shards) and the two train like one process with 4 devices reading whole batches; also
    with the three steps in one dispatch (`train.steps_per_dispatch`), each process placing its share of the
    group."""
    multi, single = tmp_path / "multi", tmp_path / "single"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2")
    data = []
    if prepared:
        from data import load
        from data.prepared.write import write_dataset
        write_dataset(load(smoke_cfg().data), tmp_path / "prepared", num_shards=4, config={})
        data = ["data=prepared", "data.source=prepared", f"data.path={tmp_path / 'prepared'}"]
    if grouped:
        data += ["train.steps_per_dispatch=3", "train.log_every_steps=3"]
    cmd = [sys.executable, "-m", "train", *ARGS, *data, f"hydra.run.dir={multi}"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
        # each reads its own half: disjoint examples of every global batch (16 = the smoke batch)
        assert f"process {i} of 2 reads examples [{8 * i}, {8 * i + 8}) of every global batch of 16" in out + err

    cfg = smoke_cfg(*ARGS[1:])
    run(cfg, single)   # this test process: 4 fake devices, one process
    if grouped:   # one line for the three steps: their mean loss
        assert len(_losses(multi)) == 1
        np.testing.assert_allclose(_losses(multi), [np.mean(_losses(single))], rtol=1e-5)
    else:
        assert len(_losses(multi)) == 3
        np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-5)
    _, a = _final_state(multi, cfg)
    _, b = _final_state(single, cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)
    # Process 0 alone evaluated and wrote the run's files, with the one-process run's numbers.
    ev_multi = json.loads((multi / "final_metrics.json").read_text())["eval"]["model"]
    ev_single = json.loads((single / "final_metrics.json").read_text())["eval"]["model"]
    assert ev_multi == pytest.approx(ev_single, rel=1e-4, abs=1e-6)


def test_settings_come_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "8")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert distributed.settings(DistributedConfig()) == {"coordinator_address": "10.0.0.1:1234",
                                                         "num_processes": 8, "process_id": 3}
    got = distributed.settings(DistributedConfig(num_processes=2, process_id=1))
    assert (got["num_processes"], got["process_id"]) == (2, 1)
    monkeypatch.setenv("JAX_PROCESS_ID", "three")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='three'"):
        distributed.settings(DistributedConfig())


def test_bad_multi_process_setups_are_config_errors(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize(DistributedConfig(), "pmap") is False   # one process: nothing to join
    with pytest.raises(ConfigError, match="pmap"):
        distributed.initialize(DistributedConfig("localhost:1", 2, 0), "pmap")
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS"):
        distributed.initialize(DistributedConfig(None, 2, 0), "shard_map")
    with pytest.raises(ConfigError, match="process_id=5"):
        distributed.initialize(DistributedConfig("localhost:1", 2, 5), "shard_map")
