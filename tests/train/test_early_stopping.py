"""Early stopping on the validation split (`train.early_stopping`, `eval.valid_every_steps`): the run stops once
the metric stops improving, the final (test) evaluation is of the best checkpoint's state, and a resume after a
kill carries on with the best-so-far tracking."""
import json

import pytest

from tests.helpers import smoke_cfg
from train import loop
from train.checkpoint import Checkpointer
from train.config import ConfigError

ES = ("data.valid_fraction=0.2", "train.total_steps=12", "eval.valid_every_steps=2",
      "train.early_stopping.metric=recall@10")


def _restore(directory, cfg):
    """(step, single-copy state) of the newest checkpoint in `directory`, and the parts to evaluate it."""
    ds = loop.load_data(cfg)
    parts = loop.build_parts(cfg, ds, loop.total_steps(cfg, len(ds.train)), loop.select_devices(cfg))
    ckpt = Checkpointer(directory, every_steps=1, max_to_keep=3, async_save=False)
    step, state, _ = ckpt.restore_latest(loop.create_state(cfg, parts, abstract=True))
    ckpt.close()
    return step, state, parts, ds


def _valid_lines(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["valid/model/recall@10"] for r in rows if "valid/model/recall@10" in r}


def test_stops_when_the_metric_stops_improving_and_evaluates_the_best_state(tmp_path):
    # min_delta=1 (recall cannot rise by 1): the first evaluation is the best and no later one improves on it.
    cfg = smoke_cfg(*ES, "train.early_stopping.patience=2", "train.early_stopping.min_delta=1.0")
    result = loop.run(cfg, tmp_path)
    es = result["early_stopping"]
    assert (es["best_step"], es["stopped_at"], es["planned_steps"]) == (2, 6, 12)
    valid = _valid_lines(tmp_path)
    assert sorted(valid) == [2, 4, 6]                           # no evaluation (or step) after the stop
    assert es["best_metric"] == pytest.approx(valid[2])
    assert max(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == 6
    assert json.loads((tmp_path / "final_metrics.json").read_text())["early_stopping"] == es
    # The final evaluation is of the best checkpoint's state, not of the last step's.
    step, best, parts, ds = _restore(tmp_path / "ckpt_best", cfg)
    assert step == 2
    ev = loop.final_eval(cfg, parts.model, parts.graphdef, best, ds)
    assert ev["model"] == result["eval"]["model"]
    _, last, _, _ = _restore(tmp_path / "ckpt", cfg)
    ev_last = loop.final_eval(cfg, parts.model, parts.graphdef, last, ds)
    assert ev_last["model"] != result["eval"]["model"]
    # The validation metric of the restored best state is the one recorded.
    ev_valid = loop.final_eval(cfg, parts.model, parts.graphdef, best, ds, split="valid", baselines=False)
    assert ev_valid["model"]["recall@10"] == pytest.approx(es["best_metric"])


def _run_killed_after_validation(monkeypatch, cfg, run_dir, kill_step: int) -> None:
    """Runs `cfg` into `run_dir`, killed (KeyboardInterrupt) right after the validation of step `kill_step`."""
    original = loop.Validation.__call__

    def killed(self, step, *args):
        out = original(self, step, *args)
        if step == kill_step:
            raise KeyboardInterrupt("killed")
        return out

    monkeypatch.setattr(loop.Validation, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, run_dir)
    monkeypatch.undo()


def test_resume_after_a_kill_keeps_the_best_so_far(tmp_path, monkeypatch):
    cfg = smoke_cfg(*ES, "train.early_stopping.patience=1", "checkpoint.every_steps=4")
    reference = loop.run(cfg, tmp_path / "ref")

    _run_killed_after_validation(monkeypatch, cfg, tmp_path / "run", 6)
    # Killed after step 6 improved the best (saved) and before step 6's periodic checkpoint: resume from step 4.
    assert [p.name for p in (tmp_path / "run" / "ckpt_best").iterdir() if p.name.isdigit()] == ["6"]
    assert max(int(p.name) for p in (tmp_path / "run" / "ckpt").iterdir() if p.name.isdigit()) == 4
    resumed = loop.run(cfg, tmp_path / "run")
    assert resumed["early_stopping"] == reference["early_stopping"]
    assert reference["early_stopping"]["stopped_at"] < 12
    assert resumed["eval"]["model"] == reference["eval"]["model"]
    assert _valid_lines(tmp_path / "run") == _valid_lines(tmp_path / "ref")
    # A second run of a stopped run trains nothing and evaluates the same best state.
    again = loop.run(cfg, tmp_path / "run")
    assert again["early_stopping"] == reference["early_stopping"] and again["train"] == {}
    assert again["eval"]["model"] == reference["eval"]["model"]


@pytest.mark.parametrize("overrides, key", [
    (("train.early_stopping.metric=recall@10", "eval.valid_every_steps=2"), "data.valid_fraction"),
    (("train.early_stopping.metric=recall@10", "data.valid_fraction=0.2"), "eval.valid_every_steps"),
    (("train.early_stopping.metric=recall@7", "data.valid_fraction=0.2", "eval.valid_every_steps=2"), "eval.ks"),
    (("eval.valid_every_steps=2",), "data.valid_fraction"),
])
def test_config_errors_name_the_missing_piece(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        smoke_cfg(*overrides)


PLATEAU = (*ES, "train.early_stopping.patience=3", "train.early_stopping.min_delta=1.0",
           "optimizer.sparse.plateau_patience=2", "checkpoint.every_steps=2")


def test_reduce_on_plateau_scales_the_sparse_rate_and_survives_a_resume(tmp_path, monkeypatch):
    # Every evaluation after the first is without improvement: the rate halves at step 6 (the 2nd evaluation
    # without improvement), and the run stops at step 8 (the 3rd).
    cfg = smoke_cfg(*PLATEAU, "optimizer.sparse.plateau_factor=0.5")
    reference = loop.run(cfg, tmp_path / "ref")
    es = reference["early_stopping"]
    assert (es["best_step"], es["stopped_at"], es["sparse_lr_scale"]) == (2, 8, 0.5)
    plain = loop.run(smoke_cfg(*PLATEAU), tmp_path / "plain")
    assert "sparse_lr_scale" not in plain["early_stopping"]
    with_plateau, without = _valid_lines(tmp_path / "ref"), _valid_lines(tmp_path / "plain")
    assert [with_plateau[s] for s in (2, 4, 6)] == [without[s] for s in (2, 4, 6)]   # same until the reduction
    assert with_plateau[8] != without[8]

    # The reduced rate is the configured one times the scale, for a float rate and for a schedule.
    ds = loop.load_data(cfg)
    parts = loop.build_parts(cfg, ds, 12, loop.select_devices(cfg), sparse_lr_scale=0.25)
    assert parts.sparse_opts["item"].learning_rate == pytest.approx(0.25 * cfg.optimizer.sparse.learning_rate)
    cos = smoke_cfg(*PLATEAU, "optimizer.sparse.plateau_factor=0.5", "optimizer.sparse.schedule=cosine")
    lr = loop.build_parts(cos, ds, 12, loop.select_devices(cos), sparse_lr_scale=0.25).sparse_opts["item"].learning_rate
    from train.state import sparse_learning_rate
    base = sparse_learning_rate(cos.optimizer.sparse, 12)
    assert [float(lr(s)) for s in (0, 5, 11)] == pytest.approx([0.25 * float(base(s)) for s in (0, 5, 11)])

    # Killed at step 8 (after its validation): the resume from step 6 keeps the scale 0.5 reduced there.
    _run_killed_after_validation(monkeypatch, cfg, tmp_path / "run", 8)
    assert max(int(p.name) for p in (tmp_path / "run" / "ckpt").iterdir() if p.name.isdigit()) == 6
    resumed = loop.run(cfg, tmp_path / "run")
    assert resumed["early_stopping"] == es
    assert _valid_lines(tmp_path / "run") == with_plateau
    assert resumed["eval"]["model"] == reference["eval"]["model"]


def test_plateau_needs_the_validation_metric():
    with pytest.raises(ConfigError, match=r"optimizer\.sparse\.plateau_factor"):
        smoke_cfg("optimizer.sparse.plateau_factor=0.5")


def test_prepared_dataset_validates_like_the_in_memory_one(tmp_path):
    from data.load import load
    from data.prepared.write import write_dataset
    es = ("train.total_steps=6", "eval.valid_every_steps=2", "train.early_stopping.metric=recall@10",
          "train.early_stopping.patience=2", "train.early_stopping.min_delta=1.0")
    mem_cfg = smoke_cfg("data.valid_fraction=0.2", *es)
    write_dataset(load(mem_cfg.data), tmp_path / "prepared", num_shards=3, config={})
    disk_cfg = smoke_cfg("data=prepared", "data.source=prepared", f"data.path={tmp_path / 'prepared'}", *es)
    mem, disk = loop.run(mem_cfg, tmp_path / "mem"), loop.run(disk_cfg, tmp_path / "disk")
    assert disk["early_stopping"] == mem["early_stopping"] and mem["early_stopping"]["best_step"] == 2
    assert _valid_lines(tmp_path / "disk") == _valid_lines(tmp_path / "mem")
    assert disk["eval"]["model"] == pytest.approx(mem["eval"]["model"])


def test_validation_every_epochs_follows_the_train_split():
    from train.loop import load_data, valid_every
    cfg = smoke_cfg("data.valid_fraction=0.2", "eval.valid_every_epochs=0.5")
    ds = load_data(cfg)
    assert valid_every(cfg, len(ds.train)) == round(0.5 * len(ds.train) / cfg.train.global_batch_size)
    assert valid_every(smoke_cfg("data.valid_fraction=0.2", "eval.valid_every_steps=3"), len(ds.train)) == 3
    with pytest.raises(ConfigError, match="not both"):
        smoke_cfg("data.valid_fraction=0.2", "eval.valid_every_steps=3", "eval.valid_every_epochs=1")
    with pytest.raises(ConfigError, match="eval.valid_every_epochs=1.0: evaluates on the validation split"):
        smoke_cfg("eval.valid_every_epochs=1")
