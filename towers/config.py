"""Config schema of the towers (`model:` in the Hydra config). Every key has a default and a description.

Also the two helpers every command's schema uses (train, eval, export): `_help` for a described field and
`to_typed` for checking a composed config against a dataclass schema with one-line errors.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """An invalid config; the message is one line naming the key and the value."""


def exit_config_error(e: Exception):
    """What every command does with an invalid config: one line on stderr, exit status 2."""
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)


def unknown_override(args: list[str], known: set[str]) -> str | None:
    """The first plain `key=value` argument naming no known key, as a message; None when all are known.

    Checked before Hydra parses the command line, whose own error for such a key is several lines and exit 1.
    """
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" in arg and not arg.startswith(("-", "+", "~", "hydra.", "hydra/")) and key not in known:
            return f"{arg}: unknown key (known: {', '.join(sorted(known))})"
    return None


def to_typed(schema, raw: dict):
    """`raw` (plain containers) merged onto the dataclass `schema`: unknown keys and wrong types raise
    `ConfigError("key=value: why")`. Returns the typed dataclass instance."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        value = OmegaConf.select(OmegaConf.create(raw), key) if key != "?" else None
        msg = str(e).splitlines()[0]
        if "not in" in msg or "Key '" in msg:
            raise ConfigError(f"{key}={value!r}: unknown key ({msg})") from None
        raise ConfigError(f"{key}={value!r}: {msg}") from None


def _help(default, text: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TowerConfig:
    use_id: bool = _help(True, "read this tower's ID-table row (user id / item id)")
    use_history: bool = _help(False, "user tower: add the mean of the user's recent items' ID rows (shares "
                                     "the item table); item tower: the mean of the item's train users' ID rows "
                                     "(its audience; shares the user table; a one-hop graph aggregation)")
    features: list[str] | None = _help(None, "side features to read; null = every feature the data has, [] = none")
    hidden: list[int] = _help([], "MLP hidden widths before the output layer; [] = one linear projection "
                                  "(or none for a lone ID row of width output_dim)")
    cross_layers: int = _help(0, "number of DCN-v2 cross layers before the MLP")
    cross_rank: int | None = _help(None, "low-rank factorisation of each cross layer's weight; null = full rank")
    id_dropout: float = _help(0.0, "training only: probability of zeroing an example's ID row, so the tower "
                                   "learns to embed from features alone (fresh items, unseen users)")
    combine: str = _help("concat", "how the ID row and the history mean meet: concat (then the projection) or "
                                   "sum (one id_dim vector: with no features or hidden layers and id_dim == "
                                   "output_dim the user tower is MF plus a SimpleX-style history term)")
    table: "IdTableConfig" = field(default_factory=lambda: IdTableConfig(),
                                   metadata={"help": "this tower's ID table (the item table also serves the "
                                                     "user's history)"})


@dataclass
class IdTableConfig:
    """How ids become rows of one ID table, where its first values come from, and whether it trains."""
    hash_buckets: int | None = _help(None, "hash raw ids into this many rows: memory is bounded whatever the id "
                                           "space, and ids unseen in training still get a row; null = one row "
                                           "per vocabulary id")
    num_hashes: int = _help(1, "with hash_buckets: 1, or 2 hashes whose rows are summed, so two ids share "
                               "their whole embedding only when both hashes collide")
    hash_seed: int = _help(0, "seed of the hash functions (part of the model: keep it to serve the run)")
    pretrained: str | None = _help(None, "initialise from another run's directory (its latest checkpoint) or a "
                                         ".npy of [n, id_dim] embeddings; rows are matched by raw id")
    pretrained_ids: str | None = _help(None, ".npy of the n raw ids of a .npy `pretrained` table")
    freeze: bool = _help(False, "no optimizer updates to this table (e.g. a pre-trained one)")


@dataclass
class ModelConfig:
    id_dim: int = _help(64, "width of the user and item ID tables")
    feature_dim: int = _help(16, "width of each side-feature embedding")
    output_dim: int = _help(64, "width of the final user and item embeddings")
    normalize: bool = _help(True, "L2-normalise tower outputs (cosine scores; temperature set in loss)")
    id_init_scale: float = _help(0.05, "stddev of the normal initialiser of ID-table rows")
    user: TowerConfig = field(default_factory=TowerConfig, metadata={"help": "the user (query) tower"})
    item: TowerConfig = field(default_factory=TowerConfig, metadata={"help": "the item (candidate) tower"})
