"""The schema of `python -m eval`'s config (`configs/evaluate.yaml`) and its validation.

Same style as training: Hydra composes the YAML, `validate(cfg)` checks it against the dataclasses below and
raises `ConfigError` with a one-line message naming the key and the value. `known_keys()` lists the keys the
command line may set, checked before Hydra composes (`data.cli.command`) so that a misspelt key also gets
that one line (and exit code 2) rather than Hydra's multi-line composition error.

`data.<key>=value` overrides the run's own `data:` section (any key of `data.config.DataConfig`). Those keys are
declared with the value `???` ("not set") in a config node generated from `DataConfig`, so Hydra accepts them
without a `+` and the list never goes stale; keys left unset keep the run's values.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from data.schema import value_problem
from data.schema import ConfigError, described as _help, schema_keys, to_typed  # noqa: F401 (ConfigError re-exported)

NOT_SET = "???"


@dataclass
class AnnConfig:
    enabled: bool = _help(True, "measure ANN (ScaNN) metrics and the recall lost against exact top-k")
    brute_force_below: int = _help(20_000, "corpora with fewer items use ScaNN's brute-force scorer", gt=0)
    num_leaves: int | None = _help(None, "k-means tree leaves; null = round(sqrt(num_items))", gt=0)
    num_leaves_to_search: int | None = _help(None, "leaves probed per query; null = a tenth of the leaves", gt=0)
    dimensions_per_block: int = _help(2, "asymmetric-hashing dimensions per block", gt=0)
    anisotropic_quantization_threshold: float = _help(0.2, "anisotropic quantization threshold")
    reorder: int | None = _help(None, "candidates re-scored exactly; null = 4 * max(ks) (raised to twice the "
                                      "neighbours a search fetches)", gt=0)
    training_sample_size: int = _help(100_000, "items sampled to train the tree and the quantizer", gt=0)


@dataclass
class BaselinesConfig:
    most_popular: bool = _help(True, "rank by training popularity (always cheap; a prepared dataset keeps the "
                                     "whole train split's item counts)")
    ease: bool = _help(True, "EASE closed-form item-item baseline (skipped above ease_max_items); on prepared "
                             "data its Gram matrix is summed over every user's train records, chunk_users at "
                             "a time (a full read of the shards, N x N memory), so it equals the in-memory fit")
    ease_lambda: float = _help(500.0, "EASE L2 weight on the Gram matrix diagonal", gt=0)
    ease_max_items: int = _help(10_000, "skip EASE for larger catalogues: its N x N inverse is O(N^3) "
                                        "(about 80 s at 10k items, 10 min at 20k on 2 CPU cores; above 20k a "
                                        "float32 in-place fit, 4 N^2 bytes of memory)", gt=0)


@dataclass
class SegmentsConfig:
    user_activity_edges: list[int] = _help([1, 5, 10, 20, 50], "user buckets by training interactions: "
                                                               "[0,1), [1,5), ..., [50, inf)", gt=0)
    item_share_edges: list[float] = _help([0.5, 0.8], "head/torso/tail cut-offs of cumulative interaction share",
                                          gt=0, lt=1)


@dataclass
class EvaluateConfig:
    run_dir: str = _help(NOT_SET, "the training run directory (hydra.run.dir of `python -m train`)")
    step: int | None = _help(None, "checkpoint step; null = the latest", ge=0)
    split: str = _help("test", "held-out split to score: test | valid", choices=("test", "valid"))
    out_dir: str | None = _help(None, "where outputs go; null = <run_dir>/eval/step_<N>[_valid][_<hash>]")
    ks: list[int] = _help([10, 20, 50, 100], "cut-offs of every @k metric", gt=0)
    max_users: int | None = _help(None, "score a seeded sample of this many held-out users; null = all (on "
                                            "prepared data only the sampled users' records are read)", gt=0)
    seed: int = _help(0, "seed of the user sample", ge=0)
    data: dict[str, Any] = _help({}, "overrides of the run's data: section (any data.config key)")
    ann: AnnConfig = field(default_factory=AnnConfig, metadata={"help": "approximate search"})
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig, metadata={"help": "baselines"})
    segments: SegmentsConfig = field(default_factory=SegmentsConfig, metadata={"help": "segments"})
    conditional: bool = _help(True, "a conditional model (model.user.condition): also score each (user, value "
                                    "of the condition) within that value's items, conditioned vs the tower "
                                    "fed no condition + post-filtering (`eval.conditional`; in-memory data)")
    plots: bool = _help(True, "write PNG plots (needs matplotlib)")
    user_block: int = _help(1024, "users per block in exact top-k and EASE scoring", gt=0)
    item_block: int = _help(65536, "items per tile in exact top-k", gt=0)
    chunk_users: int = _help(65536, "prepared data (data.source=prepared): held-out users read, embedded and "
                                    "ranked at a time, and users per pass when EASE sums the whole train "
                                    "split's Gram matrix; memory grows with it, not with the log", gt=0)


def register_configs() -> None:
    """Registers `evaluate_data_keys`: every data key declared as not set, so `data.<key>=v` needs no `+`."""
    from hydra.core.config_store import ConfigStore
    node = {"data": {f.name: NOT_SET for f in fields(DataConfig)}}
    ConfigStore.instance().store(name="evaluate_data_keys", node=node)


def known_keys() -> set[str]:
    """Every key `python -m eval` accepts on its command line, `data.<key>` for every data config key included."""
    return schema_keys(EvaluateConfig) | {f"data.{f.name}" for f in fields(DataConfig)}


def _fail(key: str, value, why: str):
    raise ConfigError(f"{key}={value!r}: {why}")


def to_schema(cfg: DictConfig | dict) -> EvaluateConfig:
    """Keys and types against the schema; unset data keys are dropped. Returns the typed config."""
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if isinstance(cfg, DictConfig) \
        else dict(cfg)
    raw.pop("hydra", None)
    if raw.get("run_dir") in (None, "", NOT_SET):
        _fail("run_dir", None, "required: python -m eval run_dir=PATH (a `python -m train` run directory)")
    raw["data"] = {k: v for k, v in (raw.get("data") or {}).items() if v != NOT_SET}
    data_fields = {f.name: f for f in fields(DataConfig)}
    for key, value in raw["data"].items():
        if key not in data_fields:
            _fail(f"data.{key}", value, "unknown data key (see data/config.py)")
        if (problem := value_problem(data_fields[key], value, f"data.{key}")) is not None:
            raise ConfigError(problem)
    return to_typed(EvaluateConfig, raw)


def validate(cfg: DictConfig | dict) -> EvaluateConfig:
    """Schema check (keys, types, ranges) plus the rules across values. Raises `ConfigError` (one line)."""
    c = to_schema(cfg)
    if not c.ks:
        _fail("ks", list(c.ks), "must be a non-empty list of positive ints")
    edges = list(c.segments.user_activity_edges)
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        _fail("segments.user_activity_edges", edges, "must be increasing ints >= 1")
    shares = list(c.segments.item_share_edges)
    if len(shares) != 2 or not shares[0] < shares[1]:
        _fail("segments.item_share_edges", shares, "must be two increasing fractions in (0, 1)")
    c.ks = sorted(set(c.ks))
    return c
