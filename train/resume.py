"""What a resume may change: the config and data fingerprint stored with every checkpoint, and the check that
compares it with the current run before anything in the run directory is written.

Every checkpoint's `extra["config"]` holds the resolved config flattened to dotted keys, plus two digests of
the loaded data: `data.vocabularies` (every vocabulary's raw ids, the row order the ID tables follow) and
`data.contents` (the interactions of every split, the side features and their specs, the load statistics).
A resume compares them with the current run's:

- keys that do not change what is trained are ignored: how progress, metrics and checkpoints are written
  (`train.progress`, `train.log_every_steps`, `train.prefetch`, `train.steps_per_dispatch`, `checkpoint.*`), the
  end-of-run evaluation (`eval.*`), where the devices and processes are (`train.launcher`, `train.num_devices`,
  `train.distributed.*`, `mesh.*`: a run resumes on another mesh with the same numbers up to the order of
  floating-point sums) and where TFDS keeps its files (`data.data_dir`, `data.download`);
- `train.total_steps` and `train.num_epochs` may change (resuming to train longer is normal; with a cosine
  schedule the remaining steps then follow the new horizon);
- a key the checkpoint does not record (added to the schema after it was written) is accepted when it holds
  its schema default, which keeps the behaviour the checkpoint was trained with (a new knob defaults to the old
  behaviour); at any other value it is a change like the rest;
- any other difference refuses the resume with a `ConfigError` naming each changed key, unless
  `checkpoint.allow_config_change` names it.

Accepted changes, lengths included, are appended to `config_changes.jsonl` in the run directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib

import numpy as np
from omegaconf import OmegaConf

from data.schema import ConfigError
from towers.restore import vocabularies_digest

log = logging.getLogger("twotower.train")

IGNORED = ("train.progress", "train.log_every_steps", "train.prefetch", "train.steps_per_dispatch", "train.launcher",
           "train.num_devices", "train.distributed.", "mesh.", "checkpoint.", "eval.", "data.data_dir", "data.download")
LENGTH = ("train.total_steps", "train.num_epochs")
DATA_KEYS = ("data.vocabularies", "data.contents")
_ABSENT = "<absent>"


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED)


def data_contents_digest(ds) -> str:
    """sha256 of the interactions of every split, the side features and their specs, and the load statistics."""
    h = hashlib.sha256()
    if hasattr(ds, "manifest"):   # a prepared dataset: its manifest holds the sha256 of every file
        h.update(json.dumps({k: ds.manifest[k] for k in ("files", "stats", "rows", "config")}, sort_keys=True,
                            default=str).encode())
        return h.hexdigest()

    def add(name: str, array) -> None:
        array = np.ascontiguousarray(array)
        h.update(f"{name}:{array.dtype.str}:{array.shape}:".encode())
        h.update(array.tobytes())

    for split in ("train", "valid", "test"):
        inter = getattr(ds, split)
        for column in ("user", "item", "timestamp"):
            value = None if inter is None else getattr(inter, column)
            if value is not None:
                add(f"{split}.{column}", value)
    for side in ("user", "item"):
        for name, values in sorted(getattr(ds, f"{side}_features").items()):
            add(f"{side}.{name}", values)
    specs = {"user": [dataclasses.asdict(s) for s in ds.user_feature_specs],
             "item": [dataclasses.asdict(s) for s in ds.item_feature_specs]}
    h.update(json.dumps({"specs": specs, "stats": ds.stats, "cold_items": np.asarray(ds.cold_items).tolist()},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def schema_defaults() -> dict[str, object]:
    """Every training config key at its schema default, flattened like `fingerprint`."""
    from train.config import Config
    return _flatten(OmegaConf.to_container(OmegaConf.structured(Config)))


def fingerprint(c, ds) -> dict[str, object]:
    """The resolved config as {dotted key: value} plus the two data digests: what each checkpoint records."""
    out = _flatten(OmegaConf.to_container(OmegaConf.structured(c)))
    out["data.vocabularies"] = vocabularies_digest(ds.user_vocab, ds.item_vocab, ds.feature_vocabs)
    out["data.contents"] = data_contents_digest(ds)
    return out


def _shown(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(ch in "0123456789abcdef" for ch in value):
        return value[:12]   # a digest
    return str(value)


def check(run_dir: pathlib.Path, step: int, saved: dict | None, current: dict[str, object],
          allowed: list[str]) -> dict[str, list]:
    """The changes from checkpoint `step`'s fingerprint `saved` to `current` that a resume accepts.

    Returns:
      {key: [old, new]}: the allowed and the length changes, and the keys added at their default (old value
      "<absent>"); empty when nothing that matters changed.
    Raises:
      ConfigError: a key of `allowed` that no config has; a checkpoint without a fingerprint; or a change
        `allowed` does not name (one line naming every such key, old and new value, and the override to pass).
    """
    unknown = [k for k in allowed if k not in current]
    if unknown:
        raise ConfigError(f"checkpoint.allow_config_change={list(allowed)}: {', '.join(unknown)} is not a config "
                          f"key (nor {' / '.join(DATA_KEYS)})")
    if not isinstance(saved, dict):
        raise ConfigError(f"resume of {run_dir} refused: checkpoint {step} records no config to compare with "
                          "(not written by `python -m train`); train in a new run directory or set "
                          "checkpoint.resume=false")
    changed = {k: [saved.get(k, _ABSENT), current.get(k, _ABSENT)] for k in sorted(set(saved) | set(current))
               if not _ignored(k) and saved.get(k, _ABSENT) != current.get(k, _ABSENT)}
    defaults = schema_defaults()
    added_at_default = {k for k, (old, new) in changed.items()
                        if old == _ABSENT and k in defaults and new == defaults[k]}
    refused = [k for k in changed if k not in LENGTH and k not in allowed and k not in added_at_default]
    if refused:
        what = ", ".join(f"{k} changed {_shown(changed[k][0])} -> {_shown(changed[k][1])}" for k in refused)
        raise ConfigError(f"resume of {run_dir} from checkpoint {step} refused: {what}; pass "
                          f"checkpoint.allow_config_change=[{','.join(refused)}] to accept, or use a new run "
                          "directory")
    return changed


def record(run_dir: pathlib.Path, step: int, changes: dict[str, list]) -> None:
    """Appends the changes a resume from `step` accepted to `config_changes.jsonl` and logs them."""
    if not changes:
        return
    log.warning("resuming from step %d with config changes: %s", step,
                ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items()))
    with open(pathlib.Path(run_dir) / "config_changes.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "changes": changes}, default=str) + "\n")


def drop_replayed_metrics(run_dir: pathlib.Path, step: int, *, evaluates_at: int | None) -> None:
    """Removes the `metrics.jsonl` lines a resume from `step` writes again: those of later steps (logged by the
    attempt that crashed after checkpoint `step`), and the evaluation at `step` when this run evaluates there
    again (`evaluates_at`). Each step then appears once."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # the torn last line of a killed run
            continue
        is_eval = any(k.startswith("eval/") for k in row)
        if row["step"] > step or (is_eval and row["step"] == evaluates_at):
            continue
        kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)
