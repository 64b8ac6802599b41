"""Metric output: one JSON line per log step (`metrics.jsonl`) and TensorBoard events (tensorboardX, no
TensorFlow needed), both under the run directory.

A resumed run passes `purge_step`, its first step: TensorBoard then hides the events of that step and later
ones written before (by an attempt that crashed after logging them), so each step shows once, as in
`metrics.jsonl` (whose replayed lines `train.resume.drop_replayed_metrics` removes)."""
from __future__ import annotations

import json
import pathlib
import time


class MetricWriter:
    def __init__(self, run_dir: pathlib.Path, *, tensorboard: bool = True, purge_step: int | None = None):
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, float]):
        row = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                # TensorBoard tags may not contain '@': recall@10 -> recall_at_10
                self._tb.add_scalar(k.replace("@", "_at_"), float(v), int(step))

    def close(self):
        self._file.close()
        if self._tb is not None:
            self._tb.close()
