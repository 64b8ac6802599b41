"""Crash safety on a prepared dataset: `python -m train data=prepared ...` killed with SIGKILL mid-training, while
the Grain feed holds batches prepared ahead of the step (by threads, or by a worker process), and re-run with the
same command, ends with exactly the parameters, data position and per-step losses of an uninterrupted run."""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import REPO, smoke_cfg

STEPS, EVERY, KILL_AFTER, BATCH = 20, 3, 9, 16   # BATCH: +debug=smoke's train.global_batch_size
# 16 users x 8 interactions: about 100 train examples, 6 global batches per epoch, so the run crosses three epoch
# boundaries and is killed once a checkpoint inside epoch 1 exists, with several steps and saves still to go.
DATA = ["data=synthetic", "data.num_users=16", "data.num_items=50", "data.interactions_per_user=8",
        "data.num_clusters=5"]
TRAIN = ["+debug=smoke", "data=prepared", "data.source=prepared", "model.user.use_history=true",
         f"train.total_steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.max_to_keep=20",
         "eval.at_end=false", "train.log_every_steps=1"]
FEEDS = {"threads": ["data.input_threads=2"], "worker_process": ["data.input_workers=1"]}


def _env(root: pathlib.Path) -> dict:
    # One persistent compilation cache for every run of the module: only the first run compiles the step.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train_cmd(data: pathlib.Path, run_dir: pathlib.Path, feed: list[str]) -> list[str]:
    return [sys.executable, "-m", "train", *TRAIN, f"data.path={data}", *feed, f"hydra.run.dir={run_dir}"]


def _train(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _ckpt_steps(run_dir: pathlib.Path) -> list[int]:
    d = run_dir / "ckpt"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _descendants(pid: int) -> set[int]:
    """Every live process under `pid` (Grain's worker, multiprocessing's resource tracker), from /proc."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for children in pathlib.Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = {int(k) for k in children.read_text().split()}
            except OSError:   # the task ended meanwhile
                continue
            todo.extend(kids - out)
            out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _losses(run_dir: pathlib.Path) -> dict[int, float]:
    """{step: train loss}; a step logged twice (a replay the resume failed to drop) fails the test."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _final_states(cfg, *run_dirs: pathlib.Path) -> list[tuple[int, dict, dict]]:
    """(step, state, data position) of the last checkpoint of each run, as host arrays."""
    from train.checkpoint import Checkpointer
    from train.loop import build_parts, create_state, load_data, select_devices, total_steps
    ds = load_data(cfg)
    parts = build_parts(cfg, ds, total_steps(cfg, len(ds.train)), select_devices(cfg))
    target = create_state(cfg, parts, abstract=True)   # what `restore_or_init` restores into
    out = []
    for run_dir in run_dirs:
        ckpt = Checkpointer(run_dir / "ckpt", every_steps=1, max_to_keep=20, async_save=False)
        step, state, extra = ckpt.restore_latest(target)
        ckpt.close()
        out.append((step, jax.device_get(state), extra["data"]))
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(prepared dataset made by `python -m data.prepare`, environment, uninterrupted run dir on it)."""
    root = tmp_path_factory.mktemp("prepared_resume")
    env = _env(root)
    done = subprocess.run([sys.executable, "-m", "data.prepare", *DATA, f"out={root / 'data'}", "num_shards=3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    _train(_train_cmd(root / "data", root / "clean", []), env)   # threads=1, no worker: the reference
    return root / "data", env, root / "clean"


@pytest.mark.parametrize("feed", list(FEEDS))
def test_prepared_sigkill_then_resume_matches_uninterrupted(prepared, feed, tmp_path):
    data, env, clean = prepared
    killed = tmp_path / "killed"
    cmd = _train_cmd(data, killed, FEEDS[feed])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helpers: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(s >= KILL_AFTER for s in _ckpt_steps(killed)):
            assert proc.poll() is None, "training exited before it could be killed"
            helpers |= _descendants(proc.pid)
            time.sleep(0.02)
        helpers |= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at_kill = _ckpt_steps(killed)
        assert at_kill and max(at_kill) < STEPS, f"the run was not killed mid-training: checkpoints {at_kill}"
        if feed == "worker_process":
            assert helpers, "input_workers=1 started no worker process"
        # The feed's helpers (Grain's worker, the resource tracker) must not outlive the killed trainer.
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in helpers):
            time.sleep(0.1)
        orphans = {p for p in helpers if _alive(p)}
        assert not orphans, f"processes of the killed run still alive 30 s after SIGKILL: {sorted(orphans)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in helpers:   # only what this run started; nothing if the assertions above held
            if _alive(p):
                os.kill(p, signal.SIGKILL)

    out = _train(cmd, env)
    resumed = re.search(r"resumed from \S+ at step (\d+)", out)
    assert resumed, "the re-run did not resume from a checkpoint"
    resume_step = int(resumed.group(1))
    assert resume_step == max(at_kill)
    n = json.loads((data / "manifest.json").read_text())["rows"]["train"]
    assert resume_step * BATCH > n, "the resume should start inside a later epoch than the first"

    want, got = _losses(clean), _losses(killed)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    assert {s: got[s] for s in got if s > resume_step} == {s: want[s] for s in want if s > resume_step}
    assert got == want

    cfg = smoke_cfg(*TRAIN[1:], f"data.path={data}")
    (step_a, a, pos_a), (step_b, b, pos_b) = _final_states(cfg, killed, clean)
    assert step_a == step_b == STEPS
    assert pos_a == pos_b == {"epoch": STEPS * BATCH // n, "position": STEPS * BATCH % n}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
