"""The data config schema and the configs/data/*.yaml group files."""
import dataclasses

import pytest
from omegaconf import OmegaConf

import configs
from data import DataConfig, DataError, load, resolve_config
from data.config import describe

CONFIGS = configs.DIR / "data"
GROUP_FILES = sorted(CONFIGS.glob("*.yaml"))


def test_every_source_has_a_group_file():
    assert {p.stem for p in GROUP_FILES} == {"synthetic", "movielens", "lightgcn", "parquet", "tfds", "prepared"}


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: p.stem)
def test_group_file_keys_are_valid_and_commented(path):
    node = OmegaConf.load(path)
    if OmegaConf.is_missing(node, "path"):
        node.path = "/some/log.parquet"
    cfg = resolve_config(node)
    assert cfg.source == path.stem
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), node)  # also valid as a structured config
    assert merged.source == path.stem
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"{path.name}: key without a comment: {line}"


def test_every_key_has_help():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name
    assert describe().count("\n") == len(dataclasses.fields(DataConfig)) - 1


@pytest.mark.parametrize("bad, message", [
    ({"num_user": 5}, "unknown data config key.*num_user.*did you mean num_users"),
    ({"test_fraction": 1.0}, r"^data\.test_fraction=1\.0: must be in \[0, 1\)"),
    ({"history_mode": "recent"}, r"^data\.history_mode='recent': must be one of causal, sample"),
    ({"num_users": "many"}, "num_users has the wrong type"),
    ({"source": "movielens"}, "data.path must be set"),
    ({"source": "csv"}, r"^data\.source='csv': must be one of synthetic, movielens"),
    ({"interactions_per_user": 2}, r"^data\.interactions_per_user=2\.0: must be >= 3"),
])
def test_bad_configs_are_rejected_with_the_key(bad, message):
    with pytest.raises(DataError, match=message):
        resolve_config(bad)


def test_attribute_objects_and_defaults():
    class Node:
        source = "synthetic"

    node = Node()
    node.num_users = 7
    cfg = resolve_config(node)
    assert cfg.num_users == 7 and cfg.num_items == DataConfig().num_items


@pytest.mark.realdata
def test_movielens_group_file_loads_relative_to_data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("TWOTOWER_DATA_DIR", str(shared_data))
    ds = load(OmegaConf.load(CONFIGS / "movielens.yaml"))
    assert ds.name == "ml-100k" and ds.num_users == 943
