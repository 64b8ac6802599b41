"""Feature-interaction blocks (MaskNet serial and parallel, the transformer encoder over fields, DHEN layers with
each module and both combines) against numpy forwards written from the papers' equations with the Flax
parameters copied out; towers choosing them per config; element-wise ID dropout; and training with MaskNet and
DHEN towers on 1 device and on 4 devices giving the same model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.types import FeatureSpec
from tests.helpers import smoke_cfg, trains_the_same_on_one_and_four_devices
from towers.config import ConfigError, DhenConfig, MaskNetConfig, TowerConfig
from towers.interactions import Dhen, DhenLayer, EncoderLayer, MaskNet
from towers.two_tower import Tower

RTOL, ATOL = 1e-5, 1e-5


# ---------------------------------------------------------------- numpy references
def _a(v) -> np.ndarray:
    return np.asarray(v[...], dtype=np.float64)


def np_linear(layer, x):
    out = x @ _a(layer.kernel)
    return out + _a(layer.bias) if layer.bias is not None else out


def np_mlp(mlp, x):
    for i, layer in enumerate(mlp.layers):
        x = np_linear(layer, x)
        if i < len(mlp.layers) - 1:
            x = np.maximum(x, 0)
    return x


def np_layer_norm(ln, x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _a(ln.scale) + _a(ln.bias)


def np_masknet(net: MaskNet, emb):
    """MaskNet (Wang et al. 2021): LN_EMB normalises each field; a block is ReLU(LN(W_i (V_mask * V_in))) with
    V_mask = W_d2 ReLU(W_d1 V_emb + b_1) + b_2 always computed from the raw embeddings."""
    sizes, start, normed = net.emb_norm.sizes, 0, []
    for ln, s in zip(net.emb_norm.norms, sizes):
        normed.append(np_layer_norm(ln, emb[:, start:start + s]))
        start += s
    normed = np.concatenate(normed, -1)

    def block(b, x):
        w1, w2 = b.mask.layers
        mask = np_linear(w2, np.maximum(np_linear(w1, emb), 0))
        return np.maximum(np_layer_norm(b.norm, (mask * x) @ _a(b.hidden.kernel)), 0)

    if net.serial:
        x = normed
        for b in net.blocks:
            x = block(b, x)
    else:
        x = np.concatenate([block(b, normed) for b in net.blocks], -1)
    return np.maximum(np_mlp(net.bottleneck, x), 0) if net.bottleneck is not None else x


def np_attention(mha, x):
    """Multi-head scaled dot-product attention of the fields over each other (no projection biases)."""
    assert all(lin.bias is None for lin in (mha.query, mha.key, mha.value, mha.out))
    q, k, v = (np.einsum("bfd,dhk->bfhk", x, _a(lin.kernel)) for lin in (mha.query, mha.key, mha.value))
    logits = np.einsum("bqhk,bvhk->bhqv", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    heads = np.einsum("bhqv,bvhk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", heads, _a(mha.out.kernel))


def np_encoder(enc: EncoderLayer, x):
    h = np_layer_norm(enc.norm1, x + np_attention(enc.attention, x))
    return np_layer_norm(enc.norm2, h + np_mlp(enc.ffn, h))


def np_cross(cross, x0):
    x = x0
    for i, up in enumerate(cross.up):
        h = x @ _a(cross.down[i].kernel) if len(cross.down) else x
        x = x0 * np_linear(up, h) + x
    return x


def np_module(m, x):
    """One DHEN module on fields [B, F, d]."""
    if isinstance(m, EncoderLayer):
        return np_encoder(m, x)
    b, f, d = x.shape
    flat, inner = x.reshape(b, f * d), m.block
    if isinstance(inner, MaskNet):
        out = np_masknet(inner, flat)
    elif hasattr(inner, "up"):
        out = np_cross(inner, flat)
    else:
        out = np_mlp(inner, flat)
    return out.reshape(b, f, d)


def np_dhen_layer(layer: DhenLayer, x):
    """DHEN (Zhang et al. 2022): Y = Norm(Ensemble(X) + X), the ensemble's outputs concatenated then mapped, or
    summed."""
    outs = [np_module(m, x) for m in layer.ensemble]
    y = np_linear(layer.combine, np.concatenate(outs, -1)) if layer.combine is not None else sum(outs)
    return np_layer_norm(layer.norm, y + x)


def np_dhen(dhen: Dhen, fields):
    x = np.stack([np_linear(p, f) if p is not None else f for p, f in zip(dhen.project, fields)], 1)
    for layer in dhen.layers:
        x = np_dhen_layer(layer, x)
    return x.reshape(x.shape[0], -1)


def _randn(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- blocks
@pytest.mark.parametrize("mode,bottleneck", [("parallel", [12]), ("serial", [12, 6]), ("parallel", [])])
def test_masknet_matches_numpy(mode, bottleneck):
    cfg = MaskNetConfig(mode=mode, num_blocks=3, block_dim=5, mask_reduction=1.5, bottleneck=bottleneck)
    net = MaskNet([6, 4, 4], cfg, rngs=nnx.Rngs(0))
    emb = _randn(7, 14)
    out = net(jnp.asarray(emb))
    assert out.shape == (7, net.out_dim) == (7, bottleneck[-1] if bottleneck else 3 * 5 if mode == "parallel" else 5)
    _close(out, np_masknet(net, emb.astype(np.float64)))


def test_masknet_blocks_differ_between_serial_and_parallel():
    """Serial blocks after the first mask the previous block's output (block_dim wide), parallel ones the
    embeddings: the mask MLPs' output widths say which input each block multiplies."""
    emb_dim, block = 10, 3
    par = MaskNet([emb_dim], MaskNetConfig(mode="parallel", num_blocks=3, block_dim=block), rngs=nnx.Rngs(0))
    ser = MaskNet([emb_dim], MaskNetConfig(mode="serial", num_blocks=3, block_dim=block), rngs=nnx.Rngs(0))
    assert [b.mask.layers[-1].out_features for b in par.blocks] == [emb_dim] * 3
    assert [b.mask.layers[-1].out_features for b in ser.blocks] == [emb_dim, block, block]
    assert [b.mask.layers[0].in_features for b in ser.blocks] == [emb_dim] * 3   # masks always read V_emb


def test_transformer_encoder_over_fields_matches_numpy():
    enc = EncoderLayer(8, 2, rngs=nnx.Rngs(1))
    x = _randn(3, 5, 8, seed=1)
    _close(enc(jnp.asarray(x)), np_encoder(enc, x.astype(np.float64)))


@pytest.mark.parametrize("modules,combine", [(["mlp", "masknet", "dcn", "transformer"], "concat"),
                                             (["mlp", "transformer"], "sum"), (["dcn"], "concat")])
def test_dhen_matches_numpy(modules, combine):
    tower = TowerConfig(interaction="dhen", cross_rank=2,
                        masknet=MaskNetConfig(num_blocks=2, block_dim=4, mask_reduction=1.0),
                        dhen=DhenConfig(num_layers=2, modules=modules, combine=combine, num_heads=2))
    sizes = [6, 4, 4, 4]                       # an ID row of id_dim 6, then three side features of width 4
    dhen = Dhen(sizes, tower, 4, rngs=nnx.Rngs(2))
    assert [p is None for p in dhen.project] == [False, True, True, True]
    fields = [_randn(5, s, seed=i) for i, s in enumerate(sizes)]
    out = dhen([jnp.asarray(f) for f in fields])
    assert out.shape == (5, 4 * 4) and dhen.out_dim == 16
    _close(out, np_dhen(dhen, [f.astype(np.float64) for f in fields]))


# ---------------------------------------------------------------- towers
SPECS = [FeatureSpec("category", "categorical", 5), FeatureSpec("quality", "dense", 2)]


def _inputs(n=6, id_dim=8):
    r = np.random.default_rng(3)
    feats = {"category": jnp.asarray(r.integers(0, 5, n), jnp.int32),
             "quality": jnp.asarray(r.normal(size=(n, 2)), jnp.float32)}
    hist = jnp.asarray(r.normal(size=(n, 3, id_dim)), jnp.float32)
    mask = jnp.asarray(r.integers(0, 2, (n, 3)), jnp.int32)
    return feats, jnp.asarray(r.normal(size=(n, id_dim)), jnp.float32), hist, mask


def _tower(rngs=0, **cfg):
    base = dict(use_history=True, hidden=[16])
    return Tower(TowerConfig(**{**base, **cfg}), SPECS, id_dim=8, feature_dim=4, output_dim=8, normalize=False,
                 rngs=nnx.Rngs(rngs), name="user")


@pytest.mark.parametrize("kind", ["masknet", "dhen"])
def test_tower_feeds_its_fields_to_the_block(kind):
    """The tower hands MaskNet the concatenated [id, history mean, features] and DHEN the same as fields."""
    tower = _tower(interaction=kind, masknet=MaskNetConfig(num_blocks=2, block_dim=4, bottleneck=[6]),
                   dhen=DhenConfig(num_layers=1, modules=["mlp", "transformer"]))
    feats, ids, hist, mask = _inputs()
    out = tower(feats, ids, hist, mask)
    side = np.asarray(tower.features(feats), np.float64)
    pooled = np.asarray(jnp.sum(hist * mask[..., None], 1) / jnp.maximum(mask.sum(1), 1)[:, None], np.float64)
    fields = [np.asarray(ids, np.float64), pooled, side[:, 0], side[:, 1]]
    x = np_masknet(tower.masknet, np.concatenate(fields, -1)) if kind == "masknet" else np_dhen(tower.dhen, fields)
    _close(out, np_mlp(tower.mlp, x))


def _param_paths(module) -> list[str]:
    return sorted("/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def test_interaction_null_keeps_the_dcn_and_plain_towers_and_their_parameters():
    """Configs written before `interaction` existed: cross_layers > 0 means DCN, as before, with the same
    parameter tree (so their checkpoints restore), and none adds nothing."""
    dcn = _tower(cross_layers=2, cross_rank=3)
    assert dcn.interaction == "dcn"
    assert _param_paths(dcn) == _param_paths(_tower(interaction="dcn", cross_layers=2, cross_rank=3))
    assert [p for p in _param_paths(dcn) if not p.startswith("features/")] == [
        "cross/down/0/kernel", "cross/down/1/kernel", "cross/up/0/bias", "cross/up/0/kernel", "cross/up/1/bias",
        "cross/up/1/kernel", "mlp/layers/0/bias", "mlp/layers/0/kernel", "mlp/layers/1/bias", "mlp/layers/1/kernel"]
    plain = _tower()
    assert plain.interaction == "none" and plain.cross is plain.masknet is plain.dhen is None
    assert {p.split("/")[0] for p in _param_paths(plain)} == {"features", "mlp"}
    # A lone ID row of the output width is still plain MF (no projection at all).
    mf = Tower(TowerConfig(features=[]), [], id_dim=8, feature_dim=4, output_dim=8, normalize=True,
               rngs=nnx.Rngs(0))
    assert mf.mlp is None and _param_paths(mf) == []


@pytest.mark.parametrize("cfg,match", [
    (dict(interaction="dcn"), r"model.user.interaction=dcn: needs model.user.cross_layers > 0"),
    (dict(interaction="masknet", cross_layers=1), r"model.user.cross_layers=1: DCN's knob"),
    (dict(interaction="dhen", cross_layers=1), r"model.user.cross_layers=1: DCN's knob"),
    (dict(interaction="dhen", dhen=DhenConfig(num_heads=3)), r"model.user.dhen.num_heads=3: must divide .* 4"),
    (dict(interaction="dhen", dhen=DhenConfig(modules=[])), r"model.user.dhen.modules=\[\]"),
])
def test_inconsistent_interaction_knobs_are_one_line_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        _tower(**cfg)


def test_interaction_choices_are_checked_by_the_schema():
    with pytest.raises(ConfigError, match=r"model.user.interaction='transformer': must be one of none, dcn"):
        smoke_cfg("model.user.interaction=transformer")
    with pytest.raises(ConfigError, match=r"model.item.dhen.modules=\['mlp', 'gru'\]: every element"):
        smoke_cfg("model.item.dhen.modules=[mlp,gru]")


def test_dhen_with_a_dcn_module_uses_cross_layers():
    tower = _tower(interaction="dhen", cross_layers=2, dhen=DhenConfig(num_layers=1, modules=["dcn"]))
    assert len(tower.dhen.layers[0].ensemble[0].block.up) == 2
    default = _tower(interaction="dhen", dhen=DhenConfig(num_layers=1, modules=["dcn"]))
    assert len(default.dhen.layers[0].ensemble[0].block.up) == 1


# ---------------------------------------------------------------- element-wise ID dropout
def _id_only_tower(**cfg):
    return Tower(TowerConfig(features=[], **cfg), [], id_dim=64, feature_dim=4, output_dim=64, normalize=False,
                 rngs=nnx.Rngs(0))


def test_elementwise_id_dropout_drops_single_elements_scaled_and_only_in_training():
    tower = _id_only_tower(id_dropout_elementwise=0.5)
    ids = jnp.asarray(_randn(256, 64) + 3.0)   # no element is 0 by chance
    out = np.asarray(tower({}, ids, dropout_rng=jax.random.key(0)))
    dropped = out == 0
    assert 0.45 < dropped.mean() < 0.55
    assert dropped.any(1).all() and not dropped.all(1).any()    # within rows, not whole rows
    np.testing.assert_allclose(out[~dropped], 2.0 * np.asarray(ids)[~dropped], rtol=1e-6)
    # Different keys, different masks; without a key (evaluation, serving) the row passes unchanged.
    assert not np.array_equal(out, np.asarray(tower({}, ids, dropout_rng=jax.random.key(1))))
    np.testing.assert_array_equal(np.asarray(tower({}, ids)), np.asarray(ids))


def test_elementwise_id_dropout_keeps_the_expectation():
    tower = _id_only_tower(id_dropout_elementwise=0.5)
    ids = jnp.asarray(_randn(4, 64) + 1.0)
    draws = jax.vmap(lambda k: tower({}, ids, dropout_rng=k))(jax.random.split(jax.random.key(0), 4000))
    # Each element's mean over 4000 draws of {0, 2x}: standard error |x| / sqrt(4000) ~ 0.016 |x|.
    np.testing.assert_allclose(np.asarray(draws.mean(0)), np.asarray(ids), rtol=0.08, atol=0.02)


def test_elementwise_dropout_leaves_the_row_dropout_draws_unchanged():
    ids = jnp.asarray(_randn(200, 64) + 3.0)
    rows = np.asarray(_id_only_tower(id_dropout=0.3)({}, ids, dropout_rng=jax.random.key(5)))
    both = np.asarray(_id_only_tower(id_dropout=0.3, id_dropout_elementwise=0.2)({}, ids,
                                                                                  dropout_rng=jax.random.key(5)))
    np.testing.assert_array_equal((rows == 0).all(1), (both == 0).all(1))


# ---------------------------------------------------------------- 1 device vs 4 devices
def test_masknet_and_dhen_towers_train_the_same_on_one_and_four_devices(tmp_path):
    """The user tower runs MaskNet and the item tower DHEN (every module): the 4-device run (shard_map) must
    reproduce the 1-device run's loss and parameters, as the plain towers do (tests/train/test_loop.py)."""
    trains_the_same_on_one_and_four_devices(
        tmp_path, "eval.at_end=false", "train.total_steps=3", "checkpoint.every_steps=3", "model.item.id_dropout=0.0",
        "model.user.interaction=masknet", "model.user.masknet.mode=serial", "model.user.masknet.num_blocks=2",
        "model.user.masknet.block_dim=8", "model.user.masknet.bottleneck=[8]",
        "model.item.interaction=dhen", "model.item.dhen.num_layers=1",
        "model.item.dhen.modules=[mlp,masknet,dcn,transformer]", "model.item.masknet.num_blocks=2",
        "model.item.masknet.block_dim=8")
