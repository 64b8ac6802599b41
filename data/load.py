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
    module = importlib.import_module(f"data.sources.{_SOURCES[c.source]}")
    return assemble(module.read(c), c)
