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


def trains_the_same_on_one_and_four_devices(tmp_path, *overrides: str, launcher: str = "shard_map"):
    """Trains the smoke config with `overrides` on 1 device (jit) and on 4 (`launcher`), asserts the same loss and
    final state (leaf by leaf), and returns the 1-device run's final state for further checks."""
    import jax
    import numpy as np
    import pytest

    from tests.train.test_loop import _final_state
    from train.loop import run

    one = smoke_cfg(*overrides, "train.launcher=jit", "train.num_devices=1")
    four = smoke_cfg(*overrides, f"train.launcher={launcher}", "train.num_devices=4")
    r1, r4 = run(one, tmp_path / "one"), run(four, tmp_path / "four")
    assert np.isfinite(r1["train"]["train/loss"])
    assert r1["train"]["train/loss"] == pytest.approx(r4["train"]["train/loss"], rel=1e-5)
    _, s1 = _final_state(tmp_path / "one", one)
    _, s4 = _final_state(tmp_path / "four", four)
    leaves1, leaves4 = jax.tree.leaves(s1), jax.tree.leaves(s4)
    assert len(leaves1) == len(leaves4)
    for a, b in zip(leaves1, leaves4):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    return s1
