"""Every numeric knob declares its allowed range in the schema, and `validate` checks it before any work: an
out-of-range value is one `key=value: must be ...` line naming the full dotted key it was given under."""
import dataclasses
import typing

import pytest

from data.config import DataConfig
from eval.config import EvaluateConfig
from eval.config import validate as validate_eval
from serve.candidates.config import CandidatesConfig
from tests.helpers import compose_cfg
from train.config import Config, ConfigError, describe, validate

# Knobs whose values are all meaningful, or whose rule is not a plain range (checked by hand in validate).
NO_RANGE = {"Config.mesh.data", "Config.mesh.model",            # a device count, or -1 for the devices left
            "Config.data.min_rating", "DataConfig.min_rating",  # ratings may be on any scale
            "EvaluateConfig.ann.anisotropic_quantization_threshold"}  # ScaNN takes any threshold


@pytest.mark.parametrize("override, message", [
    ("optimizer.dense.grad_clip_norm=-1", "optimizer.dense.grad_clip_norm=-1.0: must be > 0 or null"),
    ("loss.embedding_l2=-1", "loss.embedding_l2=-1.0: must be >= 0"),
    ("optimizer.dense.weight_decay=-1", "optimizer.dense.weight_decay=-1.0: must be >= 0"),
    ("optimizer.dense.warmup_steps=-5", "optimizer.dense.warmup_steps=-5: must be >= 0"),
    ("train.num_epochs=0", "train.num_epochs=0.0: must be > 0"),
    ("train.num_epochs=-1", "train.num_epochs=-1.0: must be > 0"),
    ("train.prefetch=-1", "train.prefetch=-1: must be > 0"),
    ("train.num_devices=0", "train.num_devices=0: must be > 0 or null"),
    ("eval.max_users=0", "eval.max_users=0: must be > 0 or null"),
    ("model.user.id_dropout=1.5", "model.user.id_dropout=1.5: must be in [0, 1)"),
    ("model.item.hidden=[32,0]", "model.item.hidden=[32, 0]: every element must be > 0"),
    ("eval.ks=[10,0]", "eval.ks=[10, 0]: every element must be > 0"),
    ("data.test_fraction=-0.2", "data.test_fraction=-0.2: must be in [0, 1)"),
    ("data.split=bogus", "data.split='bogus': must be one of given, temporal or null"),
    ("optimizer.sparse.name=adam", "optimizer.sparse.name='adam': must be one of rowwise_adagrad, lazy_adam, sgd"),
    ("loss.ccl_margin=1.0", "loss.ccl_margin=1.0: must be in [-1, 1)"),
])
def test_out_of_range_knob_is_one_line_naming_its_key(override, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(override))
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("override", [
    "optimizer.dense.grad_clip_norm=null", "optimizer.dense.grad_clip_norm=0.5", "loss.embedding_l2=0",
    "optimizer.dense.weight_decay=0", "optimizer.dense.warmup_steps=0", "train.num_epochs=0.5", "train.prefetch=1",
    "train.num_devices=null", "eval.max_users=1", "model.user.id_dropout=0.0", "data.test_fraction=0",
    "data.split=null", "loss.ccl_margin=-1",
])
def test_values_at_the_edge_of_their_range_are_accepted(override):
    validate(compose_cfg(override))


def test_data_override_out_of_range_fails_in_eval_validate():
    """`python -m eval data.KEY=V` overrides are checked against the data schema before the run is restored."""
    with pytest.raises(ConfigError, match=r"^data\.test_fraction=-0\.2: must be in \[0, 1\)"):
        validate_eval({"run_dir": "/r", "data": {"test_fraction": -0.2}})
    with pytest.raises(ConfigError, match=r"^max_users=0: must be > 0 or null"):
        validate_eval({"run_dir": "/r", "max_users": 0})


def _numeric_leaves(schema, prefix: str):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint, key = hints[f.name], f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(hint):
            yield from _numeric_leaves(hint, key)
            continue
        args = set(typing.get_args(hint)) | {hint}
        for arg in list(args):
            args |= set(typing.get_args(arg))
        if args & {int, float}:
            yield key, f


@pytest.mark.parametrize("schema", [Config, DataConfig, EvaluateConfig, CandidatesConfig], ids=lambda s: s.__name__)
def test_every_numeric_knob_declares_its_range(schema):
    missing = [key for key, f in _numeric_leaves(schema, schema.__name__)
               if key not in NO_RANGE and not {"ge", "gt", "le", "lt", "choices"} & set(f.metadata)]
    assert not missing, f"numeric knobs without a range: {missing}"


def test_the_config_reference_shows_ranges():
    rows = {key: text for key, _, text in describe()}
    assert rows["optimizer.dense.learning_rate"].endswith("[> 0]")
    assert rows["optimizer.dense.grad_clip_norm"].endswith("[> 0 or null]")
    assert rows["data.test_fraction"].endswith("[in [0, 1)]")
    assert rows["loss.name"].endswith("[one of softmax, ccl]")
