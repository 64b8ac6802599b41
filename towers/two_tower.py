"""The user tower, the item tower, and the pair of them.

A tower concatenates its inputs: the example's ID-table row (gathered outside, see `train/step.py`), for
the user tower the mean of its history items' ID rows (the item table is shared), and its side-feature
embeddings. An optional feature-interaction block (DCN-v2, MaskNet or DHEN; `towers.interactions`) and an MLP
map that to `output_dim`; the output is L2-normalised, so scores are cosines and the temperature lives in the loss.

The same modules run at train, eval and serve time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from data.types import CONDITION, FeatureSpec
from towers.config import ConfigError, ModelConfig, TowerConfig
from towers.features import FeatureEmbedder, masked_mean
from towers.interactions import Dhen, MaskNet, resolve_interaction
from towers.layers import MLP, CrossNetwork, l2_normalize
from towers.multi_interest import InterestClustering


def select_features(specs: list[FeatureSpec], names: list[str] | None, tower: str) -> list[FeatureSpec]:
    """The specs a tower reads: all of them when `names` is None, else those named (in that order)."""
    if names is None:
        return list(specs)
    by_name = {s.name: s for s in specs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"model.{tower}.features: {unknown} not provided by the data "
                         f"(available: {sorted(by_name)})")
    return [by_name[n] for n in names]


class Tower(nnx.Module):
    """One tower: [id row] + [history mean] + side features -> interaction -> MLP -> L2-normalised [B, output_dim].

    The inputs are fields: the ID row, the history mean (one field with the ID row when `combine: sum`) and one
    embedding per side feature. DCN-v2 and MaskNet read them concatenated; DHEN reads them as a field sequence.
    """

    def __init__(self, cfg: TowerConfig, specs: list[FeatureSpec], *, id_dim: int, feature_dim: int,
                 output_dim: int, normalize: bool, rngs: nnx.Rngs, name: str = "tower",
                 condition: FeatureSpec | None = None):
        self.use_id = bool(cfg.use_id)
        self.use_history = bool(getattr(cfg, "use_history", False))
        self.id_dropout = float(cfg.id_dropout)
        self.id_dropout_elementwise = float(cfg.id_dropout_elementwise)
        self.normalize = normalize
        if cfg.combine not in ("concat", "sum"):
            raise ValueError(f"combine={cfg.combine!r}: expected concat or sum")
        self.sum_id_history = cfg.combine == "sum" and self.use_id and self.use_history
        self.features = FeatureEmbedder(specs, feature_dim, rngs=rngs)
        # A conditional tower embeds the condition code + 1 (row 0: no condition) as one more feature field.
        self.condition = None if condition is None else nnx.Embed(
            condition.size + 1, feature_dim, embedding_init=nnx.initializers.normal(stddev=0.05), rngs=rngs)
        num_fields = len(specs) + (condition is not None)
        field_sizes = [id_dim] * (self.use_id + self.use_history - self.sum_id_history) + [feature_dim] * num_fields
        in_dim = sum(field_sizes)
        if in_dim == 0:
            raise ValueError("a tower needs at least one input: enable use_id, use_history or side features")
        self.interaction = resolve_interaction(cfg, name, feature_dim)
        self.num_embeddings = int(getattr(cfg, "num_embeddings", 1))
        self.history_per_interest = int(getattr(cfg, "history_per_interest", 0))
        if self.num_embeddings > 1 and (name != "user" or not self.use_history):
            raise ConfigError(f"model.{name}.num_embeddings={self.num_embeddings}: several embeddings cluster "
                              "the user's history; needs the user tower with model.user.use_history=true")
        self.interests = InterestClustering(id_dim, self.num_embeddings, cfg.interest_routing_iters, rngs=rngs) \
            if self.num_embeddings > 1 else None
        self.cross = CrossNetwork(in_dim, cfg.cross_layers, rank=cfg.cross_rank, rngs=rngs) \
            if self.interaction == "dcn" else None
        self.masknet = MaskNet(field_sizes, cfg.masknet, rngs=rngs) if self.interaction == "masknet" else None
        self.dhen = Dhen(field_sizes, cfg, feature_dim, rngs=rngs) if self.interaction == "dhen" else None
        mlp_in = self.masknet.out_dim if self.masknet else self.dhen.out_dim if self.dhen else in_dim
        widths = [*cfg.hidden, output_dim]
        # A lone ID row already of the output width needs no projection: that tower is plain matrix factorisation.
        self.mlp = None if (in_dim == output_dim and not cfg.hidden and self.interaction == "none") \
            else MLP(mlp_in, widths, rngs=rngs)

    def __call__(self, feats: dict[str, jax.Array], id_emb: jax.Array | None = None,
                 history_emb: jax.Array | None = None, history_mask: jax.Array | None = None,
                 *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Embeds a batch.

        Args:
          feats: side features by name, each [B, ...] (see `data.types.FeatureSpec`); for a conditional tower
            also `data.types.CONDITION`, int[B] codes of the condition feature (-1 = none; absent = none for all).
          id_emb: [B, id_dim] rows of this tower's ID table (zeros for an id without a row).
          history_emb: [B, H, id_dim] item-table rows of the user's history; history_mask: [B, H].
          dropout_rng: when given (training), each example's id row is zeroed with prob `id_dropout`, which
            teaches the tower to embed from features alone (fresh items, unseen users), and each of its elements
            with prob `id_dropout_elementwise` (the others scaled by 1/(1-p)). (A conditional tower's
            `condition_dropout` is applied by the training step to the codes, `drop_condition`, so the loss
            sees which rows went without a condition.)
        Returns:
          [B, output_dim], unit L2 norm when `normalize`; [B, K, output_dim] for a user tower with
          `num_embeddings` K > 1 (the history mean replaced by each of the K interests of
          `towers.multi_interest`, the other inputs shared).
        """
        parts = []
        if self.use_id:
            if dropout_rng is not None:
                id_emb = self._drop_id(id_emb, dropout_rng)
            parts.append(id_emb)
        f = self._fields(feats, id_emb, history_emb)
        if self.interests is not None:
            return self._multi(f, parts, history_emb, history_mask)
        if self.use_history:
            pooled = masked_mean(history_emb, history_mask)
            if self.sum_id_history:
                parts[-1] = parts[-1] + pooled
            else:
                parts.append(pooled)
        if self.dhen is not None:
            x = self.dhen(parts + ([f[:, i] for i in range(f.shape[1])] if f is not None else []))
        else:
            if f is not None:
                parts.append(f.reshape(f.shape[0], f.shape[1] * f.shape[2]))
            x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        return self._head(x)

    def _fields(self, feats: dict, id_emb, history_emb) -> jax.Array | None:
        """[B, F, feature_dim]: the side-feature embeddings, then the condition's (row 0 = none), or None."""
        f = self.features(feats) if len(self.features) else None
        if self.condition is None:
            return f
        known = [a for a in (f, id_emb, history_emb, feats.get(CONDITION)) if a is not None]
        if not known:
            raise ValueError("a conditional tower with no other input needs the condition in feats")
        b = known[0].shape[0]
        code = jnp.asarray(feats[CONDITION], jnp.int32) if CONDITION in feats else jnp.full((b,), -1, jnp.int32)
        c = self.condition(jnp.maximum(code, -1) + 1)[:, None, :]
        return c if f is None else jnp.concatenate([f, c], axis=1)

    def _head(self, x: jax.Array) -> jax.Array:
        """The interaction block, the MLP and the normalisation of the (concatenated or DHEN-mixed) inputs."""
        if self.cross is not None:
            x = self.cross(x)
        if self.masknet is not None:
            x = self.masknet(x)
        if self.mlp is not None:
            x = self.mlp(x)
        return l2_normalize(x) if self.normalize else x

    def _multi(self, f, parts: list, history_emb, history_mask) -> jax.Array:
        """[B, K, output_dim]: each of the K history interests takes the history mean's place among the inputs
        (the ID row and side features repeated per interest) and goes through the same interaction and MLP."""
        interests = self.interests(history_emb, history_mask)              # [B, K, id_dim]
        b, k = interests.shape[:2]
        per = lambda a: jnp.repeat(a, k, axis=0)  # noqa: E731  [B, ...] -> [B * K, ...], b-major
        parts = [per(p) for p in parts]
        pooled = interests.reshape(b * k, interests.shape[-1])
        if self.sum_id_history:
            parts[-1] = parts[-1] + pooled
        else:
            parts.append(pooled)
        f = None if f is None else per(f)
        if self.dhen is not None:
            x = self.dhen(parts + ([f[:, i] for i in range(f.shape[1])] if f is not None else []))
        else:
            if f is not None:
                parts.append(f.reshape(f.shape[0], f.shape[1] * f.shape[2]))
            x = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        out = self._head(x)
        return out.reshape(b, k, out.shape[-1])

    def _drop_id(self, id_emb: jax.Array, rng: jax.Array) -> jax.Array:
        """Training-time ID dropout: whole rows with prob `id_dropout` (no rescaling: a dropped row stands for an
        id the table lacks), then single elements with prob `id_dropout_elementwise` (inverted dropout, so the
        row's expectation is kept). The element mask draws from its own key, leaving the row draws unchanged."""
        if self.id_dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - self.id_dropout, (id_emb.shape[0], 1))
            id_emb = id_emb * keep.astype(id_emb.dtype)
        if self.id_dropout_elementwise > 0:
            p = self.id_dropout_elementwise
            keep = jax.random.bernoulli(jax.random.fold_in(rng, 1), 1.0 - p, id_emb.shape)
            id_emb = jnp.where(keep, id_emb / (1.0 - p), 0.0).astype(id_emb.dtype)
        return id_emb


class TwoTower(nnx.Module):
    """User and item towers built from a `ModelConfig` and the data's feature specs."""

    def __init__(self, cfg: ModelConfig, user_specs: list[FeatureSpec], item_specs: list[FeatureSpec],
                 *, rngs: nnx.Rngs):
        common = dict(id_dim=cfg.id_dim, feature_dim=cfg.feature_dim, output_dim=cfg.output_dim,
                      normalize=cfg.normalize, rngs=rngs)
        self.user = Tower(cfg.user, select_features(user_specs, cfg.user.features, "user"), name="user",
                          condition=condition_spec(cfg.user, item_specs), **common)
        if getattr(cfg.item, "condition", None):
            raise ConfigError("model.item.condition: conditions belong to the user (query) tower; the item tower "
                              "reads the item's own features")
        self.item = Tower(cfg.item, select_features(item_specs, cfg.item.features, "item"), name="item", **common)


def drop_condition(codes: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Training's condition dropout: each code replaced by -1 (no condition) with probability `rate`."""
    if rate <= 0:
        return codes
    return jnp.where(jax.random.bernoulli(rng, rate, codes.shape), -1, codes)


def condition_spec(cfg: TowerConfig, item_specs: list[FeatureSpec]) -> FeatureSpec | None:
    """The item feature a conditional user tower is conditioned on (`model.user.condition`), or None.

    Raises:
      ConfigError: the data has no such item feature, or it is dense (a condition is a categorical value).
    """
    name = getattr(cfg, "condition", None)
    if not name:
        return None
    spec = next((s for s in item_specs if s.name == name), None)
    if spec is None:
        raise ConfigError(f"model.user.condition={name!r}: not an item feature of the data (item features: "
                          f"{sorted(s.name for s in item_specs)})")
    if spec.kind == "dense":
        raise ConfigError(f"model.user.condition={name!r}: a dense feature; a condition needs a categorical or "
                          "multihot item feature")
    if getattr(cfg, "num_embeddings", 1) > 1:
        raise ConfigError(f"model.user.condition={name!r} with model.user.num_embeddings="
                          f"{cfg.num_embeddings}: conditional retrieval serves one embedding per condition; "
                          "use one of the two")
    return spec


def feature_names(model: TwoTower) -> tuple[list[str], list[str]]:
    """The side-feature names each tower reads (what a batch must carry)."""
    return [s.name for s in model.user.features.specs], [s.name for s in model.item.features.specs]


def as_config(obj, cls):
    """Builds a dataclass config from an OmegaConf node or dict (unknown keys raise)."""
    if isinstance(obj, cls):
        return obj
    from omegaconf import OmegaConf
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), obj))

