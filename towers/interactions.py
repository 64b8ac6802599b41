"""Feature-interaction blocks a tower may run between its inputs and its MLP (`model.<tower>.interaction`).

- `dcn`: DCN-v2 cross layers (`towers.layers.CrossNetwork`) on the concatenated inputs.
- `masknet`: MaskNet (Wang et al. 2021, "MaskNet: Introducing Feature-Wise Multiplication to CTR Ranking
  Models by Instance-Guided Mask"). Each block multiplies its input by a mask computed from the embeddings by a
  2-layer MLP, then applies a linear layer, LayerNorm and ReLU. Serial blocks mask the previous block's output;
  parallel blocks all mask the (per-field LayerNorm'd) embeddings and are concatenated, then a bottleneck MLP.
  Pinterest's homefeed ranker uses the parallel variant with 4 blocks (the default here).
- `dhen`: DHEN (Zhang et al. 2022, "DHEN: A Deep and Hierarchical Ensemble Network for Large-Scale CTR
  Prediction"). Stacked layers over a [B, F, d] sequence of feature fields; each layer runs an ensemble of
  modules (MLP, MaskNet, DCN-v2, a transformer encoder attending over the fields) on its input, combines their
  outputs (concatenation then a per-field linear map, or a sum), adds the input back and applies LayerNorm.

Fields: a tower's inputs are the ID row (id_dim), the history mean (id_dim) and one embedding per side feature
(feature_dim). MaskNet normalises each field on its own, as the paper does. DHEN needs one width: every field
whose width is not `dhen.field_dim` (default feature_dim) gets its own linear projection to it, so the ID row
becomes one field like any side feature.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from towers.config import ConfigError, DhenConfig, MaskNetConfig, TowerConfig
from towers.layers import MLP, CrossNetwork

INTERACTIONS = ("none", "dcn", "masknet", "dhen")


def resolve_interaction(cfg: TowerConfig, tower: str, feature_dim: int) -> str:
    """The tower's interaction block, with `cross_layers` checked against it.

    `interaction: null` keeps configs written before the knob existed: DCN when `cross_layers > 0`, else none.

    Raises:
      ConfigError: cross layers asked for a block that has none, `dcn` without cross layers, or a DHEN whose
        attention heads do not divide the field width.
    """
    key = f"model.{tower}"
    kind = cfg.interaction or ("dcn" if cfg.cross_layers else "none")
    if kind not in INTERACTIONS:
        raise ConfigError(f"{key}.interaction={kind!r}: expected one of {', '.join(INTERACTIONS)}")
    if kind == "dcn" and not cfg.cross_layers:
        raise ConfigError(f"{key}.interaction=dcn: needs {key}.cross_layers > 0")
    uses_cross = kind == "dcn" or (kind == "dhen" and "dcn" in cfg.dhen.modules)
    if cfg.cross_layers and not uses_cross:
        raise ConfigError(f"{key}.cross_layers={cfg.cross_layers}: DCN's knob, unused by interaction={kind} "
                          f"(set it to 0, or use interaction=dcn or dhen with a dcn module)")
    if kind == "dhen":
        if not cfg.dhen.modules:
            raise ConfigError(f"{key}.dhen.modules=[]: a DHEN layer needs at least one module")
        dim = cfg.dhen.field_dim or feature_dim
        if "transformer" in cfg.dhen.modules and dim % cfg.dhen.num_heads:
            raise ConfigError(f"{key}.dhen.num_heads={cfg.dhen.num_heads}: must divide the field width {dim} "
                              f"(dhen.field_dim, or feature_dim when null)")
    return kind


class FieldNorm(nnx.Module):
    """LayerNorm of each field of a flat input on its own (MaskNet's LN_EMB), fields given by their widths."""

    def __init__(self, field_sizes: list[int], *, rngs: nnx.Rngs):
        self.sizes = tuple(int(s) for s in field_sizes)
        self.norms = nnx.List([nnx.LayerNorm(s, rngs=rngs) for s in self.sizes])

    def __call__(self, x: jax.Array) -> jax.Array:
        bounds, start = [], 0
        for s in self.sizes:
            bounds.append((start, start + s))
            start += s
        return jnp.concatenate([n(x[:, a:b]) for n, (a, b) in zip(self.norms, bounds)], axis=-1)


class MaskBlock(nnx.Module):
    """One MaskNet block: ReLU(LN(W (mask(emb) * x))), mask(emb) = W_2 ReLU(W_1 emb + b_1) + b_2.

    Args:
      emb_dim: width of the embeddings the mask is computed from.
      in_dim: width of the input it masks (the embeddings, or the previous block's output).
      out_dim: the block's output width.
      mask_hidden: hidden width of the mask MLP.
    """

    def __init__(self, emb_dim: int, in_dim: int, out_dim: int, mask_hidden: int, *, rngs: nnx.Rngs):
        self.mask = MLP(emb_dim, [mask_hidden, in_dim], rngs=rngs)
        self.hidden = nnx.Linear(in_dim, out_dim, use_bias=False, rngs=rngs)  # LN's bias follows
        self.norm = nnx.LayerNorm(out_dim, rngs=rngs)

    def __call__(self, emb: jax.Array, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.norm(self.hidden(self.mask(emb) * x)))


class MaskNet(nnx.Module):
    """Serial or parallel MaskNet over flat embeddings [B, sum(field_sizes)] -> [B, out_dim].

    Args:
      field_sizes: the width of each field of the input, for the per-field LayerNorm.
      cfg: blocks, widths and mode.
      bottleneck: widths of the ReLU MLP after the blocks (None = `cfg.bottleneck`).
    """

    def __init__(self, field_sizes: list[int], cfg: MaskNetConfig, *, bottleneck: list[int] | None = None,
                 rngs: nnx.Rngs):
        emb_dim = sum(field_sizes)
        hidden = max(1, round(emb_dim * cfg.mask_reduction))
        self.serial = cfg.mode == "serial"
        self.emb_norm = FieldNorm(field_sizes, rngs=rngs)
        self.blocks = nnx.List([
            MaskBlock(emb_dim, cfg.block_dim if (self.serial and i) else emb_dim, cfg.block_dim, hidden, rngs=rngs)
            for i in range(cfg.num_blocks)])
        joined = cfg.block_dim * (1 if self.serial else cfg.num_blocks)
        widths = list(cfg.bottleneck if bottleneck is None else bottleneck)
        self.bottleneck = MLP(joined, widths, rngs=rngs) if widths else None
        self.out_dim = widths[-1] if widths else joined

    def __call__(self, emb: jax.Array) -> jax.Array:
        normed = self.emb_norm(emb)
        if self.serial:
            x = normed
            for block in self.blocks:
                x = block(emb, x)
        else:
            x = jnp.concatenate([block(emb, normed) for block in self.blocks], axis=-1)
        return jax.nn.relu(self.bottleneck(x)) if self.bottleneck is not None else x


class EncoderLayer(nnx.Module):
    """A post-LN transformer encoder layer over the fields: LN(h + FFN(h)), h = LN(x + MHA(x)); FFN width 4d.

    The attention projections have no biases: a key bias shifts all of a query's logits alike, so its gradient
    is zero up to rounding, and Adam would turn that rounding into updates that differ from one device count
    to another.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.attention = nnx.MultiHeadAttention(num_heads, dim, use_bias=False, decode=False, deterministic=True,
                                                keep_rngs=False, rngs=rngs)
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.ffn = MLP(dim, [4 * dim, dim], rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm1(x + self.attention(x))
        return self.norm2(h + self.ffn(h))


class FlatModule(nnx.Module):
    """Adapts a block on flat [B, F*d] vectors (MLP, MaskNet, DCN-v2) to the [B, F, d] fields."""

    def __init__(self, block: nnx.Module):
        self.block = block

    def __call__(self, x: jax.Array) -> jax.Array:
        b, f, d = x.shape
        return self.block(x.reshape(b, f * d)).reshape(b, f, d)


def dhen_module(name: str, num_fields: int, dim: int, tower: TowerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """One DHEN module on [B, F, d] -> [B, F, d]: mlp (2 layers, ReLU between), masknet (the tower's MaskNet
    knobs, its output mapped back to F*d), dcn (`cross_layers` cross layers, at least 1) or transformer."""
    flat = num_fields * dim
    if name == "mlp":
        return FlatModule(MLP(flat, [flat, flat], rngs=rngs))
    if name == "masknet":
        return FlatModule(MaskNet([dim] * num_fields, tower.masknet, bottleneck=[flat], rngs=rngs))
    if name == "dcn":
        return FlatModule(CrossNetwork(flat, max(tower.cross_layers, 1), rank=tower.cross_rank, rngs=rngs))
    if name == "transformer":
        return EncoderLayer(dim, tower.dhen.num_heads, rngs=rngs)
    raise ValueError(f"unknown DHEN module {name!r}")


class DhenLayer(nnx.Module):
    """One DHEN layer: LN(combine(module(x) for each module) + x) over fields [B, F, d]."""

    def __init__(self, num_fields: int, dim: int, tower: TowerConfig, *, rngs: nnx.Rngs):
        cfg = tower.dhen
        self.ensemble = nnx.List([dhen_module(m, num_fields, dim, tower, rngs=rngs) for m in cfg.modules])
        self.combine = nnx.Linear(dim * len(cfg.modules), dim, rngs=rngs) if cfg.combine == "concat" else None
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        outs = [m(x) for m in self.ensemble]
        y = self.combine(jnp.concatenate(outs, axis=-1)) if self.combine is not None else sum(outs)
        return self.norm(y + x)


class Dhen(nnx.Module):
    """DHEN over a tower's fields: project each to `field_dim`, run the layers, flatten -> [B, F * field_dim].

    Args:
      field_sizes: the width of each input field, in call order.
      tower: the tower's config (its `dhen`, `masknet`, `cross_layers` and `cross_rank`).
      feature_dim: the default `field_dim`.
    """

    def __init__(self, field_sizes: list[int], tower: TowerConfig, feature_dim: int, *, rngs: nnx.Rngs):
        cfg: DhenConfig = tower.dhen
        dim = cfg.field_dim or feature_dim
        # A field already `dim` wide is used as it is (side features when field_dim is feature_dim).
        self.project = nnx.List([nnx.Linear(s, dim, rngs=rngs) if s != dim else None for s in field_sizes])
        self.layers = nnx.List([DhenLayer(len(field_sizes), dim, tower, rngs=rngs) for _ in range(cfg.num_layers)])
        self.out_dim = dim * len(field_sizes)

    def __call__(self, fields: list[jax.Array]) -> jax.Array:
        x = jnp.stack([p(f) if p is not None else f for p, f in zip(self.project, fields)], axis=1)
        for layer in self.layers:
            x = layer(x)
        return x.reshape(x.shape[0], -1)
