"""Checkpoint integrity and resume safety: checksummed checkpoint contents (single-bit flips fall back to the
previous checkpoint), a resume refused before anything is written when the config or the data changed, no
checkpoint of a non-finite state, each metrics step written once after a resume, and a model version that
follows the parameters and vocabularies."""
import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from scripts import fault_inject_checkpoint as fault
from tests.helpers import smoke_cfg
from train.config import ConfigError
from train.loop import TrainingDiverged, run

BASE = ("eval.at_end=false",)


def _steps(run_dir: pathlib.Path) -> list[int]:
    d = run_dir / "ckpt"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
    """config.yaml and every vocabulary file, byte for byte."""
    files = [run_dir / "config.yaml", *sorted((run_dir / "vocab").iterdir())]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
    """A finished smoke run (checkpoints at steps 2 and 4); tests work on copies."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    fault.train_tiny(run_dir)
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> pathlib.Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- checksums

def test_single_bit_flips_in_array_data_fall_back_to_previous_checkpoint(finished, tmp_path):
    """The fast version of scripts/fault_inject_checkpoint.py: a few flips in every array data file. A flip
    is either detected (the restore falls back to step 2) or harmless: it hit bytes of the data file the
    restore never reads (OCDBT data files also hold bytes no B-tree entry points to), and every array
    restored equals the unflipped one byte for byte."""
    trials = fault.run_trials(finished, smoke_cfg(*BASE), flips_per_file=4, seed=0, only_array_data=True,
                              scratch=tmp_path)
    assert trials and {t.kind for t in trials} == {"array data"}
    silent = [t for t in trials if t.outcome == "SILENT"]
    assert not silent, silent
    # How many flips land in bytes the restore reads depends on where Orbax put each array in this run's
    # files (their names and layout change from run to run), so only "none silent, and some detected" holds.
    detected = [t for t in trials if t.outcome == "detected"]
    assert detected, trials
    assert all(t.detail == "fell back to step 2" for t in detected)


def test_flipped_data_position_falls_back(run_copy, caplog):
    """The data position lives in the JSON `extra`; a changed digit there would resume at another batch."""
    path = run_copy / "ckpt" / "4" / "extra" / "metadata"
    text = path.read_text()
    extra = json.loads(text)
    position = extra["data"]["position"]
    path.write_text(text.replace(f'"position": {position}', f'"position": {position + 16}'))
    with caplog.at_level("WARNING"):
        result = run(smoke_cfg(*BASE, "train.total_steps=6"), run_copy)
    assert "checkpoint" in caplog.text and "/4" in caplog.text and "digest" in caplog.text
    assert result["steps"] == 6 and 6 in _steps(run_copy)


def test_checkpoint_without_metadata_falls_back_instead_of_key_error(run_copy, caplog):
    """A checkpoint whose `extra` is {} (written by another tool or version) is unusable, not a KeyError."""
    shutil.rmtree(run_copy / "ckpt" / "4")
    state = jax.device_get(_restore_raw(run_copy / "ckpt", 2))
    with ocp.CheckpointManager((run_copy / "ckpt").absolute()) as mgr:
        mgr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({})))
        mgr.wait_until_finished()
    with caplog.at_level("WARNING"):
        result = run(smoke_cfg(*BASE, "train.total_steps=6"), run_copy)
    assert "/4" in caplog.text and "corrupt or incompatible" in caplog.text
    assert result["steps"] == 6


def _restore_raw(ckpt_dir: pathlib.Path, step: int):
    with ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        return mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_only_process_zero_moves_a_corrupt_checkpoint(run_copy, monkeypatch):
    from train.checkpoint import Checkpointer

    data = [p for p in (run_copy / "ckpt" / "4" / "state").rglob("*") if p.parent.name == "d"]
    for p in data:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    ckpt = Checkpointer(run_copy / "ckpt", every_steps=2, max_to_keep=3, async_save=False)
    out = ckpt.restore_latest(fault.restore_target(smoke_cfg(*BASE)))
    ckpt.close()
    assert out is not None and out[0] == 2
    assert (run_copy / "ckpt" / "4").is_dir(), "a process other than 0 moved the checkpoint"
    assert not (run_copy / "ckpt_corrupt").exists()


# ---------------------------------------------------------------- config and data changes

@pytest.mark.parametrize("override, message", [
    ("optimizer.sparse.learning_rate=0.1", "optimizer.sparse.learning_rate changed 0.05 -> 0.1"),
    ("loss.temperature=0.1", "loss.temperature changed 0.05 -> 0.1"),
    ("data.seed=1", "data.seed changed 0 -> 1"),
    ("model.id_dim=16", "model.id_dim changed 8 -> 16"),
])
def test_resume_with_changed_config_is_refused_before_writing(run_copy, override, message):
    before, steps = _snapshot(run_copy), _steps(run_copy)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.") + ".*checkpoint.allow_config_change="):
        run(smoke_cfg(*BASE, override), run_copy)
    assert _snapshot(run_copy) == before
    assert _steps(run_copy) == steps
    assert not (run_copy / "config_changes.jsonl").exists()


def test_refusal_names_every_changed_key_on_one_line(run_copy):
    with pytest.raises(ConfigError) as e:
        run(smoke_cfg(*BASE, "loss.temperature=0.1", "seed=3"), run_copy)
    text = str(e.value)
    assert "\n" not in text and str(run_copy) in text
    assert "loss.temperature changed 0.05 -> 0.1" in text and "seed changed 0 -> 3" in text
    assert "checkpoint.allow_config_change=[loss.temperature,seed]" in text


def test_allowed_config_change_resumes_and_is_recorded(run_copy):
    result = run(smoke_cfg(*BASE, "train.total_steps=6", "optimizer.sparse.learning_rate=0.1",
                           "checkpoint.allow_config_change=[optimizer.sparse.learning_rate]"), run_copy)
    assert result["steps"] == 6 and _steps(run_copy)[-1] == 6
    changes = [json.loads(line) for line in (run_copy / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 4, "changes": {"optimizer.sparse.learning_rate": [0.05, 0.1],
                                               "train.total_steps": [4, 6]}}]
    assert "learning_rate: 0.1" in (run_copy / "config.yaml").read_text()


def test_operational_changes_and_longer_training_resume_without_naming_them(run_copy, caplog):
    with caplog.at_level(logging.INFO):
        result = run(smoke_cfg(*BASE, "train.total_steps=6", "checkpoint.every_steps=3", "train.log_every_steps=1",
                               "train.prefetch=1", "eval.ks=[5]"), run_copy)
    assert "resumed" in caplog.text and result["steps"] == 6


def test_changed_data_with_the_same_config_is_refused(run_copy, monkeypatch):
    """The same config over other data (e.g. a parquet file rewritten in place): the data digests differ."""
    import train.loop as loop

    real = loop.load_dataset

    def other_data(cfg):
        ds = real(cfg)
        ds.train.item = (ds.train.item + 1) % ds.num_items
        return ds

    monkeypatch.setattr(loop, "load_dataset", other_data)
    before = _snapshot(run_copy)
    with pytest.raises(ConfigError, match=r"data\.contents changed"):
        run(smoke_cfg(*BASE), run_copy)
    assert _snapshot(run_copy) == before


# ---------------------------------------------------------------- training side

def test_non_finite_state_is_never_checkpointed(tmp_path):
    """A huge learning rate makes the state non-finite between two log steps; no such state is saved."""
    cfg = smoke_cfg(*BASE, "optimizer.dense.learning_rate=1e30", "checkpoint.every_steps=1",
                    "train.log_every_steps=4", "train.total_steps=4")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        run(cfg, tmp_path)
    for step in _steps(tmp_path):
        state = _restore_raw(tmp_path / "ckpt", step)
        for leaf in jax.tree.leaves(state):
            assert np.all(np.isfinite(np.asarray(leaf, dtype=np.float64))), f"step {step} saved non-finite"


def test_metrics_hold_each_step_once_after_a_resume(tmp_path):
    cfg = smoke_cfg("train.log_every_steps=1", "eval.max_users=50")
    run(cfg, tmp_path)
    shutil.rmtree(tmp_path / "ckpt" / "4")   # as if killed after logging steps 3-4, before checkpoint 4
    run(cfg, tmp_path)                        # replays steps 3 and 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    eval_steps = [r["step"] for r in rows if any(k.startswith("eval/") for k in r)]
    assert train_steps == [1, 2, 3, 4]
    assert eval_steps == [4]


# ---------------------------------------------------------------- model version

def test_model_version_follows_parameters_and_vocabularies(tmp_path):
    from towers.restore import load_trained
    from train.checkpoint import Checkpointer
    from train.loop import write_untrained_run

    cfg = smoke_cfg()
    a, b = tmp_path / "a", tmp_path / "b"
    write_untrained_run(cfg, a, step=1)
    write_untrained_run(cfg, b, step=1)
    version = load_trained(a).model_version
    assert load_trained(b).model_version == version          # stable: same config, data and parameters

    # Same config and step, other parameters (as retraining on changed data gives).
    state = jax.device_get(_restore_raw(b / "ckpt", 1))
    state["tables"]["item"] = state["tables"]["item"] + 1.0
    shutil.rmtree(b / "ckpt")
    ckpt = Checkpointer(b / "ckpt", every_steps=1, max_to_keep=1, async_save=False)
    ckpt.save(1, state, {"data": {}}, force=True)
    ckpt.close()
    assert load_trained(b).model_version != version

    # Same config, step and parameters, other vocabulary (ids in another order).
    c = tmp_path / "c"
    shutil.copytree(a, c)
    ids = np.load(c / "vocab" / "item.npy")
    np.save(c / "vocab" / "item.npy", ids[::-1].copy())
    assert load_trained(c).model_version != version
