"""The schema of `python -m serve.candidates` (and of its Beam pipeline): every key, its default, what it means,
and the value checks made before any JAX work. `configs/candidates.yaml` holds the same defaults.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf

from data.schema import ConfigError, described as _help, to_typed

SPLITS = ("train", "valid", "test")
SEARCH_MODES = ("auto", "exact", "index")


@dataclass
class CandidatesConfig:
    run_dir: str | None = _help(None, "run directory of `python -m train` (required)")
    step: int | None = _help(None, "checkpoint step; null = the latest", ge=0)
    index_dir: str | None = _help(None, "exported index; null = <run_dir>/export/<model_version>")
    out: str | None = _help(None, "directory of the Parquet shards (required; created)")
    k: int = _help(100, "candidates per user", gt=0)
    num_shards: int = _help(1, "users are split into this many contiguous shards, one Parquet file each", gt=0)
    shard_index: int | None = _help(None, "run only this shard (a scheduler fans out); null = every shard", ge=0)
    users: str | None = _help(None, "file of raw user ids, one per line; null = every user of the vocabulary")
    skip_unknown_users: bool = _help(False, "drop ids of users= that the vocabulary lacks instead of failing")
    pairs: str | None = _help(None, "conditional models (model.user.condition): a file of `user_id<TAB>value` "
                                    "lines; each (user, value of the condition) pair gets the user's top-k among "
                                    "the items with that value (one row per pair, with a condition column); "
                                    "null = one unconditioned row per user (users=)")
    search: str = _help("auto", "exact (blocked JAX top-k over the index's embeddings) | index (the index's own "
                                "search, ScaNN) | auto (exact when the index is exact, else index)",
                        choices=SEARCH_MODES)
    exclude_splits: list[str] = _help(["train", "valid"], "a user's items in these splits are never returned "
                                      "(seen items, as when ranking for the test evaluation); a split the data "
                                      "lacks excludes nothing", choices=SPLITS)
    overfetch: int | None = _help(None, "extra ANN candidates per user beyond k, filtered for seen items; "
                                        "null = the 90th percentile of the users' seen counts", ge=0)
    leaves_to_search: int | None = _help(None, "ScaNN leaves scanned per user; null = the index's own setting",
                                         gt=0)
    reorder: int | None = _help(None, "ScaNN candidates rescored exactly, per 10 fetched; null = the index's own",
                                gt=0)
    max_fetch: int = _help(4096, "users needing a deeper ANN fetch than this are searched exactly instead", gt=0)
    batch_size: int = _help(8192, "users per user-tower call (one compiled shape)", gt=0)
    chunk_users: int = _help(65536, "users embedded, searched and written (one Parquet row group) at a time",
                             gt=0)
    user_block: int = _help(1024, "exact search: users per block", gt=0)
    item_block: int = _help(65536, "exact search: items per tile", gt=0)
    progress: bool = _help(True, "tqdm progress bar (users/s) on stderr")


def known_keys() -> set[str]:
    """Every key a command line may set."""
    return {f.name for f in fields(CandidatesConfig)}


def validate(cfg: DictConfig | dict) -> CandidatesConfig:
    """Schema checks (keys, types, every field's range) and the checks of paths and across values, before any JAX
    work.

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
        ("pairs", c.pairs, c.pairs is None or os.path.isfile(c.pairs), "no such file (user_id<TAB>value lines)"),
        ("pairs", c.pairs, c.pairs is None or c.users is None, "give users= or pairs=, not both"),
        ("shard_index", c.shard_index, c.shard_index is None or c.shard_index < c.num_shards,
         f"must lie in [0, num_shards={c.num_shards}) or be null (every shard)"),
    ]
    for key, value, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {why}")
    return c


__all__ = ["CandidatesConfig", "ConfigError", "SEARCH_MODES", "SPLITS", "known_keys", "validate"]
