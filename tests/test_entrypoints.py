"""The contract of every `python -m` command: a bad config or bad data exits with status 2 and exactly one line
on stderr (`config error: ...` / `data error: ...`), no traceback, before any training or loading of a model."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _run(module: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, f"status {proc.returncode}, stderr:\n{proc.stderr}"
    return lines[0]


@pytest.mark.parametrize("args, start", [
    (["+debug=smoke", "train.bogus_knob=3"], "config error: train.bogus_knob=3: unknown key (known: "),
    (["data.test_fraction=-0.2"], "config error: data.test_fraction=-0.2: must be in [0, 1)"),
    (["data.split=bogus"], "config error: data.split='bogus': must be one of given, temporal or null"),
    (["data=parquet"], "data error: data.path must be set for source 'parquet'"),
    (["data=movielens", "data.path=/nonexistent/ml-100k"], "data error: data.path '/nonexistent/ml-100k' does not "
                                                            "exist"),
    (["+debug=smoke", "optimizer.dense.grad_clip_norm=-1"], "config error: optimizer.dense.grad_clip_norm=-1.0: "
                                                            "must be > 0 or null"),
    (["+debug=smoke", "eval.max_users=0"], "config error: eval.max_users=0: must be > 0 or null"),
    (["data=bogus"], "config error: In 'train': Could not find 'data/bogus'"),
], ids=["unknown-key", "test-fraction", "split", "parquet-no-path", "missing-path", "grad-clip", "max-users",
        "unknown-group-option"])
def test_train_fails_fast_with_one_line(tmp_path, args, start):
    line = _one_line(_run("train", *args, f"hydra.run.dir={tmp_path}/run"))
    assert line.startswith(start), line
    assert not (tmp_path / "run" / "ckpt").exists()  # nothing was trained


@pytest.mark.parametrize("module", ["eval", "serve", "serve.export", "serve.candidates", "serve.trending"])
def test_every_other_command_rejects_an_unknown_key_with_one_line(module, tmp_path):
    line = _one_line(_run(module, f"run_dir={tmp_path}", "bogus_knob=3"))
    assert line.startswith("config error: bogus_knob=3: unknown key (known: "), line
