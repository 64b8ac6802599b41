"""The schema of `python -m eval`'s config (`configs/evaluate.yaml`) and its validation.

Same style as training: Hydra composes the YAML, `validate(cfg)` checks it against the dataclasses below and
raises `ConfigError` with a one-line message naming the key and the value. `check_overrides(argv)` runs before
Hydra so that a misspelt key on the command line also gets that one line (and exit code 2) rather than Hydra's
multi-line composition error.

`data.<key>=value` overrides the run's own `data:` section (any key of `data.config.DataConfig`). Those keys are
declared with the value `???` ("not set") in a config node generated from `DataConfig`, so Hydra accepts them
without a `+` and the list never goes stale; keys left unset keep the run's values.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from towers.config import ConfigError, _help, to_typed  # noqa: F401 (ConfigError re-exported)

NOT_SET = "???"




@dataclass
class AnnConfig:
    enabled: bool = _help(True, "measure ANN (ScaNN) metrics and the recall lost against exact top-k")
    brute_force_below: int = _help(20_000, "corpora with fewer items use ScaNN's brute-force scorer")
    num_leaves: int | None = _help(None, "k-means tree leaves; null = round(sqrt(num_items))")
    num_leaves_to_search: int | None = _help(None, "leaves probed per query; null = a tenth of the leaves")
    dimensions_per_block: int = _help(2, "asymmetric-hashing dimensions per block")
    anisotropic_quantization_threshold: float = _help(0.2, "anisotropic quantization threshold")
    reorder: int | None = _help(None, "candidates re-scored exactly; null = 4 * max(ks) (raised to twice the "
                                      "neighbours a search fetches)")
    training_sample_size: int = _help(100_000, "items sampled to train the tree and the quantizer")


@dataclass
class BaselinesConfig:
    most_popular: bool = _help(True, "rank by training popularity (always cheap)")
    ease: bool = _help(True, "EASE closed-form item-item baseline (skipped above ease_max_items)")
    ease_lambda: float = _help(500.0, "EASE L2 weight on the Gram matrix diagonal")
    ease_max_items: int = _help(10_000, "skip EASE for larger catalogues: its N x N inverse is O(N^3) "
                                        "(about 80 s at 10k items, 10 min at 20k on 2 CPU cores)")


@dataclass
class SegmentsConfig:
    user_activity_edges: list[int] = _help([1, 5, 10, 20, 50], "user buckets by training interactions: "
                                                               "[0,1), [1,5), ..., [50, inf)")
    item_share_edges: list[float] = _help([0.5, 0.8], "head/torso/tail cut-offs of cumulative interaction share")


@dataclass
class EvaluateConfig:
    run_dir: str = _help(NOT_SET, "the training run directory (hydra.run.dir of `python -m train`)")
    step: int | None = _help(None, "checkpoint step; null = the latest")
    split: str = _help("test", "held-out split to score: test | valid")
    out_dir: str | None = _help(None, "where outputs go; null = <run_dir>/eval/step_<N>[_valid][_<hash>]")
    ks: list[int] = _help([10, 20, 50, 100], "cut-offs of every @k metric")
    max_users: int | None = _help(None, "score a seeded sample of this many held-out users; null = all")
    seed: int = _help(0, "seed of the user sample")
    data: dict[str, Any] = _help({}, "overrides of the run's data: section (any data.config key)")
    ann: AnnConfig = field(default_factory=AnnConfig, metadata={"help": "approximate search"})
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig, metadata={"help": "baselines"})
    segments: SegmentsConfig = field(default_factory=SegmentsConfig, metadata={"help": "segments"})
    plots: bool = _help(True, "write PNG plots (needs matplotlib)")
    user_block: int = _help(1024, "users per block in exact top-k and EASE scoring")
    item_block: int = _help(65536, "items per tile in exact top-k")


def register_configs() -> None:
    """Registers `evaluate_data_keys`: every data key declared as not set, so `data.<key>=v` needs no `+`."""
    from hydra.core.config_store import ConfigStore
    node = {"data": {f.name: NOT_SET for f in fields(DataConfig)}}
    ConfigStore.instance().store(name="evaluate_data_keys", node=node)


def _leaf_keys(schema=EvaluateConfig, prefix: str = "") -> set[str]:
    keys = set()
    for f in fields(schema):
        key = prefix + f.name
        keys.add(key)
        if f.default_factory is not dataclasses.MISSING and is_dataclass(f.default_factory):
            keys |= _leaf_keys(f.default_factory, key + ".")
    return keys | {f"data.{f.name}" for f in fields(DataConfig)}


def check_overrides(args: list[str]) -> None:
    """Rejects command-line overrides of unknown keys before Hydra composes (one-line `ConfigError`).

    Hydra's own flags (anything starting with `-`) and `hydra.*` / `hydra/*` keys are left to Hydra.
    """
    if any(a.startswith("-") for a in args):
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    known = _leaf_keys()
    parser = OverridesParser.create()
    for arg in args:
        try:
            (override,) = parser.parse_overrides([arg])
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors span several lines
            raise ConfigError(f"{arg!r}: not a key=value override ({str(e).splitlines()[0]})") from None
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), 1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{arg}: unknown key {key!r}{hint} (keys: run_dir, step, split, out_dir, ks, "
                          "max_users, seed, data.<key>, ann.*, baselines.*, segments.*, plots, user_block, "
                          "item_block)")


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
    unknown = sorted(set(raw["data"]) - {f.name for f in fields(DataConfig)})
    if unknown:
        _fail(f"data.{unknown[0]}", raw["data"][unknown[0]], "unknown data key (see data/config.py)")
    return to_typed(EvaluateConfig, raw)


def validate(cfg: DictConfig | dict) -> EvaluateConfig:
    """Schema check plus value rules. Raises `ConfigError` (one line)."""
    c = to_schema(cfg)
    if c.split not in ("test", "valid"):
        _fail("split", c.split, "must be test or valid")
    if not c.ks or any(k <= 0 for k in c.ks):
        _fail("ks", list(c.ks), "must be a non-empty list of positive ints")
    for key in ("user_block", "item_block", "ann.brute_force_below", "ann.dimensions_per_block",
                "ann.training_sample_size",
                "baselines.ease_lambda", "baselines.ease_max_items"):
        value = c
        for part in key.split("."):
            value = getattr(value, part)
        if not value > 0:
            _fail(key, value, "must be > 0")
    for key in ("max_users", "step", "ann.num_leaves", "ann.num_leaves_to_search", "ann.reorder"):
        value = c
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and value < (0 if key == "step" else 1):
            _fail(key, value, "must be positive (or null)")
    edges = list(c.segments.user_activity_edges)
    if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
        _fail("segments.user_activity_edges", edges, "must be increasing ints >= 1")
    shares = list(c.segments.item_share_edges)
    if len(shares) != 2 or not 0 < shares[0] < shares[1] < 1:
        _fail("segments.item_share_edges", shares, "must be two increasing fractions in (0, 1)")
    c.ks = sorted(set(c.ks))
    return c
