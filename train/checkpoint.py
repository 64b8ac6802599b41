"""Orbax checkpoints of the train state plus the data position, with fallback past corrupt checkpoints.

Each checkpoint is `ckpt/<step>/{state, extra}`: `state` is the single-copy train-state pytree (Orbax
StandardSave, restored straight into the launcher's layout through an abstract target), `extra` is JSON: the data
iterator position and the config hash. Orbax writes into a temporary directory and renames it when complete, so
a run killed mid-save leaves no half checkpoint behind; a checkpoint damaged later (truncated or missing files)
fails to restore, is reported, and the previous one is tried.
"""
from __future__ import annotations

import logging
import pathlib
import shutil
import time

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist (all are corrupt)."""


class Checkpointer:
    def __init__(self, directory: pathlib.Path, *, every_steps: int, max_to_keep: int, async_save: bool):
        self.directory = pathlib.Path(directory).absolute()
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, extra: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the cadence (or `force`). Returns whether a save started."""
        if not force and step % self.every_steps:
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """Restores the newest checkpoint that loads; warns about each corrupt one skipped.

        Returns (step, state, extra), or None when the directory has no checkpoint.
        Raises CheckpointError when checkpoints exist but none can be restored.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                          extra=ocp.args.JsonRestore())
                out = self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failures.append(f"step {step}: {first[:300]}")
                log.warning("checkpoint %s/%d is corrupt or incompatible, trying an older one: %s",
                            self.directory, step, first[:300])
                continue
            if failures:
                self._quarantine([s for s in steps if s > step])
            return step, out["state"], dict(out["extra"])
        if failures:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
                                  + ". Delete the directory to start over, or fix the config to match.")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unusable newer checkpoints aside (kept for inspection) so training can write those steps anew."""
        aside = self.directory.parent / f"{self.directory.name}_corrupt"
        aside.mkdir(exist_ok=True)
        for step in steps:
            target = aside / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), str(target))
            log.warning("moved unusable checkpoint %d to %s", step, target)
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
