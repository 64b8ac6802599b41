"""Pre-trained ID tables: rows matched to this run's vocabulary by raw id (not by row number) with mismatches
counted and shown, a frozen table bit-identical after training while the rest trains, and id dropout that
acts in training steps only."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data.types import Vocab
from tests.helpers import smoke_cfg
from towers.embed import embed_items
from towers.restore import load_trained
from towers.two_tower import TwoTower
from train.config import ConfigError
from train.input import prepare
from train.loop import build, build_parts, fresh_state, load_data, run, select_devices
from train.pretrained import align


def test_align_matches_by_raw_id_and_reports_mismatches():
    vocab = Vocab(np.array([10, 20, 30, 40]))
    src_ids = np.array([40, 99, 10, 30, 98])            # another order, 20 missing, 99 and 98 extra
    src_emb = np.arange(15, dtype=np.float32).reshape(5, 3)
    rows, values, report = align(vocab, src_ids, src_emb, 3, where="k")
    assert rows.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(values, src_emb[[2, 3, 0]])
    assert report == {"source_rows": 5, "table_ids": 4, "matched": 3, "missing_in_source": 1,
                      "missing_examples": [20], "unused_source_ids": 2, "unused_examples": [99, 98],
                      "same_row_order": False}
    with pytest.raises(ConfigError, match="width 3 but model.id_dim=4"):
        align(vocab, src_ids, src_emb, 4, where="k")
    with pytest.raises(ConfigError, match="cannot match"):
        align(vocab, np.array(["a", "b", "c", "d", "e"]), src_emb, 3, where="k")
    with pytest.raises(ConfigError, match="duplicate"):
        align(vocab, np.array([1, 1, 2, 3, 4]), src_emb, 3, where="k")


def test_npy_table_sets_matched_rows_and_leaves_the_rest_at_their_initialisation(tmp_path):
    c = smoke_cfg()
    ds = load_data(c)
    rng = np.random.default_rng(0)
    raw = ds.item_vocab.raw_ids
    picked = rng.permutation(len(raw))[:60]
    ids = np.concatenate([raw[picked], [10**6, 10**6 + 1]])   # 60 of this run's items, shuffled, + 2 others
    emb = rng.normal(size=(62, c.model.id_dim)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    np.save(tmp_path / "ids.npy", ids)
    cp = smoke_cfg(f"model.item.table.pretrained={tmp_path / 'emb.npy'}",
                   f"model.item.table.pretrained_ids={tmp_path / 'ids.npy'}")
    parts = build_parts(cp, ds, 1, select_devices(cp))
    table = np.asarray(fresh_state(cp, parts, ds, tmp_path)["tables"]["item"])
    plain = np.asarray(build(c, ds, 1, select_devices(c))[3]["tables"]["item"])
    np.testing.assert_array_equal(table[picked], emb[:60])
    rest = np.setdiff1d(np.arange(len(raw)), picked)
    np.testing.assert_array_equal(table[rest], plain[rest])
    report = json.loads((tmp_path / "pretrained.json").read_text())["item"]
    assert (report["matched"], report["missing_in_source"], report["unused_source_ids"]) == (60, 40, 2)
    assert report["unused_examples"] == [10**6, 10**6 + 1]


def test_frozen_pretrained_table_is_bit_unchanged_by_training(tmp_path):
    common = ("eval.at_end=false", "train.launcher=jit", "train.num_devices=1")
    source, target = tmp_path / "source", tmp_path / "target"
    run(smoke_cfg(*common, "train.total_steps=2"), source)
    cfg = smoke_cfg(*common, "train.total_steps=4", f"model.item.table.pretrained={source}",
                    "model.item.table.freeze=true", "model.item.id_dropout=0.5",
                    "model.item.id_dropout_elementwise=0.5", "model.item.table.allow_window_overlap=true")
    run(cfg, target)
    before, after = load_trained(source), load_trained(target)
    np.testing.assert_array_equal(np.asarray(after.tables["item"]), np.asarray(before.tables["item"]))
    # The user table and the towers did train.
    ds = load_data(cfg)
    fresh = build(cfg, ds, 4, select_devices(cfg))[3]
    assert not np.allclose(np.asarray(after.tables["user"]), np.asarray(fresh["tables"]["user"]))
    report = json.loads((target / "pretrained.json").read_text())["item"]
    assert report["matched"] == ds.num_items and report["missing_in_source"] == 0 and report["frozen"]


def test_id_dropout_acts_in_training_steps_only():
    from train.step import StepConfig, loss_fn

    c = smoke_cfg("model.item.id_dropout=0.5")
    ds = load_data(c)
    models = {p: TwoTower(smoke_cfg(f"model.item.id_dropout={p}").model, ds.user_feature_specs,
                          ds.item_feature_specs, rngs=nnx.Rngs(0)) for p in (0.0, 0.5)}
    (g_drop, params), (g_none, _) = nnx.split(models[0.5]), nnx.split(models[0.0])
    from data.batching import Batches
    batch = next(Batches(ds, batch_size=16, num_negatives=8, history_len=5, history_mode="causal", seed=0))
    local, shared = prepare(batch, use_user_table=True, use_item_table=True, use_history=True)
    state = build(c, ds, 1, select_devices(c))[3]
    rows = {k: state["tables"][k][shared[f"{k}_uniq"]] for k in ("user", "item")}
    cfg = StepConfig(0.05, 16, 8, ds.num_items, True, True, 0.0, True, True, True)

    def loss(graphdef, seed):
        return float(loss_fn(params, rows, local, jax.random.key(seed), graphdef=graphdef, cfg=cfg,
                             axis_name=None)[0])

    assert loss(g_drop, 1) != loss(g_drop, 2)   # training: ID rows dropped at random
    assert loss(g_none, 1) == loss(g_none, 2)
    # Evaluation/serving: no dropout, the same embeddings as the model without it.
    table = jnp.asarray(state["tables"]["item"])
    feats = {k: v[:10] for k, v in ds.item_features.items()}
    a = embed_items(g_drop, params, table, np.arange(10), feats)
    np.testing.assert_array_equal(a, embed_items(g_none, params, table, np.arange(10), feats))
    np.testing.assert_array_equal(a, embed_items(g_drop, params, table, np.arange(10), feats))


def _set_window(run_dir, start, end):
    (run_dir / "data_window.json").write_text(json.dumps({"train": {"start": start, "end": end}}))


def test_runs_record_their_training_window_and_an_overlapping_source_is_refused(tmp_path):
    """Pinterest picks the pre-trained snapshot so that its training window does not overlap the two-tower
    run's: a source run trained on the same interactions is refused before any table is read, unless allowed
    (then it is recorded); a source trained on earlier interactions passes and is recorded as not overlapping."""
    common = ("eval.at_end=false", "train.launcher=jit", "train.num_devices=1", "train.total_steps=2")
    source = tmp_path / "source"
    run(smoke_cfg(*common), source)
    ds = load_data(smoke_cfg())
    ts = ds.train.timestamp
    recorded = json.loads((source / "data_window.json").read_text())["train"]
    assert recorded == {"start": int(ts.min()), "end": int(ts.max())} and ts.min() < ts.max()

    pretrained = (f"model.item.table.pretrained={source}", "model.item.table.freeze=true")
    with pytest.raises(ConfigError, match=r"model.item.table.pretrained=.*overlapping this run's training window.*"
                                          r"model.item.table.allow_window_overlap=true"):
        run(smoke_cfg(*common, *pretrained), tmp_path / "refused")
    ckpt = tmp_path / "refused" / "ckpt"
    assert not (ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir()))   # nothing trained

    run(smoke_cfg(*common, *pretrained, "model.item.table.allow_window_overlap=true"), tmp_path / "allowed")
    report = json.loads((tmp_path / "allowed" / "pretrained.json").read_text())["item"]
    assert report["overlap"] is True and report["source_window"] == report["train_window"] == recorded

    _set_window(source, recorded["start"] - 1000, recorded["start"] - 1)   # pre-trained on earlier data
    run(smoke_cfg(*common, *pretrained), tmp_path / "earlier")
    report = json.loads((tmp_path / "earlier" / "pretrained.json").read_text())["item"]
    assert report["overlap"] is False and report["source_window"]["end"] == recorded["start"] - 1


def test_unknown_windows_are_reported_not_refused(tmp_path):
    from train.pretrained import check_window, train_window
    ours = train_window(np.array([50, 10, 30]))
    assert ours == {"start": 10, "end": 50}
    assert train_window(np.zeros(4, np.int64)) == {"start": None, "end": None}   # a source without time
    old_run = tmp_path / "old_run"                     # a run written before windows were recorded
    old_run.mkdir()
    assert check_window(str(old_run), ours, allow=False, key="k")["overlap"] == "unknown"
    assert check_window(str(tmp_path / "emb.npy"), ours, allow=False, key="k")["overlap"] == "unknown"
    _set_window(old_run, 0, 100)
    assert check_window(str(old_run), train_window(np.zeros(3)), allow=False, key="k")["overlap"] == "unknown"
    _set_window(old_run, None, None)
    assert check_window(str(old_run), ours, allow=False, key="k")["overlap"] == "unknown"
    # Touching windows overlap (an interaction at the same second); disjoint ones, either side, do not.
    for (a, b), overlap in (((50, 60), True), ((0, 10), True), ((0, 9), False), ((51, 90), False)):
        _set_window(old_run, a, b)
        if overlap:
            with pytest.raises(ConfigError, match="overlapping"):
                check_window(str(old_run), ours, allow=False, key="model.user.table.pretrained")
        assert check_window(str(old_run), ours, allow=True, key="k")["overlap"] is overlap


def test_a_frozen_table_needs_a_pretrained_source():
    from data.schema import ConfigError
    with pytest.raises(ConfigError, match=r"model.user.table.freeze=True: a frozen table without"):
        smoke_cfg("model.user.table.freeze=true")
