"""Restoring a trained model from a run directory alone: config, feature specs, vocabularies and the
towers' parameters and ID tables from the latest (or a given) Orbax checkpoint.

Eval, export and serving use this; it needs nothing from `train/` (optimizer state is not restored). The
checksums every checkpoint records of its arrays (`checksums`, shared with `train.checkpoint`, which writes
them) are verified here too, so a damaged checkpoint is refused rather than exported or served.
`TrainedModel.tables` is indexed by vocabulary row whatever the table's layout: a hashed table is turned into
its per-id embeddings (`towers.id_tables.vocab_view`), and the padding rows of a table that was split over
devices are dropped. The tables as trained stay in `id_tables`, and `id_embeddings` embeds any raw id, with
a hashed table also ids that were never in the vocabulary.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
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
    contents: str = ""     # sha256 of the parameters' checksums and the vocabularies (see `load_trained`)

    def id_embeddings(self, table: str, raw_ids) -> np.ndarray:
        """ID embeddings of raw ids, for `towers.inference.embed` (as a table indexed by `np.arange(n)`).

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
        """checkpoint step + a hash of the resolved config, the parameters and the vocabularies: what index and
        server versions are matched on. The same config retrained on other data gives another version."""
        digest = hashlib.sha256((json.dumps(self.config, sort_keys=True) + self.contents).encode()).hexdigest()[:12]
        return f"step{self.step}-{digest}"


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
    step, raw, sums = _restore_state(_need(run_dir / "ckpt", "checkpoints"), step)
    contents = hashlib.sha256(json.dumps(sums, sort_keys=True).encode())
    contents.update(vocabularies_digest(user_vocab, item_vocab, feature_vocabs).encode())
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
                        feature_vocabs, user_specs, item_specs, id_tables, hashing, contents.hexdigest())


def vocabularies_digest(user_vocab: Vocab, item_vocab: Vocab, feature_vocabs: dict[str, Vocab]) -> str:
    """sha256 of every vocabulary's raw ids (dtype, length and bytes), in a fixed order."""
    h = hashlib.sha256()
    for name, vocab in [("user", user_vocab), ("item", item_vocab), *sorted(feature_vocabs.items())]:
        ids = np.ascontiguousarray(vocab.raw_ids)
        h.update(f"{name}:{ids.dtype.str}:{len(ids)}:".encode())
        h.update(ids.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- checksums of saved arrays
#
# A checkpoint's `extra` records a checksum of every array of the state as it was saved; a restore recomputes
# them on what it read. The checksum is computed on the devices, over the global array whatever its layout:
# two sums, modulo 2^32, of each 32-bit word times an odd weight drawn from the word's (row, column)
# position in the array seen as [rows, everything else]. Integer sums do not depend on the order of addition,
# so a table split over devices or processes, or restored into another mesh, gives the same checksum without
# being gathered anywhere, and every process of a multi-process run gets the same value. Any change confined
# to one word (every single-bit flip) changes both sums (an odd weight times a non-zero difference below 2^32
# is never 0 modulo 2^32); a random change of several words goes unnoticed with probability about 2^-64.


def leaf_name(path) -> str:
    """"a/b/0/c" for a pytree path, the same for a typed state and the plain dicts Orbax restores without a
    target (attribute, dict and sequence keys alike)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fmix32(h):
    """MurmurHash3's finaliser: a bijective mix of uint32 words (numpy or JAX arrays alike)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _words(x, xp):
    """The array as uint32 words, [rows, everything else] (one word per element of 4 bytes or fewer); `xp` is
    numpy for a host array, jax.numpy inside the jitted checksum."""
    x = x.reshape(x.shape[0] if x.ndim else 1, int(np.prod(x.shape[1:], dtype=np.int64)))
    if x.dtype == np.bool_:
        return x.astype(xp.uint32)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(x.dtype.itemsize)
    if unsigned is None:
        raise TypeError(f"cannot checksum a {x.dtype} array (x64 is off, every state array has at most 32 bits)")
    bits = np.ascontiguousarray(x).view(unsigned) if xp is np else jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(xp.uint32)


def _leaf_sums(x, xp=jnp):
    """uint32[3]: the two weighted sums of `x`'s words and whether it is finite, in numpy (`xp=np`, on the
    host) or JAX; integer arithmetic modulo 2^32, so both give the same words."""
    u = _words(x, xp)
    rows = xp.arange(u.shape[0], dtype=xp.uint32)[:, None]
    cols = xp.arange(u.shape[1], dtype=xp.uint32)[None, :]
    sums = [xp.sum(u * (_fmix32(_fmix32(rows ^ np.uint32(salt)) + cols) | np.uint32(1)), dtype=xp.uint32)
            for salt in (0x9E3779B9, 0x7F4A7C15)]
    finite = xp.all(xp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
    return xp.stack([*sums, xp.asarray(finite).astype(xp.uint32)])


_tree_sums = jax.jit(lambda leaves: jnp.stack([_leaf_sums(x) for x in leaves]))

_HOST_SUM_MAX = 1 << 22   # elements: a tree of single-device arrays at most this large is summed in numpy


def _on_host(leaves: list) -> bool:
    """Whether the checksums of `leaves` are computed in numpy: every array whole on this process's one device
    (a restore for eval or serving, say), and few elements in all. Compiling `_tree_sums` for a tree costs a
    second or more, while numpy sums a few million words in tens of milliseconds; a large tree (or a training
    run saving the same tree again and again, which compiles once) is better served by the device. Sharded
    arrays are always summed where they live, every process taking the same path."""
    if sum(x.size for x in leaves) > _HOST_SUM_MAX:
        return False
    return all(isinstance(x, np.ndarray) or (getattr(x, "is_fully_addressable", False)
                                             and len(x.sharding.device_set) == 1) for x in leaves)


def checksums(tree) -> tuple[dict[str, str], list[str]]:
    """({leaf name: 16 hex digits}, names of the leaves holding NaN or inf) of every array in `tree`.

    Every process of a multi-process run must call this together (it is one computation over global arrays).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}, []
    leaves = [x for _, x in flat]
    if _on_host(leaves):
        out = np.stack([_leaf_sums(np.asarray(x), np) for x in leaves])
    else:   # replicated: every process holds the whole result
        out = np.asarray(_tree_sums(leaves).addressable_data(0))
    names = [leaf_name(path) for path, _ in flat]
    sums = {name: f"{int(a):08x}{int(b):08x}" for name, (a, b, _) in zip(names, out)}
    return sums, [name for name, row in zip(names, out) if not row[2]]


def mismatches(got: dict[str, str], expected: dict[str, str]) -> list[str]:
    """Names of the leaves whose checksum in `got` is not the `expected` one (or not recorded at all)."""
    return [name for name, value in got.items() if expected.get(name) != value]


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


def _restore_state(ckpt_dir: pathlib.Path, step: int | None) -> tuple[int, dict, dict[str, str]]:
    """(step, {params, tables}, their checksums), verified against those recorded at save time."""
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
            out = mgr.restore(step, args=ocp.args.Composite(state=restore, extra=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise RestoreError(f"checkpoint {ckpt_dir}/{step} cannot be read: {str(e).splitlines()[0][:300]}") from e
    state, extra = out["state"], out["extra"]
    model = {"params": state["params"], "tables": state["tables"]}
    expected = extra.get("checksums") if isinstance(extra, dict) else None
    if not isinstance(expected, dict):
        raise RestoreError(f"checkpoint {ckpt_dir}/{step} records no checksums of its arrays, so its contents cannot "
                           "be verified; it was not written by this version of `python -m train`")
    got = checksums(model)[0]
    bad = mismatches(got, expected)
    if bad:
        raise RestoreError(f"checkpoint {ckpt_dir}/{step} is corrupt: the checksum of {', '.join(bad[:5])} does not "
                           "match the one recorded when it was saved")
    return step, model, got


__all__ = ["TrainedModel", "RestoreError", "load_trained", "checksums", "mismatches",
           "vocabularies_digest"]
