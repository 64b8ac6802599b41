"""Hashed ID tables: a stable hash (same rows in another process, strings independent of array width), the
collision rate against a brute-force count and against chance, two hashes colliding far less than one,
hashed rows summed in the step, and a trained hashed run that embeds ids it never saw."""
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from data.ids import hash_ids
from tests.helpers import REPO, smoke_cfg
from towers.id_tables import IdHashing, hashings, vocab_view


def test_hash_is_stable_across_processes_and_string_widths():
    ids = np.array([0, 1, 2, -7, 2**40, 123456789], np.int64)
    code = ("import numpy as np; from data.ids import hash_ids; "
            f"print(hash_ids(np.array({ids.tolist()}, np.int64), 3).tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == hash_ids(ids, 3).tolist()
    assert len(set(hash_ids(ids, 3).tolist())) == len(ids)
    assert not np.array_equal(hash_ids(ids, 3), hash_ids(ids, 4))   # the seed picks another function
    narrow, wide = np.array(["ab", "c"]), np.array(["ab", "c" * 30])
    assert hash_ids(narrow)[0] == hash_ids(wide)[0] and hash_ids(narrow)[1] != hash_ids(wide)[1]
    h = IdHashing(buckets=1000, num_hashes=2, seed=1)
    np.testing.assert_array_equal(h.rows(ids), h.rows(ids.copy()))
    assert h.rows(ids).shape == (6, 2) and h.rows(ids).dtype == np.int32
    assert h.rows(ids).min() >= 0 and h.rows(ids).max() < 1000


def _brute_force_shared(keys) -> float:
    keys = [tuple(sorted(k)) for k in keys]
    return sum(keys.count(k) > 1 for k in keys) / len(keys)


@pytest.mark.parametrize("num_hashes", [1, 2])
def test_collision_rate_matches_a_brute_force_count(num_hashes):
    h = IdHashing(buckets=50, num_hashes=num_hashes, seed=0)
    ids = np.arange(1000, 1060)
    report = h.collision_report(ids)
    assert report["collision_rate"] == pytest.approx(_brute_force_shared(h.rows(ids).tolist()))
    for k in range(num_hashes):
        assert report["collision_rate_per_hash"][k] == pytest.approx(_brute_force_shared(h.rows(ids)[:, [k]]))
    assert report["rows_used"] == len(np.unique(h.rows(ids)))


def test_collision_rate_is_that_of_random_hashing_and_two_hashes_rarely_coincide():
    ids = np.char.add("user-", np.arange(20_000).astype(str))   # string ids, like real logs
    one = IdHashing(buckets=100_000).collision_report(ids)
    two = IdHashing(buckets=100_000, num_hashes=2).collision_report(ids)
    # 20k ids in 100k rows: 1 - (1 - 1/B)^(n-1) = 18.1% share a row with another id.
    assert one["expected_collision_rate"] == pytest.approx(0.181, abs=0.001)
    assert one["collision_rate"] == pytest.approx(one["expected_collision_rate"], abs=0.015)
    assert two["collision_rate_per_hash"][0] == pytest.approx(one["expected_collision_rate"], abs=0.015)
    assert two["collision_rate"] < 0.001   # both hashes must collide: about n / B^2
    assert two["collision_rate"] <= two["expected_collision_rate"] * 10 + 1e-4


def test_vocab_view_sums_each_ids_rows():
    table = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    rows = np.array([[1, 2], [5, 5], [29, 0]], np.int32)
    want = table[rows].sum(axis=1)
    np.testing.assert_allclose(vocab_view(table, rows, block=2), want, rtol=1e-6)
    np.testing.assert_allclose(vocab_view(jnp.asarray(table), rows), want, rtol=1e-6)


def test_prepared_batch_reads_each_ids_hashed_rows():
    from train.input import prepare
    from train.step import StepConfig, tower_inputs

    rng = np.random.default_rng(0)
    B, M, H, V = 8, 4, 3, 40
    maps = {"user": IdHashing(16, 2, 0).rows(np.arange(V)), "item": IdHashing(16, 1, 0).rows(np.arange(V))}
    hist = rng.integers(0, V, (B, H)).astype(np.int32)
    hist[0, 1:] = -1
    batch = {"user": rng.integers(0, V, B).astype(np.int32), "item": rng.integers(0, V, B).astype(np.int32),
             "neg_item": rng.integers(0, V, M).astype(np.int32), "history": hist,
             "user_feat": {}, "item_feat": {}, "neg_item_feat": {}, "item_logq": np.zeros(B, np.float32),
             "neg_item_logq": np.zeros(M, np.float32)}
    local, shared = prepare(batch, use_user_table=True, use_item_table=True, use_history=True, row_maps=maps)
    tables = {k: rng.normal(size=(16, 3)).astype(np.float32) for k in ("user", "item")}
    gathered = {k: jnp.asarray(tables[k][shared[f"{k}_uniq"]]) for k in tables}
    cfg = StepConfig(1.0, B, M, V, False, False, 0.0, True, True, True)
    x = tower_inputs(gathered, local, cfg)
    np.testing.assert_allclose(x["user_id"], tables["user"][maps["user"][batch["user"]]].sum(1), rtol=1e-6)
    np.testing.assert_allclose(x["item_id"], tables["item"][maps["item"][batch["item"]]].sum(1), rtol=1e-6)
    np.testing.assert_allclose(x["neg_id"], tables["item"][maps["item"][batch["neg_item"]]].sum(1), rtol=1e-6)
    np.testing.assert_allclose(x["history"][1], tables["item"][maps["item"][hist[1]]].sum(1), rtol=1e-6)
    assert local["history_mask"][0].tolist() == [True, False, False]
    assert shared["user_valid"].sum() == len(np.unique(maps["user"][batch["user"]]))


def test_hashed_run_reports_collisions_and_embeds_unseen_ids(tmp_path):
    from towers.restore import load_trained
    from train.loop import run

    cfg = smoke_cfg("model.item.table.hash_buckets=64", "model.item.table.num_hashes=2",
                    "model.user.table.hash_buckets=128", "train.launcher=shard_map", "mesh=sharded",
                    "eval.max_users=50")
    result = run(cfg, tmp_path)
    assert 0.0 <= result["eval"]["model"]["recall@10"] <= 1.0   # evaluated through the per-id view
    report = json.loads((tmp_path / "hashing.json").read_text())
    assert set(report) == {"user", "item"} and report["item"]["num_hashes"] == 2
    assert report["user"]["ids"] == 200 and 0.0 < report["user"]["collision_rate"] < 1.0
    assert hashings(cfg.model)["item"] == IdHashing(64, 2, 0)

    trained = load_trained(tmp_path)
    assert trained.id_tables["item"].shape == (64, 8)
    item = trained.hashing["item"]
    # Known ids: the vocabulary-indexed table eval/export/serve read is the sum of each id's hashed rows.
    raw = trained.item_vocab.raw_ids
    want = np.asarray(trained.id_tables["item"])[item.rows(raw)].sum(1)
    np.testing.assert_allclose(np.asarray(trained.tables["item"]), want, rtol=1e-6)
    # An id that was never in the vocabulary still gets its hashed rows' embedding.
    unseen = np.array([10**9, 10**9 + 7], np.int64)
    assert (trained.item_vocab.lookup(unseen, missing="minus_one") == -1).all()
    emb = trained.id_embeddings("item", unseen)
    np.testing.assert_allclose(emb, np.asarray(trained.id_tables["item"])[item.rows(unseen)].sum(1), rtol=1e-6)
    assert np.all(np.linalg.norm(emb, axis=1) > 0)
    # Without hashing an unseen id has no row: zeros, and the tower falls back on features.
    unhashed = load_trained(tmp_path)
    unhashed.hashing.pop("item")
    assert not np.any(unhashed.id_embeddings("item", unseen))
    np.testing.assert_allclose(unhashed.id_embeddings("item", raw[:3]), np.asarray(trained.tables["item"])[:3])
