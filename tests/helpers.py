"""Shared test utilities: compose the real Hydra configs the way `python -m train` does."""
from __future__ import annotations

import pathlib

from hydra import compose, initialize_config_dir

import configs

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = configs.DIR


def compose_cfg(*overrides: str):
    """The composed (unvalidated) config for `python -m train <overrides>`."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def smoke_cfg(*overrides: str):
    """The tiny `+debug=smoke` config, validated, with extra overrides."""
    from train.config import validate
    return validate(compose_cfg("+debug=smoke", *overrides))
