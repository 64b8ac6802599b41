"""Orbax checkpoints of the train state plus the data position, verified on restore, with fallback past corrupt
checkpoints.

Each checkpoint is `ckpt/<step>/{state, extra}`: `state` is the single-copy train-state pytree (Orbax
StandardSave, restored straight into the launcher's layout through an abstract target), `extra` is JSON: the data
iterator position, what the caller adds (`train.resume` adds the config and data fingerprint), a checksum of
every array of the state as saved (`towers.restore.checksums`, computed on the devices before the save starts,
so an async save is covered too) and a sha256 `digest` of the rest of `extra`.

Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save leaves no half
checkpoint behind. A checkpoint damaged later is unusable when any of these fails: its files load (truncated or
missing files do not), `extra` matches its digest and holds the data position and checksums, and every restored
array matches its checksum (a flipped bit anywhere in the array data). An unusable checkpoint is reported,
moved aside (by process 0 alone), and the previous one is tried. A state with NaN or inf is never saved.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from towers.restore import checksums, mismatches

log = logging.getLogger(__name__)

REQUIRED = ("data", "checksums", "digest")   # keys of `extra` every usable checkpoint has


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist (all are corrupt)."""


class NonFiniteState(ValueError):
    """The state to save holds NaN or inf (it is not saved)."""


class _Unusable(Exception):
    """This checkpoint is corrupt or was not written by this code."""


def extra_digest(extra: dict) -> str:
    """sha256 of `extra` without its `digest` key, as canonical JSON."""
    body = {k: v for k, v in extra.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _everywhere(ok: bool) -> bool:
    """Whether `ok` holds on every process, so all of them make the same choice of checkpoint (each reads only
    its own shards and could meet a damaged file the others do not)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


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
        """Saves when `step` is on the cadence (or `force`). Returns whether a save started.

        Raises:
          NonFiniteState: the state holds NaN or inf; nothing is saved.
        """
        if not force and step % self.every_steps:
            return False
        sums, nonfinite = checksums(state)
        if nonfinite:
            raise NonFiniteState(f"non-finite values in {', '.join(nonfinite[:5])} at step {step}; not saved")
        extra = {**extra, "checksums": sums}
        extra["digest"] = extra_digest(extra)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
        return self.manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_state, accept: Callable[[int, dict], None] | None = None
                       ) -> tuple[int, object, dict] | None:
        """Restores the newest checkpoint that loads and verifies; warns about each unusable one skipped.

        Args:
          abstract_state: the restore target (shapes, dtypes, shardings).
          accept: called with (step, extra) of a checkpoint whose `extra` verified, before its state is read;
            whatever it raises (e.g. a refused config change) propagates, with nothing moved.
        Returns:
          (step, state, extra), or None when the directory has no checkpoint.
        Raises:
          CheckpointError: checkpoints exist but none can be restored.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            extra = self._attempt(step, failures, self._read_extra, step)
            if extra is None:
                continue
            if accept is not None:
                accept(step, extra)
            state = self._attempt(step, failures, self._read_state, step, abstract_state, extra["checksums"])
            if state is None:
                continue
            if failures:
                self._quarantine([s for s in steps if s > step])
            return step, state, extra
        if failures:
            raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(failures)
                                  + ". Delete the directory to start over, or fix the config to match.")
        return None

    def _attempt(self, step: int, failures: list[str], read, *args):
        """`read(*args)`, or None (with a warning and an entry in `failures`) when any process failed."""
        try:
            out, why = read(*args), None
        except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
            out, why = None, str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if _everywhere(why is None):
            return out
        why = why or "unusable on another process"
        failures.append(f"step {step}: {why}")
        log.warning("checkpoint %s/%d is corrupt or incompatible, trying an older one: %s", self.directory, step, why)
        return None

    def _read_extra(self, step: int) -> dict:
        extra = self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        if not isinstance(extra, dict) or any(k not in extra for k in REQUIRED):
            have = sorted(extra) if isinstance(extra, dict) else type(extra).__name__
            raise _Unusable(f"extra lacks {', '.join(k for k in REQUIRED if k not in (extra or {}))} (has {have}); "
                            "not written by this version of `python -m train`")
        if extra["digest"] != extra_digest(extra):
            raise _Unusable("extra (data position, config, checksums) does not match its digest")
        return dict(extra)

    def _read_state(self, step: int, abstract_state, expected: dict[str, str]):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        state = self.manager.restore(step, args=args)["state"]
        bad = mismatches(checksums(state)[0], expected)
        if bad:
            raise _Unusable(f"checksum mismatch in {', '.join(bad[:5])}" + (f" and {len(bad) - 5} more" if
                                                                            len(bad) > 5 else ""))
        return state

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unusable newer checkpoints aside (kept for inspection) so training can write those steps anew.
        Process 0 moves them; the others wait for it, then see the directory as it left it."""
        if jax.process_index() == 0:
            aside = self.directory.parent / f"{self.directory.name}_corrupt"
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / f"{step}-{int(time.time())}"
                shutil.move(str(self.directory / str(step)), str(target))
                log.warning("moved unusable checkpoint %d to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("twotower.checkpoint.quarantine")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
