"""Config schema of the towers (`model:` in the Hydra config). Every key has a default and a description.

The plumbing every command's schema shares (`ConfigError`, `to_typed`, `schema_keys`, `unknown_override`, and
`described`, imported here as `_help`) lives in `data.schema`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data.schema import ConfigError, described as _help  # noqa: F401 (ConfigError: towers' own checks raise it)


@dataclass
class TowerConfig:
    use_id: bool = _help(True, "read this tower's ID-table row (user id / item id)")
    use_history: bool = _help(False, "user tower: add the mean of the user's recent items' ID rows (shares "
                                     "the item table); item tower: the mean of the item's train users' ID rows "
                                     "(its audience; shares the user table; a one-hop graph aggregation)")
    features: list[str] | None = _help(None, "side features to read; null = every feature the data has, [] = none")
    hidden: list[int] = _help([], "MLP hidden widths before the output layer; [] = one linear projection "
                                  "(or none for a lone ID row of width output_dim)", gt=0)
    interaction: str | None = _help(None, "feature-interaction block between the inputs and the MLP: none, dcn "
                                          "(DCN-v2 cross layers), masknet or dhen; null = dcn when cross_layers "
                                          "> 0, else none", choices=("none", "dcn", "masknet", "dhen"))
    cross_layers: int = _help(0, "number of DCN-v2 cross layers (interaction dcn; or of each dcn module of a "
                                 "DHEN layer, 1 when 0)", ge=0)
    cross_rank: int | None = _help(None, "low-rank factorisation of each cross layer's weight; null = full rank",
                                   gt=0)
    masknet: "MaskNetConfig" = field(default_factory=lambda: MaskNetConfig(),
                                     metadata={"help": "interaction masknet, and DHEN's masknet module"})
    dhen: "DhenConfig" = field(default_factory=lambda: DhenConfig(), metadata={"help": "interaction dhen"})
    id_dropout: float = _help(0.0, "training only: probability of zeroing an example's ID row, so the tower "
                                   "learns to embed from features alone (fresh items, unseen users)", ge=0, lt=1)
    id_dropout_elementwise: float = _help(0.0, "training only: probability of zeroing each element of the ID row "
                                               "(inverted dropout: kept elements are scaled by 1/(1-p)); 0.5 is "
                                               "Pinterest's choice for frozen pre-trained tables", ge=0, lt=1)
    combine: str = _help("concat", "how the ID row and the history mean meet: concat (then the projection) or "
                                   "sum (one id_dim vector: with no features or hidden layers and id_dim == "
                                   "output_dim the user tower is MF plus a SimpleX-style history term)",
                            choices=("concat", "sum"))
    table: "IdTableConfig" = field(default_factory=lambda: IdTableConfig(),
                                   metadata={"help": "this tower's ID table (the item table also serves the "
                                                     "user's history)"})
    condition: str | None = _help(None, "user tower: conditional retrieval on this categorical or multihot item "
                                        "feature (e.g. genres): its value enters the tower as one more field, in "
                                        "training the positive item's (one value drawn per example for a "
                                        "multihot feature), at serving the requested one, and the search is "
                                        "filtered to items with that value; null = unconditioned")
    condition_dropout: float = _help(0.1, "user tower with a condition, training only: probability of feeding "
                                          "'no condition' instead of the positive's value, so an unconditioned "
                                          "query still gets a trained embedding", ge=0, lt=1)
    num_embeddings: int = _help(1, "user tower: K embeddings per user, one per interest cluster of the history "
                                   "(`towers.multi_interest`: max-min initialised single-assignment capsule "
                                   "routing, each interest through the tower's interaction and MLP with the "
                                   "user's other inputs); 1 = one embedding from the history mean. K > 1 needs "
                                   "use_history", ge=1)
    interest_routing_iters: int = _help(3, "user tower with num_embeddings > 1: routing iterations of the "
                                           "interest clustering", ge=1)
    history_per_interest: int = _help(0, "user tower with num_embeddings > 1: how many embeddings inference "
                                         "searches, K' = min(K, 1 + valid_history_items // "
                                         "history_per_interest) (a short history has few distinct interests); "
                                         "0 = all K", ge=0)


@dataclass
class MaskNetConfig:
    """MaskNet (Wang et al. 2021): blocks that multiply their input by an instance-guided mask of the inputs."""
    mode: str = _help("parallel", "parallel: every block reads the inputs, outputs concatenated (Pinterest's "
                                  "variant); serial: each block masks the previous block's output",
                      choices=("parallel", "serial"))
    num_blocks: int = _help(4, "number of mask blocks", gt=0)
    block_dim: int = _help(64, "output width of each mask block", gt=0)
    mask_reduction: float = _help(2.0, "hidden width of each block's mask MLP as a multiple of the input width "
                                       "(the paper's reduction ratio, 2 there)", gt=0)
    bottleneck: list[int] = _help([128], "widths of the ReLU MLP after the blocks (before the tower's own MLP); "
                                         "[] = none", gt=0)


@dataclass
class DhenConfig:
    """DHEN (Zhang et al. 2022): stacked layers, each an ensemble of modules over the feature fields."""
    num_layers: int = _help(2, "number of stacked DHEN layers", gt=0)
    modules: list[str] = _help(["mlp", "masknet", "transformer"], "the modules of every layer, each reading the "
                                                                  "layer's fields", choices=("mlp", "masknet", "dcn",
                                                                                             "transformer"))
    combine: str = _help("concat", "how a layer's module outputs meet: concat (then a linear map per field back "
                                   "to field_dim) or sum", choices=("concat", "sum"))
    num_heads: int = _help(2, "attention heads of the transformer module (must divide field_dim)", gt=0)
    field_dim: int | None = _help(None, "width every field is projected to (ID row, history mean, each side "
                                        "feature); null = feature_dim", gt=0)


@dataclass
class IdTableConfig:
    """How ids become rows of one ID table, where its first values come from, and whether it trains."""
    hash_buckets: int | None = _help(None, "hash raw ids into this many rows: memory is bounded whatever the id "
                                           "space, and ids unseen in training still get a row; null = one row "
                                           "per vocabulary id", gt=0)
    num_hashes: int = _help(1, "with hash_buckets: 1, or 2 hashes whose rows are summed, so two ids share "
                               "their whole embedding only when both hashes collide", choices=(1, 2))
    hash_seed: int = _help(0, "seed of the hash functions (part of the model: keep it to serve the run)", ge=0)
    pretrained: str | None = _help(None, "initialise from another run's directory (its latest checkpoint) or a "
                                         ".npy of [n, id_dim] embeddings; rows are matched by raw id")
    pretrained_ids: str | None = _help(None, ".npy of the n raw ids of a .npy `pretrained` table")
    freeze: bool = _help(False, "no optimizer updates to this table (e.g. a pre-trained one)")
    allow_window_overlap: bool = _help(False, "start from a pre-trained run whose training interactions span "
                                              "a time window overlapping this run's (refused by default: the "
                                              "table would have seen what this run learns from)")


@dataclass
class ModelConfig:
    id_dim: int = _help(64, "width of the user and item ID tables", gt=0)
    feature_dim: int = _help(16, "width of each side-feature embedding", gt=0)
    output_dim: int = _help(64, "width of the final user and item embeddings", gt=0)
    normalize: bool = _help(True, "L2-normalise tower outputs (cosine scores; temperature set in loss)")
    id_init_scale: float = _help(0.05, "stddev of the normal initialiser of ID-table rows", gt=0)
    user: TowerConfig = field(default_factory=TowerConfig, metadata={"help": "the user (query) tower"})
    item: TowerConfig = field(default_factory=TowerConfig, metadata={"help": "the item (candidate) tower"})
