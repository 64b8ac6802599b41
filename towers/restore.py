"""Restoring a trained model from a run directory alone: config, feature specs, vocabularies and the
towers' parameters and ID tables from the latest (or a given) Orbax checkpoint.

Eval, export and serving use this; it needs nothing from `train/` (optimizer state is not restored).
`TrainedModel.tables` is indexed by vocabulary row whatever the table's layout: a hashed table is turned into
its per-id embeddings (`towers.id_tables.vocab_view`), and the padding rows of a table that was split over
devices are dropped. The tables as trained stay in `id_tables`, and `id_embeddings` embeds any raw id, with
a hashed table also ids that were never in the vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf

from data.types import FeatureSpec, Vocab
from towers.config import ModelConfig
from towers.id_tables import IdHashing, hashings, vocab_view
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
    id_tables: dict[str, jax.Array] = dataclasses.field(default_factory=dict)   # tables as trained
    hashing: dict[str, IdHashing] = dataclasses.field(default_factory=dict)     # hashed tables only

    def id_embeddings(self, table: str, raw_ids) -> np.ndarray:
        """ID embeddings of raw ids, for `towers.embed` (as a table indexed by `np.arange(n)`).

        Args:
          table: "user" or "item".
          raw_ids: [n] raw ids of the vocabulary's kind.
        Returns:
          float32 [n, id_dim]. A hashed table embeds every id, unseen ones too (through their hashed rows);
          otherwise an id missing from the vocabulary gets zeros (its tower then embeds it from features).
        """
        if table in self.hashing:
            return vocab_view(self.id_tables[table], self.hashing[table].rows(raw_ids))
        vocab = self.user_vocab if table == "user" else self.item_vocab
        rows = vocab.lookup(np.asarray(raw_ids), missing="minus_one")
        emb = np.asarray(self.tables[table][jax.numpy.asarray(np.maximum(rows, 0))])   # gathers n rows only
        return np.where((rows >= 0)[:, None], emb, 0.0).astype(np.float32)

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
    id_tables = {k: jax.numpy.asarray(v) for k, v in raw["tables"].items()}
    hashing = hashings(config["model"])
    tables = {name: _by_vocab_row(name, table, {"user": user_vocab, "item": item_vocab}[name], hashing.get(name))
              for name, table in id_tables.items()}
    return TrainedModel(run_dir, step, config, model, graphdef, abstract_params, tables, user_vocab, item_vocab,
                        feature_vocabs, user_specs, item_specs, id_tables, hashing)


def _by_vocab_row(name: str, table: jax.Array, vocab: Vocab, hashing: IdHashing | None) -> jax.Array:
    """A trained table as [len(vocab), id_dim], row i = the embedding of vocabulary id i."""
    rows = table.shape[0]
    if hashing is not None:
        if rows < hashing.buckets:
            raise RestoreError(f"{name} table has {rows} rows but config.yaml hashes into {hashing.buckets}")
        return jax.numpy.asarray(vocab_view(table, hashing.rows(vocab.raw_ids)))
    if rows < len(vocab):
        raise RestoreError(f"{name} table has {rows} rows but vocab/{name}.npy has {len(vocab)} ids")
    # Rows past the vocabulary pad a table split over devices to equal shards; they were never trained.
    return table if rows == len(vocab) else table[:len(vocab)]


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
            # The saved layout when its devices exist, else everything on one device (e.g. serving a run that
            # split its tables over several).
            restore = ocp.args.StandardRestore(fallback_sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
            out = mgr.restore(step, args=ocp.args.Composite(state=restore))
        except Exception as e:  # noqa: BLE001
            raise RestoreError(f"checkpoint {ckpt_dir}/{step} cannot be read: {str(e).splitlines()[0][:300]}") from e
    state = out["state"]
    return step, {"params": state["params"], "tables": state["tables"]}


__all__ = ["TrainedModel", "RestoreError", "load_trained"]
