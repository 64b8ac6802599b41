"""twotower.data: reading, validating, splitting and batching interaction data (numpy only).

Entry points: `load(cfg) -> Dataset` for a `data:` config, `Batches` for training batches, `user_history` for
eval/serving histories, and the reference recalls in `data.oracle`.
"""
from data.batching import Batches, user_history
from data.config import DataConfig, resolve_config
from data.errors import DataError
from data.load import load
from data.oracle import popularity_recall, synthetic_oracle_recall
from data.types import Dataset, FeatureSpec, Interactions, Vocab

__all__ = ["Batches", "DataConfig", "DataError", "Dataset", "FeatureSpec", "Interactions", "Vocab", "load",
           "popularity_recall", "resolve_config", "synthetic_oracle_recall", "user_history"]
