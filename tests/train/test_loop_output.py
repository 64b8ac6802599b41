"""What a training run reports: throughput that matches the wall clock, progress as plain log lines when stderr
is not a terminal, TensorBoard events that hold each step once after a resume, and the end-of-run report."""
import io
import json
import logging
import shutil
import struct
import sys

import pytest

from tests.helpers import smoke_cfg
from train.loop import Progress, print_report, run

BATCH = 256


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("per_dispatch", [1, 3])
def test_reported_throughput_matches_the_wall_clock(tmp_path, caplog, capsys, per_dispatch):
    """Steps slow on the device next to their dispatch (large batch, many negatives) and a short log window:
    timing a window before its metrics are fetched would report several times the real examples/s. Also with
    three steps per dispatch (groups, and short groups run step by step, in every window)."""
    caplog.set_level(logging.INFO, logger="twotower.train")
    cfg = smoke_cfg("train.num_devices=1", "train.total_steps=45", "train.log_every_steps=5",
                    f"train.global_batch_size={BATCH}", "loss.num_negatives=4096", "model.id_dim=64",
                    "model.output_dim=64", "checkpoint.every_steps=12", "checkpoint.max_to_keep=5",
                    "train.progress=true", f"train.steps_per_dispatch={per_dispatch}")
    result = run(cfg, tmp_path)
    rows = _rows(tmp_path)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 46, 5))

    # Windows after the first: steps / steps_per_sec, plus the checkpoint saves they set apart, is the wall-clock
    # span between the (post-synchronisation) time stamps of the first and last lines.
    reported = sum((b["step"] - a["step"]) / b["train/steps_per_sec"] + b["train/checkpoint_seconds"]
                   for a, b in zip(train_rows, train_rows[1:]))
    wall = train_rows[-1]["time"] - train_rows[0]["time"]
    assert reported == pytest.approx(wall, rel=0.1), (reported, wall)
    for r in train_rows:
        assert r["train/examples_per_sec"] == pytest.approx(r["train/steps_per_sec"] * BATCH)
    assert sum(r["train/checkpoint_seconds"] for r in train_rows) > 0   # saves at 12, 24 and 36 are set apart

    # The first step (compilation) is reported on its own, and the first window's clock starts after it.
    assert train_rows[0]["train/first_step_seconds"] > 0
    assert all("train/first_step_seconds" not in r for r in train_rows[1:])
    timing = json.loads((tmp_path / "final_metrics.json").read_text())["timing"]
    assert timing == result["timing"]
    assert timing["first_step_seconds"] == pytest.approx(train_rows[0]["train/first_step_seconds"])
    assert timing["eval_seconds"] > 0 and timing["checkpoint_seconds"] > 0
    assert timing["training_seconds"] >= wall

    # stderr is not a terminal here: one plain log line per window, no progress-bar frames.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1].split("/")[0] for line in lines] == [str(r["step"]) for r in train_rows]
    assert "examples/s" in lines[-1] and "loss" in lines[-1] and "ETA" in lines[-1]
    assert "\r" not in capsys.readouterr().err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(monkeypatch, caplog, terminal):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    caplog.set_level(logging.INFO, logger="twotower.train")
    progress = Progress(start=0, steps=4, enabled=True)
    for step in range(1, 5):
        progress.step()
        if step % 2 == 0:
            progress.window(step, {"train/loss": 1.5, "train/steps_per_sec": 2.0,
                                   "train/examples_per_sec": 512.0})
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    if terminal:
        assert "\r" in stream.getvalue() and "4/4" in stream.getvalue()
        assert lines == []
    else:
        assert stream.getvalue() == ""
        assert lines == ["step 2/4 (50%): 2.00 steps/s, 512 examples/s, loss 1.5000, ETA 0:00:01",
                         "step 4/4 (100%): 2.00 steps/s, 512 examples/s, loss 1.5000, ETA 0:00:00"]


def test_no_progress_output_when_disabled(monkeypatch, caplog):
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    caplog.set_level(logging.INFO, logger="twotower.train")
    progress = Progress(start=0, steps=2, enabled=False)
    progress.step()
    progress.window(1, {"train/loss": 1.0, "train/steps_per_sec": 1.0, "train/examples_per_sec": 1.0})
    progress.close()
    assert stream.getvalue() == "" and caplog.records == []


def _events(run_dir) -> list[list]:
    """The events of each TensorBoard file of a run, in the order the files were started (TFRecord framing:
    length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto import event_pb2
    files = []
    for path in (run_dir / "tensorboard").iterdir():
        data, events, at = path.read_bytes(), [], 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + length])
            events.append(event)
            at += 12 + length + 4
        files.append(events)
    return sorted(files, key=lambda events: events[0].wall_time)


def _scalars_as_tensorboard_shows(run_dir) -> list[tuple[str, int]]:
    """(tag, step) of every scalar TensorBoard keeps: a SessionLog START event at step S discards the events
    with step >= S read before it (tensorboard's EventAccumulator, `purge_orphaned_data`)."""
    from tensorboardX.proto import event_pb2
    kept = []
    for events in _events(run_dir):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                kept = [(tag, step) for tag, step in kept if step < event.step]
            for value in event.summary.value:
                kept.append((value.tag, event.step))
    return kept


def test_tensorboard_holds_each_step_once_after_a_resume(tmp_path):
    args = ["train.num_devices=1", "train.log_every_steps=1", "checkpoint.every_steps=2", "eval.at_end=false"]
    run(smoke_cfg(*args), tmp_path)
    # As if the run had crashed after logging steps 3 and 4 but before checkpoint 4 was written.
    shutil.rmtree(tmp_path / "ckpt" / "4")
    run(smoke_cfg(*args), tmp_path)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]
    loss_steps = [step for tag, step in _scalars_as_tensorboard_shows(tmp_path) if tag == "train/loss"]
    assert loss_steps == [1, 2, 3, 4]


def test_report_names_every_excluded_split(capsys):
    metrics = {"recall@5": 0.1, "ndcg@5": 0.05}
    ev = {"num_users": 7, "model": metrics, "most_popular": metrics,
          "protocol": {"excluded_splits": ["train", "valid"], "heldout_rows": 9, "repeat_rows_dropped": 0}}
    print_report(ev, [5])
    assert "held-out evaluation over 7 users, all items ranked, training and validation items excluded:" in \
        capsys.readouterr().out
