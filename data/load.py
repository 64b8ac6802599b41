"""`load(cfg)`: the one entry point from a `data:` config to a `Dataset`."""
from __future__ import annotations

import importlib

from data.assemble import assemble
from data.config import DataConfig, resolve_config
from data.types import Dataset

# source name -> module under data.sources with `read(cfg) -> RawLog`; imported lazily (tfds is heavy).
_SOURCES = {"synthetic": "synthetic", "movielens": "movielens", "lightgcn": "lightgcn", "parquet": "tabular",
            "tfds": "tfds"}


def load(cfg) -> Dataset:
    """Loads the dataset a `data:` config describes.

    Args:
      cfg: the `data:` node (OmegaConf DictConfig), a mapping, an attribute object or a `DataConfig`; keys
        are those of `data.config.DataConfig` (unknown keys raise).

    Returns:
      the split `Dataset` with vocabularies, side features and stats.
    """
    c: DataConfig = resolve_config(cfg)
    if c.source == "prepared":
        return open_data(c).load_users()
    module = importlib.import_module(f"data.sources.{_SOURCES[c.source]}")
    return assemble(module.read(c), c)


def open_data(cfg):
    """Like `load`, except that a prepared dataset (`source: prepared`) is opened, not read: the result is a
    `data.prepared.read.PreparedData` whose user records stay on disk until a batch or an evaluation asks for
    them. The split and filter keys of a prepared dataset are those it was prepared with (its manifest)."""
    c: DataConfig = resolve_config(cfg)
    if c.source != "prepared":
        return load(c)
    from data.paths import resolve_path
    from data.prepared.read import PreparedData
    return PreparedData(resolve_path(c.path), verify=c.verify)
