"""The training config's schema and its validation.

Hydra composes `configs/train.yaml`; `validate(cfg)` then checks it against the dataclasses below before any
JAX work: an unknown key, a value of the wrong type or an inconsistent combination raises `ConfigError`, whose
message is one line naming the key and the value. Every key has a default and a description (`help`), which
`python -m train --help` style docs and the README table are built from.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig
from towers.config import ConfigError, ModelConfig, _help, to_typed  # noqa: F401 (ConfigError re-exported)


@dataclass
class LossConfig:
    temperature: float = _help(0.05, "softmax temperature: logits are cosine / temperature")
    num_negatives: int = _help(1024, "uniformly drawn corpus items per global batch (mixed negative sampling); "
                                     "0 = in-batch negatives only")
    logq_correction: bool = _help(True, "subtract log of each candidate's expected count under its sampler")
    remove_accidental_hits: bool = _help(True, "mask candidates equal to the row's positive item")
    embedding_l2: float = _help(0.0, "L2 penalty on the ID-table rows a batch touches (per row, per step)")


@dataclass
class DenseOptimizerConfig:
    name: str = _help("adam", "optax optimizer for dense (tower) parameters: adam | adamw | adagrad | sgd")
    learning_rate: float = _help(1e-3, "peak learning rate")
    weight_decay: float = _help(0.0, "decoupled weight decay (adamw only)")
    schedule: str = _help("constant", "constant | cosine (warmup then cosine decay to 0 at train.total_steps)")
    warmup_steps: int = _help(0, "linear warm-up steps")
    grad_clip_norm: float | None = _help(None, "clip dense gradients by global norm; null = off")


@dataclass
class SparseOptimizerConfig:
    name: str = _help("rowwise_adagrad", "row-sparse optimizer for ID tables: rowwise_adagrad | lazy_adam | sgd")
    learning_rate: float = _help(0.05, "learning rate of the ID tables")


@dataclass
class OptimizerConfig:
    dense: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig,
                                        metadata={"help": "tower parameters (optax)"})
    sparse: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig,
                                          metadata={"help": "ID tables, updated only on touched rows"})


@dataclass
class TrainLoopConfig:
    global_batch_size: int = _help(1024, "examples per step over all devices")
    total_steps: int | None = _help(None, "steps to train; null = num_epochs over the training split")
    num_epochs: float = _help(1.0, "epochs when total_steps is null")
    launcher: str = _help("pmap", "pmap (data-parallel over local devices) | shard_map | jit (one device)")
    num_devices: int | None = _help(None, "devices to use; null = all local devices")
    log_every_steps: int = _help(100, "write metrics (JSON lines, TensorBoard) every N steps")
    progress: bool = _help(True, "show a progress bar with steps/s and examples/s")
    prefetch: int = _help(2, "batches prepared ahead in a background thread")


@dataclass
class CheckpointConfig:
    every_steps: int = _help(1000, "save every N steps (and always at the last step)")
    max_to_keep: int = _help(3, "checkpoints kept; older ones are deleted")
    async_save: bool = _help(True, "write checkpoints in the background (Orbax async)")
    resume: bool = _help(True, "resume from the latest valid checkpoint in the run dir")


@dataclass
class EvalConfig:
    at_end: bool = _help(True, "evaluate on the held-out split after training")
    ks: list[int] = _help([10, 20, 50, 100], "cutoffs of recall@k and ndcg@k")
    max_users: int | None = _help(None, "evaluate a seeded sample of this many held-out users; null = all")
    user_block: int = _help(1024, "users scored per block in exact top-k")
    item_block: int = _help(65536, "items scored per block in exact top-k")
    seed: int = _help(0, "seed of the user sample")


@dataclass
class Config:
    seed: int = _help(0, "seed of parameter init, dropout and negative sampling")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data source, split and history"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the towers"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "sampled softmax"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "optimizers"})
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig, metadata={"help": "the loop"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Orbax"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "end-of-run evaluation"})


_CHOICES = {
    "optimizer.dense.name": ("adam", "adamw", "adagrad", "sgd"),
    "optimizer.dense.schedule": ("constant", "cosine"),
    "optimizer.sparse.name": ("rowwise_adagrad", "lazy_adam", "sgd"),
    "train.launcher": ("pmap", "shard_map", "jit"),
}


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(key: str, value, why: str):
    raise ConfigError(f"{key}={value!r}: {why}")


def to_schema(cfg: DictConfig | dict) -> Config:
    """Checks keys and types against the schema; returns the typed config object."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    return to_typed(Config, raw)


def validate(cfg: DictConfig | dict, *, num_devices: int | None = None) -> Config:
    """Schema check plus the cross-field rules that need no data. Raises `ConfigError` (one line)."""
    c = to_schema(cfg)
    for key, choices in _CHOICES.items():
        if _get(c, key) not in choices:
            _fail(key, _get(c, key), f"must be one of {', '.join(choices)}")
    positive = ["train.global_batch_size", "loss.temperature", "optimizer.dense.learning_rate",
                "optimizer.sparse.learning_rate", "checkpoint.every_steps", "checkpoint.max_to_keep",
                "train.log_every_steps", "model.id_dim", "model.output_dim", "eval.user_block", "eval.item_block"]
    for key in positive:
        if not _get(c, key) > 0:
            _fail(key, _get(c, key), "must be > 0")
    if c.loss.num_negatives < 0:
        _fail("loss.num_negatives", c.loss.num_negatives, "must be >= 0")
    if c.train.total_steps is not None and c.train.total_steps <= 0:
        _fail("train.total_steps", c.train.total_steps, "must be > 0 (or null to use num_epochs)")
    if not 0.0 <= c.model.item.id_dropout < 1.0 or not 0.0 <= c.model.user.id_dropout < 1.0:
        _fail("model.item.id_dropout", c.model.item.id_dropout, "must be in [0, 1)")
    if c.model.user.use_history and c.data.history_len <= 0:
        _fail("data.history_len", c.data.history_len, "must be > 0 when model.user.use_history is true")
    if any(k <= 0 for k in c.eval.ks):
        _fail("eval.ks", list(c.eval.ks), "every k must be > 0")
    if num_devices is not None:
        check_devices(c, num_devices)
    return c


def check_devices(c: Config, num_devices: int) -> None:
    """Batch and negatives must split evenly over the data-parallel devices."""
    n = c.train.num_devices or num_devices
    if c.train.num_devices is not None and c.train.num_devices > num_devices:
        _fail("train.num_devices", c.train.num_devices, f"only {num_devices} local devices are available")
    if c.train.launcher == "jit" and c.train.num_devices not in (None, 1):
        _fail("train.launcher", c.train.launcher, "runs on one device; set train.num_devices=1 or use pmap")
    if c.train.global_batch_size % n:
        _fail("train.global_batch_size", c.train.global_batch_size, f"must be divisible by the {n} devices")
    if c.loss.num_negatives % n:
        _fail("loss.num_negatives", c.loss.num_negatives, f"must be divisible by the {n} devices")


def check_against_data(c: Config, num_users: int, num_items: int, num_train: int) -> None:
    """Rules that need the data's sizes (checked after loading, still before any JAX work)."""
    if max(c.eval.ks) > num_items:
        _fail("eval.ks", list(c.eval.ks), f"k larger than the corpus ({num_items} items)")
    if c.train.total_steps is None and num_train < c.train.global_batch_size:
        _fail("train.global_batch_size", c.train.global_batch_size,
              f"larger than the training split ({num_train} interactions)")


def describe(schema=Config, prefix: str = "") -> list[tuple[str, object, str]]:
    """(key, default, help) for every leaf of the schema: the reference table of all knobs."""
    rows = []
    obj = schema() if isinstance(schema, type) else schema
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            rows += describe(value, key + ".")
        else:
            rows.append((key, value, f.metadata.get("help", "")))
    return rows
