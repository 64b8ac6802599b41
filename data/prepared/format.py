"""The on-disk layout of a prepared dataset, and its manifest.

A prepared dataset is a directory:

    manifest.json            what is here: counts per split and shard, the source and data config, the stats,
                             the feature specs, and the size and sha256 of every other file
    shard-00000-of-00008.array_record ...
                             one ArrayRecord record per user (`encode_user`), users in row order; shard k holds
                             the users [manifest.shards[k].users[0], manifest.shards[k].users[1])
    user_counts.npy          int64 [U, 3]: train, valid and test rows per user (the example index: a train example
                             is (user, position), users in row order, so example e of an epoch is found by a
                             binary search of the running train counts)
    item_counts.npy          int64 [I]: train rows per item (log q of the in-batch sampler)
    vocab/user.npy, vocab/item.npy, vocab/feature_<name>.npy   raw ids / raw feature values (no pickle)
    features/user_<name>.npy, features/item_<name>.npy         side features by vocabulary row

Per-user records are what makes the format fit any log size: every value an example needs that depends on other
rows (the user's history before it, the items to exclude at evaluation) is within one record, so a reader only
ever holds the records of the users in its current batch, and memory grows with users and items, never with
interactions.
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from data.errors import DataError
from data.paths import sha256_file

FORMAT = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
HEADER = 4  # int64 words: user row, train, valid and test counts


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.array_record"


def encode_user(user: int, items: list[np.ndarray], ts: list[np.ndarray]) -> bytes:
    """One user's record: int64 [user, n_train, n_valid, n_test], int32 items, int64 timestamps, per split in
    canonical (time) order."""
    head = np.array([user, *(len(x) for x in items)], np.int64)
    return (head.tobytes() + np.concatenate(items).astype(np.int32).tobytes()
            + np.concatenate(ts).astype(np.int64).tobytes())


def decode_user(record: bytes) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(user row, {split: int32 items}, {split: int64 timestamps}) of a record written by `encode_user`."""
    head = np.frombuffer(record, np.int64, HEADER)
    n = int(head[1:].sum())
    items = np.frombuffer(record, np.int32, n, offset=8 * HEADER)
    ts = np.frombuffer(record, np.int64, n, offset=8 * HEADER + 4 * n)
    if len(record) != 8 * HEADER + 12 * n:
        raise DataError(f"corrupt user record ({len(record)} bytes for {n} rows)")
    ends = np.cumsum(head[1:])
    starts = ends - head[1:]
    return (int(head[0]), {s: items[a:b] for s, a, b in zip(SPLITS, starts, ends)},
            {s: ts[a:b] for s, a, b in zip(SPLITS, starts, ends)})


def save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    """Writes `array` as .npy without pickle, to a temporary name then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)
    os.replace(tmp, path)


def write_manifest(root: pathlib.Path, manifest: dict) -> None:
    """Records the size and sha256 of every file under `root` named in `manifest["files"]`'s keys, then writes
    the manifest atomically (last: a directory without one is unfinished)."""
    for name in manifest["files"]:
        p = root / name
        manifest["files"][name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: os.PathLike, verify: str = "full") -> dict:
    """The manifest of the prepared dataset at `root`, after checking its files.

    Args:
      root: the directory.
      verify: "full" (every file's size and sha256), "size" (sizes only; for a quick start on a trusted copy)
        or "none".

    Raises:
      DataError naming the missing, extra-sized or changed file.
    """
    root = pathlib.Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise DataError(f"{root}: no prepared dataset here (not a directory); run `python -m data.prepare` first")
    if not path.is_file():
        raise DataError(f"{path}: missing; {root} is not a finished prepared dataset (an interrupted "
                        "`python -m data.prepare`? run it again: finished shards are kept)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r}, this version reads format {FORMAT}")
    if verify not in ("full", "size", "none"):
        raise DataError(f"data.verify must be full, size or none, got {verify!r}")
    for name, want in manifest["files"].items():
        p = root / name
        if verify == "none":
            continue
        if not p.is_file():
            raise DataError(f"{p}: missing from the prepared dataset (listed in {path})")
        if p.stat().st_size != want["bytes"]:
            raise DataError(f"{p}: {p.stat().st_size} bytes, the manifest says {want['bytes']}: the file changed "
                            "or was cut short; prepare the dataset again")
        if verify == "full" and sha256_file(p) != want["sha256"]:
            raise DataError(f"{p}: sha256 does not match the manifest: the file is corrupt or was changed; "
                            "prepare the dataset again")
    return manifest
