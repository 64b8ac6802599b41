"""Crash safety: a run killed with SIGKILL mid-training and re-run ends with exactly the parameters of an
uninterrupted run; corrupt checkpoints are skipped with a warning, or stop the run with a clear error."""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import REPO, smoke_cfg
from tests.train.test_loop import _final_state
from train.checkpoint import CheckpointError
from train.loop import run

STEPS = 40
ARGS = ["+debug=smoke", f"train.total_steps={STEPS}", "checkpoint.every_steps=5", "checkpoint.max_to_keep=20",
        "eval.at_end=false", "train.log_every_steps=5", "data.num_users=2000", "data.num_items=500"]


def _train_cmd(run_dir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "train", *ARGS, f"hydra.run.dir={run_dir}"]


def _ckpt_steps(run_dir: pathlib.Path) -> list[int]:
    d = run_dir / "ckpt"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 10 for s in _ckpt_steps(killed)):
        assert proc.poll() is None, "training exited before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = _ckpt_steps(killed)
    assert at_kill and max(at_kill) < STEPS, f"the run was not killed mid-training: {at_kill}"

    done = subprocess.run(_train_cmd(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    clean = tmp_path / "clean"
    done = subprocess.run(_train_cmd(clean), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    cfg = smoke_cfg(*ARGS[1:])
    step_a, a = _final_state(killed, cfg)
    step_b, b = _final_state(clean, cfg)
    assert step_a == step_b == STEPS
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _corrupt(step_dir: pathlib.Path) -> None:
    """Truncates every array data file of a checkpoint (what a half-written or damaged disk leaves)."""
    # Orbax (OCDBT) keeps array bytes in data files under `d/`; damage those, as a bad disk would.
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: max(0, p.stat().st_size // 3)])


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    run(smoke_cfg("eval.at_end=false"), tmp_path)  # checkpoints at steps 2 and 4
    _corrupt(tmp_path / "ckpt" / "4")
    with caplog.at_level("WARNING"):
        result = run(smoke_cfg("eval.at_end=false", "train.total_steps=6"), tmp_path)
    assert "corrupt" in caplog.text and "/4" in caplog.text
    assert result["steps"] == 6
    assert 6 in _ckpt_steps(tmp_path)


def test_all_checkpoints_corrupt_is_a_clear_error(tmp_path):
    run(smoke_cfg("eval.at_end=false"), tmp_path)
    for step in _ckpt_steps(tmp_path):
        _corrupt(tmp_path / "ckpt" / str(step))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        run(smoke_cfg("eval.at_end=false", "train.total_steps=6"), tmp_path)
