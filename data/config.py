"""The schema of the `data:` config group: every key any source reads, with defaults and a description.

`resolve_config` turns a composed Hydra node (an OmegaConf `DictConfig`), a plain mapping or any attribute
object into a checked `DataConfig`: unknown keys and out-of-range values raise `DataError` naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Optional

from data.errors import DataError
from data.schema import described as _key, out_of_range, with_range

SOURCES = ("synthetic", "movielens", "lightgcn", "parquet", "tfds", "prepared")
SPLITS = ("given", "temporal")
HISTORY_MODES = ("causal", "sample")


@dataclass
class DataConfig:
    """Keys of the `data:` group. See each field's `metadata["help"]` (also `describe()`)."""

    source: str = _key("synthetic", "where interactions come from: " + " | ".join(SOURCES), choices=SOURCES)
    name: Optional[str] = _key(None, "tfds: dataset name (e.g. movielens/100k-ratings); others: display name")
    path: Optional[str] = _key(None, "movielens/lightgcn/prepared: directory; parquet: .parquet/.csv file or directory "
                                     "(relative paths are also tried under $TWOTOWER_DATA_DIR)")
    # synthetic
    num_users: int = _key(20_000, "synthetic: number of users", ge=1)
    num_items: int = _key(10_000, "synthetic: number of items", ge=1)
    interactions_per_user: float = _key(30.0, "synthetic: mean interactions per user (each user has >= 3)", ge=3)
    num_clusters: int = _key(50, "synthetic: latent item clusters (users prefer 1-3 of them)", ge=1)
    popularity_exponent: float = _key(1.0, "synthetic: power-law exponent of item popularity in a cluster", ge=0)
    seed: int = _key(0, "synthetic: generator seed (same seed, same data)", ge=0)
    # movielens
    min_rating: Optional[float] = _key(None, "movielens/parquet: drop ratings below this (counted in stats); "
                                             "null keeps every rating")
    title_vocab_size: int = _key(20_000, "movielens/tfds: title-token vocabulary cap, row 0 is the OOV bucket",
                                 ge=2)
    title_max_len: int = _key(8, "movielens/tfds: title tokens kept per movie (extra tokens are counted)", ge=1)
    # parquet / csv logs
    user_column: str = _key("user_id", "parquet: column with raw user ids")
    item_column: str = _key("item_id", "parquet: column with raw item ids")
    timestamp_column: Optional[str] = _key("timestamp", "parquet: time column (optional in the file)")
    rating_column: Optional[str] = _key(None, "parquet: rating column used by min_rating")
    user_feature_columns: List[str] = _key([], "parquet: per-user feature columns (strings/ints -> categorical, "
                                               "floats -> dense, lists -> multihot)")
    item_feature_columns: List[str] = _key([], "parquet: per-item feature columns, same rules")
    multihot_max_len: int = _key(16, "parquet: slots for list-valued feature columns (extra values counted)",
                                 ge=1)
    # tfds
    data_dir: Optional[str] = _key(None, "tfds: TFDS data directory (default: TFDS's own)")
    download: bool = _key(False, "tfds: allow TFDS to download (never in tests)")
    # split and filters
    split: Optional[str] = _key(None, "given (source's test split) | temporal; null: given where the source "
                                      "has a test split, else temporal", choices=SPLITS)
    test_fraction: float = _key(0.2, "temporal: per user, the last floor(f*n) (at least 1) interactions are test",
                                ge=0, lt=1)
    valid_fraction: float = _key(0.0, "per user, carve floor(f*n_train) (at least 1) of the latest train "
                                      "interactions as validation (equal timestamps ordered by split_seed, so "
                                      "a given split without time gets a seeded random share); 0 = no "
                                      "validation split", ge=0, lt=1)
    split_seed: int = _key(0, "seed of the tie-break between interactions with equal timestamps (temporal test "
                              "and validation, given-split validation)", ge=0)
    cold_item_fraction: float = _key(0.0, "cold-start protocol: this share of the items with interactions is "
                                          "held out of train and valid entirely; all their interactions go "
                                          "to test (Dataset.cold_items lists them); 0 = off", ge=0, lt=1)
    cold_item_seed: int = _key(0, "seed of the permutation that picks the cold items", ge=0)
    min_user_interactions: int = _key(1, "drop users with fewer interactions (counted in stats)", ge=1)
    drop_duplicates: bool = _key(False, "drop repeated (user, item) pairs, keeping the earliest (counted); "
                                        "false keeps them as separate interactions")
    # history features, read by batching, eval and serving
    verify: str = _key("full", "prepared: check every file against the manifest before reading: full (sha256), "
                               "size (sizes only, a quick start on a trusted copy) or none",
                       choices=("full", "size", "none"))
    input_threads: int = _key(1, "training input: threads preparing batches ahead of the step (Grain ReadOptions)",
                              ge=1, le=64)
    input_workers: int = _key(0, "training input: worker processes preparing batches (Grain mp_prefetch; 0 = "
                                 "threads in the training process only)", ge=0, le=64)
    history_len: int = _key(50, "items of user history per example (0 = none)", ge=0)
    history_mode: str = _key("causal", "causal: the train items just before the example; sample: random other "
                                       "train items of the user", choices=HISTORY_MODES)
    item_history_len: int = _key(50, "users of the item's audience per example, when model.item.use_history "
                                     "(a sample of its other train users; inference pools all of them)", ge=0)


def describe() -> str:
    """One line per key: `name (default): help [allowed values]`."""
    return "\n".join(f"{f.name} ({f.default if f.default is not dataclasses.MISSING else f.default_factory()!r})"
                     f": {with_range(f)}" for f in dataclasses.fields(DataConfig))


def _as_dict(cfg) -> dict:
    if isinstance(cfg, Mapping):  # OmegaConf DictConfig is a Mapping; items() resolves interpolations
        return {str(k): v for k, v in cfg.items()}
    if hasattr(cfg, "__dict__"):
        return {k: v for k, v in vars(cfg).items() if not k.startswith("_")}
    raise DataError(f"data config must be a mapping or an attribute object, got {type(cfg).__name__}")


def _check_type(name: str, value, annotation: str):
    want_list = annotation.startswith("List")
    if value is None:
        if "Optional" in annotation:
            return None
        raise DataError(f"data.{name} must not be null")
    if want_list:
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise DataError(f"data.{name} must be a list, got {value!r}")
        return [str(v) for v in value]
    if "bool" in annotation:
        ok = isinstance(value, bool)
    elif "int" in annotation:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in annotation:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        ok = isinstance(value, str)
    if not ok:
        raise DataError(f"data.{name} has the wrong type: expected {annotation}, got {value!r}")
    return value


def resolve_config(cfg) -> DataConfig:
    """Checks a data config and fills defaults.

    Args:
      cfg: `DataConfig`, OmegaConf `DictConfig`, mapping or attribute object with the keys of `DataConfig`.

    Returns:
      a validated `DataConfig`.

    Raises:
      DataError: unknown key (with the closest valid name), wrong type, or an out-of-range value.
    """
    if isinstance(cfg, DataConfig):
        values = dataclasses.asdict(cfg)
    else:
        values = _as_dict(cfg)
    fields = {f.name: f for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, fields, 1)) else k
                 for k in unknown]
        raise DataError(f"unknown data config key(s): {', '.join(hints)}. Valid keys: {', '.join(fields)}")
    checked = {k: _check_type(k, v, str(fields[k].type)) for k, v in values.items()}
    out = DataConfig(**checked)
    _check_ranges(out)
    return out


def _check_ranges(c: DataConfig) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise DataError(msg)

    if (problem := out_of_range(c, "data.")) is not None:
        raise DataError(problem)
    if c.source == "synthetic":
        need(c.num_clusters <= c.num_items, f"data.num_clusters ({c.num_clusters}) must be <= data.num_items "
                                            f"({c.num_items})")
    if c.source in ("movielens", "lightgcn", "parquet", "prepared"):
        need(bool(c.path), f"data.path must be set for source {c.source!r} (a directory or file)")
    if c.source == "tfds":
        need(bool(c.name), "data.name must be set for source 'tfds', e.g. movielens/100k-ratings")
