"""Fault injection: flips single bits in the newest checkpoint of a tiny run and reports which flips the
restore notices.

Trains `+debug=smoke` (checkpoints at steps 2 and 4), then for every file of the newest checkpoint flips one
bit at a time (random offsets, a fresh copy of the checkpoint directory per trial, so every trial sees exactly
one flip) and restores with `train.checkpoint.Checkpointer.restore_latest`, the resume path of `python -m train`.
Each trial ends as one of:

  detected   the flipped checkpoint was refused and the previous one (step 2) restored;
  harmless   the newest checkpoint was restored and every array and the data position equal the unflipped
             ones (a flip in bytes nothing reads, e.g. a timestamp in Orbax's metadata);
  SILENT     the newest checkpoint was restored with different contents: undetected corruption.

Array data (OCDBT data files under `d/` that the restore reads) must be 100% detected. A save also leaves
data files that nothing references (the per-process database's superseded B-tree versions); each `d/` file is
first deleted once to tell them apart (a file the restore does not miss is `unread`), and flips there can only
be harmless. The table lists each file's trials; the last line sums them up.

  python scripts/fault_inject_checkpoint.py                     # 8 flips per file
  python scripts/fault_inject_checkpoint.py --flips-per-file 20 --seed 1
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

OUTCOMES = ("detected", "harmless", "SILENT")


def train_tiny(run_dir: pathlib.Path, *overrides: str):
    """A finished `+debug=smoke` run in `run_dir` (checkpoints at steps 2 and 4). Returns its validated config."""
    from tests.helpers import smoke_cfg
    from train.loop import run

    cfg = smoke_cfg("eval.at_end=false", *overrides)
    run(cfg, run_dir)
    return cfg


def restore_target(cfg):
    """The abstract state `python -m train` restores into for `cfg`."""
    from train.loop import build_parts, create_state, load_data, select_devices, total_steps

    ds = load_data(cfg)
    parts = build_parts(cfg, ds, total_steps(cfg, len(ds.train)), select_devices(cfg))
    return create_state(cfg, parts, abstract=True)


def is_data_file(rel: pathlib.Path) -> bool:
    """Whether a checkpoint file is an OCDBT data file (array bytes and B-tree nodes live in `d/` directories)."""
    return rel.parent.name == "d"


def checkpoint_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The non-empty files of one checkpoint, relative to it, array data first."""
    files = [p.relative_to(step_dir) for p in sorted(step_dir.rglob("*")) if p.is_file() and p.stat().st_size]
    return sorted(files, key=lambda p: (not is_data_file(p), str(p)))


@dataclasses.dataclass
class Trial:
    file: pathlib.Path
    kind: str          # "array data" | "unread" | "metadata"
    offset: int
    bit: int
    outcome: str
    detail: str = ""


def _restore(ckpt_dir: pathlib.Path, target):
    from train.checkpoint import Checkpointer, CheckpointError

    ckpt = Checkpointer(ckpt_dir, every_steps=1, max_to_keep=100, async_save=False)
    try:
        with _quiet():
            return ckpt.restore_latest(target)
    except CheckpointError:
        return None
    finally:
        ckpt.close()


@contextlib.contextmanager
def _quiet():
    """The restore's warnings about the flipped checkpoint are the expected outcome, not news."""
    logger = logging.getLogger("train.checkpoint")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _damaged_restore(run_dir: pathlib.Path, target, newest: int, rel: pathlib.Path, damage,
                     scratch: pathlib.Path):
    """Restores a copy of `run_dir/ckpt` (in `scratch`) whose newest checkpoint's file `rel` was `damage`d."""
    ckpt = scratch / "ckpt"
    shutil.copytree(run_dir / "ckpt", ckpt)
    damage(ckpt / str(newest) / rel)
    try:
        return _restore(ckpt, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _outcome(out, reference) -> tuple[str, str]:
    if out is None:
        return "detected", "no checkpoint restored"
    step, state, extra = out
    if step != reference[0]:
        return "detected", f"fell back to step {step}"
    if _same(state, reference[1]) and extra.get("data") == reference[2]:
        return "harmless", ""
    return "SILENT", "restored with different contents"


def file_kind(run_dir: pathlib.Path, target, reference, rel: pathlib.Path, scratch: pathlib.Path) -> str:
    """"array data" for a data file the restore reads (it misses the file when deleted), "unread" for one it
    does not, "metadata" for the other files."""
    if not is_data_file(rel):
        return "metadata"
    out = _damaged_restore(run_dir, target, reference[0], rel, pathlib.Path.unlink, scratch)
    return "unread" if _outcome(out, reference)[0] == "harmless" else "array data"


def flip_trial(run_dir: pathlib.Path, target, reference, rel: pathlib.Path, kind: str, offset: int, bit: int,
               scratch: pathlib.Path) -> Trial:
    """Flips `bit` of byte `offset` of `rel` in a copy of the newest checkpoint and classifies what the restore
    does with it. `reference` is (step, state, data position) of the clean restore."""
    def flip(path: pathlib.Path):
        data = bytearray(path.read_bytes())
        data[offset] ^= 1 << bit
        path.write_bytes(bytes(data))

    outcome, detail = _outcome(_damaged_restore(run_dir, target, reference[0], rel, flip, scratch), reference)
    return Trial(rel, kind, offset, bit, outcome, detail)


def run_trials(run_dir: pathlib.Path, cfg, *, flips_per_file: int, seed: int, only_array_data: bool = False,
               scratch: pathlib.Path | None = None) -> list[Trial]:
    """`flips_per_file` single-bit flips at random offsets of every file of the newest checkpoint."""
    target = restore_target(cfg)
    reference = _restore(run_dir / "ckpt", target)
    assert reference is not None, f"{run_dir}/ckpt has no checkpoint that restores"
    reference = (reference[0], jax.device_get(reference[1]), reference[2].get("data"))
    step_dir = run_dir / "ckpt" / str(reference[0])
    rng = np.random.default_rng(seed)
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = scratch or pathlib.Path(tmp)
        for i, rel in enumerate(checkpoint_files(step_dir)):
            # A new path per restore: TensorStore caches what it read by path within a process.
            kind = file_kind(run_dir, target, reference, rel, scratch / f"probe{i}")
            if only_array_data and kind != "array data":
                continue
            size = (step_dir / rel).stat().st_size
            for _ in range(flips_per_file):
                trials.append(flip_trial(run_dir, target, reference, rel, kind, int(rng.integers(size)),
                                         int(rng.integers(8)), scratch / f"trial{len(trials)}"))
    return trials


def summarise(trials: list[Trial]) -> dict:
    """{"array data": {outcome: count}, "unread": {...}, "metadata": {...}, "all": {...}}."""
    out = {group: dict.fromkeys(OUTCOMES, 0) for group in ("array data", "unread", "metadata", "all")}
    for t in trials:
        out[t.kind][t.outcome] += 1
        out["all"][t.outcome] += 1
    return out


def report(trials: list[Trial]) -> str:
    rows, kinds = {}, {}
    for t in trials:
        rows.setdefault(str(t.file), dict.fromkeys(OUTCOMES, 0))[t.outcome] += 1
        kinds[str(t.file)] = t.kind
    width = max(len(f) for f in rows)
    lines = [f"{'file':{width}s}  {'kind':10s}" + "".join(f"{o:>10s}" for o in OUTCOMES)]
    for f, counts in rows.items():
        lines.append(f"{f:{width}s}  {kinds[f]:10s}" + "".join(f"{counts[o]:10d}" for o in OUTCOMES))
    s = summarise(trials)
    arrays, every = s["array data"], s["all"]
    n_arrays = sum(arrays.values())
    lines.append(f"summary: {len(trials)} single-bit flips in {len(rows)} files; array data: "
                 f"{arrays['detected']}/{n_arrays} detected ({100 * arrays['detected'] / max(n_arrays, 1):.0f}%), "
                 f"{arrays['SILENT']} silent; all files: {every['detected']} detected, {every['harmless']} harmless, "
                 f"{every['SILENT']} silent")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flips-per-file", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", help="train into (and keep) this directory; default a temporary one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = pathlib.Path(args.run_dir or pathlib.Path(tmp) / "run").absolute()
        cfg = train_tiny(run_dir)
        trials = run_trials(run_dir, cfg, flips_per_file=args.flips_per_file, seed=args.seed)
    print(report(trials))
    s = summarise(trials)
    return 0 if s["array data"]["detected"] == sum(s["array data"].values()) and not s["all"]["SILENT"] else 1


if __name__ == "__main__":
    sys.exit(main())
