"""The schema of `python -m serve.candidates` (and of its Beam pipeline): every key, its default, what it means,
and the value checks made before any JAX work. `configs/candidates.yaml` holds the same defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf

from towers.config import ConfigError, _help, to_typed

SPLITS = ("train", "valid", "test")
SEARCH_MODES = ("auto", "exact", "index")


@dataclass
class CandidatesConfig:
    run_dir: str | None = _help(None, "run directory of `python -m train` (required)")
    step: int | None = _help(None, "checkpoint step; null = the latest")
    index_dir: str | None = _help(None, "exported index; null = <run_dir>/export/<model_version>")
    out: str | None = _help(None, "directory of the Parquet shards (required; created)")
    k: int = _help(100, "candidates per user")
    num_shards: int = _help(1, "users are split into this many contiguous shards, one Parquet file each")
    shard_index: int | None = _help(None, "run only this shard (a scheduler fans out); null = every shard")
    users: str | None = _help(None, "file of raw user ids, one per line; null = every user of the vocabulary")
    skip_unknown_users: bool = _help(False, "drop ids of users= that the vocabulary lacks instead of failing")
    search: str = _help("auto", "exact (blocked JAX top-k over the index's embeddings) | index (the index's own "
                                "search, ScaNN) | auto (exact when the index is exact, else index)")
    exclude_splits: list[str] = _help(["train"], "a user's items in these splits are never returned (seen items)")
    overfetch: int | None = _help(None, "extra ANN candidates per user beyond k, filtered for seen items; "
                                        "null = the 90th percentile of the users' seen counts")
    leaves_to_search: int | None = _help(None, "ScaNN leaves scanned per user; null = the index's own setting")
    reorder: int | None = _help(None, "ScaNN candidates rescored exactly, per 10 fetched; null = the index's own")
    max_fetch: int = _help(4096, "users needing a deeper ANN fetch than this are searched exactly instead")
    batch_size: int = _help(8192, "users per user-tower call (one compiled shape)")
    chunk_users: int = _help(65536, "users embedded, searched and written (one Parquet row group) at a time")
    user_block: int = _help(1024, "exact search: users per block")
    item_block: int = _help(65536, "exact search: items per tile")
    progress: bool = _help(True, "tqdm progress bar (users/s) on stderr")


def known_keys() -> set[str]:
    """Every key a command line may set."""
    return {f.name for f in fields(CandidatesConfig)}


def validate(cfg: DictConfig | dict) -> CandidatesConfig:
    """Schema and value checks, before any JAX work.

    Args:
      cfg: the composed config (Hydra DictConfig, with or without its `hydra` node) or a plain dict.
    Returns:
      the typed config.
    Raises:
      ConfigError: one line naming the key and the value.
    """
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    c = to_typed(CandidatesConfig, raw)
    checks = [
        ("run_dir", c.run_dir, c.run_dir is not None, "is required: python -m serve.candidates run_dir=PATH out=DIR"),
        ("run_dir", c.run_dir, c.run_dir is None or os.path.isdir(c.run_dir), "no such directory"),
        ("out", c.out, c.out is not None, "is required: the directory the Parquet shards go to"),
        ("out", c.out, c.out is None or not os.path.isfile(c.out), "is a file; give a directory"),
        ("users", c.users, c.users is None or os.path.isfile(c.users), "no such file (one raw user id per line)"),
        ("k", c.k, c.k > 0, "must be > 0"),
        ("num_shards", c.num_shards, c.num_shards > 0, "must be > 0"),
        ("shard_index", c.shard_index, c.shard_index is None or 0 <= c.shard_index < c.num_shards,
         f"must lie in [0, num_shards={c.num_shards}) or be null (every shard)"),
        ("search", c.search, c.search in SEARCH_MODES, f"must be one of {', '.join(SEARCH_MODES)}"),
        ("exclude_splits", c.exclude_splits, set(c.exclude_splits) <= set(SPLITS),
         f"may only name {', '.join(SPLITS)}"),
        ("overfetch", c.overfetch, c.overfetch is None or c.overfetch >= 0, "must be >= 0 or null"),
        ("max_fetch", c.max_fetch, c.max_fetch > 0, "must be > 0"),
        ("leaves_to_search", c.leaves_to_search, (c.leaves_to_search or 1) > 0, "must be > 0 or null"),
        ("reorder", c.reorder, (c.reorder or 1) > 0, "must be > 0 or null"),
        ("batch_size", c.batch_size, c.batch_size > 0, "must be > 0"),
        ("chunk_users", c.chunk_users, c.chunk_users > 0, "must be > 0"),
        ("user_block", c.user_block, c.user_block > 0, "must be > 0"),
        ("item_block", c.item_block, c.item_block > 0, "must be > 0"),
    ]
    for key, value, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {why}")
    return c


__all__ = ["CandidatesConfig", "ConfigError", "SEARCH_MODES", "SPLITS", "known_keys", "validate"]
