"""Restoring a trained model from a run directory alone: config, feature specs, vocabularies and the
towers' parameters and ID tables from the latest (or a given) Orbax checkpoint.

Eval, export and serving use this; it needs nothing from `train/` (optimizer state is not restored).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf

from data.types import FeatureSpec, Vocab
from towers.config import ModelConfig
from towers.two_tower import TwoTower, as_config


class RestoreError(RuntimeError):
    """The run directory is missing a piece, or its checkpoint cannot be read."""


@dataclasses.dataclass
class TrainedModel:
    """Everything needed to turn raw ids and features into embeddings."""
    run_dir: pathlib.Path
    step: int
    config: dict                       # the resolved training config (plain dict)
    model: TwoTower
    graphdef: object
    params: object                     # nnx.State of the towers' dense parameters
    tables: dict[str, jax.Array]       # "user" / "item" ID tables, [rows, id_dim]
    user_vocab: Vocab
    item_vocab: Vocab
    feature_vocabs: dict[str, Vocab]
    user_specs: list[FeatureSpec]
    item_specs: list[FeatureSpec]

    @property
    def model_version(self) -> str:
        """checkpoint step + a hash of the resolved config: what index and server versions are matched on."""
        import hashlib
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]
        return f"step{self.step}-{digest}"

    def parts(self) -> dict:
        return {"graphdef": self.graphdef, "params": self.params, "tables": self.tables, "model": self.model}


def _need(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        raise RestoreError(f"{path} is missing ({what}); is {path.parent} the run directory of `python -m train`?")
    return path


def load_trained(run_dir: str | pathlib.Path, step: int | None = None) -> TrainedModel:
    """Restores the towers of a finished (or running) training run.

    Args:
      run_dir: the Hydra run directory of `python -m train`.
      step: checkpoint step; None = the latest.
    Raises:
      RestoreError: a missing file, no checkpoint, an unknown step, or a checkpoint that does not load.
    """
    run_dir = pathlib.Path(run_dir)
    config = OmegaConf.to_container(OmegaConf.load(_need(run_dir / "config.yaml", "resolved config")))
    specs = json.loads(_need(run_dir / "features.json", "feature specs").read_text())
    user_specs = [FeatureSpec(**s) for s in specs["user"]]
    item_specs = [FeatureSpec(**s) for s in specs["item"]]
    vocab_dir = _need(run_dir / "vocab", "vocabularies")
    user_vocab, item_vocab = Vocab.load(vocab_dir / "user.npy"), Vocab.load(vocab_dir / "item.npy")
    feature_vocabs = {p.name[len("feature."):-len(".npy")]: Vocab.load(p) for p in vocab_dir.glob("feature.*.npy")}
    model = TwoTower(as_config(config["model"], ModelConfig), user_specs, item_specs, rngs=nnx.Rngs(0))
    graphdef, abstract_params = nnx.split(model)
    step, raw = _restore_state(_need(run_dir / "ckpt", "checkpoints"), step)
    pure = _unwrap_values(raw["params"])
    try:
        nnx.replace_by_pure_dict(abstract_params, pure)
    except Exception as e:  # noqa: BLE001 - shape/key mismatch between config and checkpoint
        raise RestoreError(f"checkpoint {run_dir}/ckpt/{step} does not match the towers of config.yaml: {e}") from e
    tables = {k: jax.numpy.asarray(v) for k, v in raw["tables"].items()}
    for name, vocab in (("user", user_vocab), ("item", item_vocab)):
        if name in tables and tables[name].shape[0] != len(vocab):
            raise RestoreError(f"{name} table has {tables[name].shape[0]} rows but vocab/{name}.npy has "
                               f"{len(vocab)} ids")
    return TrainedModel(run_dir, step, config, model, graphdef, abstract_params, tables, user_vocab, item_vocab,
                        feature_vocabs, user_specs, item_specs)


def _unwrap_values(tree):
    """nnx.State leaves are saved as {"value": array}; `replace_by_pure_dict` wants the bare arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree


def _restore_state(ckpt_dir: pathlib.Path, step: int | None) -> tuple[int, dict]:
    with ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(create=False)) as mgr:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise RestoreError(f"no checkpoint in {ckpt_dir}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise RestoreError(f"no checkpoint for step {step} in {ckpt_dir}; available: {steps}")
        try:
            out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:  # noqa: BLE001
            raise RestoreError(f"checkpoint {ckpt_dir}/{step} cannot be read: {str(e).splitlines()[0][:300]}") from e
    state = out["state"]
    return step, {"params": state["params"], "tables": state["tables"]}


__all__ = ["TrainedModel", "RestoreError", "load_trained"]
