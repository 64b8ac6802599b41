"""Config composition and validation: every experiment composes and validates; bad configs fail with one
line naming the key and the value, before any JAX work."""
import os
import subprocess
import sys

import pytest

from tests.helpers import CONFIGS, REPO, compose_cfg
from train.config import ConfigError, check_against_data, check_devices, describe, mesh_shape, validate

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
NEEDS_PATH = {"movielens": "ml-100k", "lightgcn": "gowalla"}
# Experiments whose command line must name more (their header says what).
NEEDS = {"pretrained_ids": [f"model.{t}.table.pretrained=/somewhere/early_run" for t in ("user", "item")]}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    overrides = [f"+experiment={name}"]
    if name in NEEDS_PATH:
        overrides.append(f"data.path=/somewhere/{NEEDS_PATH[name]}")
    overrides += NEEDS.get(name, [])
    c = validate(compose_cfg(*overrides))
    assert c.train.global_batch_size > 0


def test_large_id_emb_is_large():
    c = validate(compose_cfg("+experiment=large_id_emb"))
    assert c.data.num_users >= 1_000_000 and c.data.num_items >= 1_000_000
    assert c.model.id_dim >= 128


def test_unknown_key_names_key_and_value():
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("+train.bogus_knob=3"))
    msg = str(e.value)
    assert "train.bogus_knob" in msg and "3" in msg and "\n" not in msg


def test_wrong_type_is_reported():
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        validate(compose_cfg("train.global_batch_size=lots"))


@pytest.mark.parametrize("override,key", [
    ("train.launcher=spmd", "train.launcher"),
    ("loss.temperature=0", "loss.temperature"),
    ("optimizer.sparse.name=adam", "optimizer.sparse.name"),
    ("eval.ks=[10,0]", "eval.ks"),
    ("loss.name=bpr", "loss.name"),
    ("loss.in_batch_negatives=false loss.num_negatives=0", "loss.in_batch_negatives"),
    ("loss.name=ccl model.normalize=false", "loss.name"),
    ("loss.name=ccl loss.ccl_margin=1.0", "loss.ccl_margin"),
])
def test_bad_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(*override.split()))


def test_batch_must_divide_over_devices():
    c = validate(compose_cfg("train.global_batch_size=1022"))
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=1022.*4 devices"):
        check_devices(c, 4)
    check_devices(c, 2)


def test_mesh_sizes_resolve_against_the_devices():
    assert mesh_shape(validate(compose_cfg()), 4) == (4, 1)
    assert mesh_shape(validate(compose_cfg("mesh=sharded", "train.launcher=shard_map")), 4) == (1, 4)
    assert mesh_shape(validate(compose_cfg("mesh.data=2", "mesh.model=2", "train.launcher=jit")), 4) == (2, 2)
    c = validate(compose_cfg("mesh.data=3", "train.launcher=shard_map"))
    with pytest.raises(ConfigError, match=r"mesh=.*multiply to the 4 devices"):
        check_devices(c, 4)


@pytest.mark.parametrize("overrides,key", [
    (["mesh=sharded"], "mesh.model"),                                   # pmap cannot split tables
    (["mesh.data=-1", "mesh.model=-1", "train.launcher=jit"], "mesh.model"),
    (["mesh.model=0", "train.launcher=jit"], "mesh.model"),
    (["model.item.table.num_hashes=3"], "model.item.table.num_hashes"),
    (["model.user.table.hash_buckets=0"], "model.user.table.hash_buckets"),
    (["model.item.table.hash_buckets=100", "model.item.table.pretrained=/runs/a"], "model.item.table.pretrained"),
    (["model.item.table.pretrained=/x/emb.npy"], "model.item.table.pretrained_ids"),
])
def test_bad_mesh_and_table_settings(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(*overrides))


def test_k_larger_than_corpus():
    c = validate(compose_cfg("eval.ks=[10,500]"))
    with pytest.raises(ConfigError, match=r"eval\.ks.*corpus \(100 items\)"):
        check_against_data(c, num_users=10, num_items=100, num_train=10_000)


def test_every_knob_is_documented():
    rows = describe()
    assert len(rows) > 40
    missing = [key for key, _, text in rows if not text]
    assert not missing, f"keys without a description: {missing}"


def test_cli_rejects_bad_config_with_one_line():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "train", "+train.bogus_knob=7", "hydra.run.dir=/tmp/x"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "train.bogus_knob" in lines[0] and "7" in lines[0], proc.stderr
