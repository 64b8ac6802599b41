"""The training config's schema and its validation.

Hydra composes `configs/train.yaml`; `validate(cfg)` then checks it against the dataclasses below before any
JAX work: an unknown key, a value of the wrong type or an inconsistent combination raises `ConfigError`, whose
message is one line naming the key and the value. Every key has a default and a description (`help`), which
`python -m train --help` style docs and the README table are built from.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass

from omegaconf import DictConfig, OmegaConf

from data.config import DataConfig, resolve_config
from data.schema import with_range
from data.schema import ConfigError, described as _help, to_typed  # noqa: F401 (ConfigError re-exported)
from towers.config import ModelConfig


@dataclass
class LossConfig:
    name: str = _help("softmax", "softmax (sampled softmax cross entropy) | ccl (SimpleX cosine contrastive loss on "
                                 "the raw cosines: no temperature, no log q; needs model.normalize)",
                      choices=("softmax", "ccl"))
    temperature: float = _help(0.05, "softmax temperature: logits are cosine / temperature", gt=0)
    num_negatives: int = _help(1024, "uniformly drawn corpus items per global batch (mixed negative sampling); "
                                     "0 = in-batch negatives only", ge=0)
    logq_correction: bool = _help(True, "subtract log of each candidate's expected count under its sampler")
    logq_mixture: bool = _help(False, "log q of every candidate = log of its expected count in the union of the "
                                      "in-batch and uniform samples (B p + M/N), instead of per source (B p for "
                                      "in-batch, M/N for uniform; overstates rare in-batch items' correction)")
    logq_source: str = _help("counts", "where the in-batch log q's item frequencies come from: counts (the "
                                       "training split's item counts, known up front) | streaming (estimated on "
                                       "the device from the stream of positives, Yi et al. 2019 Algorithm 2: for "
                                       "a continuously trained model whose counts are unknown; the estimator is "
                                       "part of the train state and its checkpoints)",
                              choices=("counts", "streaming"))
    streaming_buckets: int = _help(1 << 20, "streaming: hash buckets per hash function; a vocabulary no larger "
                                            "gets one bucket per item instead (exact, no collisions)", gt=0)
    streaming_hashes: int = _help(2, "streaming: hash functions (count-min: an item's estimate is the largest "
                                     "gap, i.e. the lowest frequency, over them)", ge=1, le=16)
    streaming_alpha: float = _help(0.01, "streaming: learning rate of each bucket's moving average of the steps "
                                         "between two occurrences", gt=0, le=1)
    remove_accidental_hits: bool = _help(True, "mask candidates equal to the row's positive item")
    embedding_l2: float = _help(0.0, "L2 penalty on the ID-table rows a batch touches (per row, per step)", ge=0)
    in_batch_negatives: bool = _help(True, "the other rows' positives are negatives too; false = only the "
                                           "num_negatives uniform items (needs num_negatives > 0)")
    ccl_margin: float = _help(0.9, "ccl: negatives with cosine above this margin are pushed down", ge=-1, lt=1)
    ccl_negative_weight: float = _help(150.0, "ccl: weight of the mean negative term against the positive's", ge=0)
    bsl_negative_power: float = _help(1.0, "softmax: exponent p on the negatives' summed exp, loss = -log(e^pos / "
                                           "(e^pos + (sum_neg e^neg)^p)) (BSL); 1 = plain softmax", gt=0)
    negatives_per_row: int = _help(0, "uniformly drawn corpus items of each example's own (BSL and SimpleX draw "
                                      "negatives this way), beside the num_negatives shared ones; log q "
                                      "log(M_r / N); 0 = none", ge=0)
    user_dropout: float = _help(0.0, "dropout on the user embedding in training (renormalised when "
                                     "model.normalize), before the scores", ge=0, lt=1)
    condition_filter: bool = _help(True, "a conditional user tower (model.user.condition): each example's "
                                         "softmax keeps only the candidates having its condition value, as the "
                                         "filtered search ranks only those at serving (an example fed no "
                                         "condition keeps all); false = every candidate")


@dataclass
class DenseOptimizerConfig:
    name: str = _help("adam", "optax optimizer for dense (tower) parameters: adam | adamw | adagrad | sgd",
                      choices=("adam", "adamw", "adagrad", "sgd"))
    learning_rate: float = _help(1e-3, "peak learning rate", gt=0)
    weight_decay: float = _help(0.0, "decoupled weight decay (adamw only)", ge=0)
    schedule: str = _help("constant", "constant | cosine (warmup then cosine decay to 0 at train.total_steps)",
                          choices=("constant", "cosine"))
    warmup_steps: int = _help(0, "linear warm-up steps", ge=0)
    grad_clip_norm: float | None = _help(None, "clip dense gradients by global norm; null = off", gt=0)


@dataclass
class SparseOptimizerConfig:
    name: str = _help("rowwise_adagrad", "row-sparse optimizer for ID tables: rowwise_adagrad | lazy_adam | sgd",
                      choices=("rowwise_adagrad", "lazy_adam", "sgd"))
    learning_rate: float = _help(0.05, "learning rate of the ID tables (the peak of a schedule)", gt=0)
    schedule: str = _help("constant", "constant | cosine (warm-up, then cosine decay to end_factor x the rate at "
                                      "decay_steps) | step (warm-up, then the rate times step_factor every "
                                      "step_every steps)", choices=("constant", "cosine", "step"))
    warmup_steps: int = _help(0, "linear warm-up steps from 0 to learning_rate", ge=0)
    decay_steps: int | None = _help(None, "cosine: the step (warm-up included) where the decay ends; null = the "
                                          "run's total steps", gt=0)
    end_factor: float = _help(0.0, "cosine: the final rate as a fraction of learning_rate", ge=0, le=1)
    step_every: int = _help(1000, "step: steps between two decays (counted after the warm-up)", gt=0)
    step_factor: float = _help(0.5, "step: the rate is multiplied by this at every decay", gt=0, le=1)
    plateau_factor: float = _help(1.0, "reduce on plateau: multiply the rate (on top of the schedule) by this after "
                                       "plateau_patience validation evaluations of train.early_stopping.metric "
                                       "without improvement; 1 = off", gt=0, le=1)
    plateau_patience: int = _help(1, "reduce on plateau: evaluations without improvement (since the last "
                                     "improvement or reduction) before the rate is reduced", ge=1)


@dataclass
class OptimizerConfig:
    dense: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig,
                                        metadata={"help": "tower parameters (optax)"})
    sparse: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig,
                                          metadata={"help": "ID tables, updated only on touched rows"})


@dataclass
class DistributedConfig:
    coordinator_address: str | None = _help(None, "host:port of process 0's coordinator; null = "
                                                  "$JAX_COORDINATOR_ADDRESS, and no multi-process run if unset")
    num_processes: int | None = _help(None, "processes in the run; null = $JAX_NUM_PROCESSES (default 1)", gt=0)
    process_id: int | None = _help(None, "this process's index; null = $JAX_PROCESS_ID", ge=0)


@dataclass
class EarlyStoppingConfig:
    metric: str | None = _help(None, "validation metric to maximise, recall@K or ndcg@K with K in eval.ks, "
                                     "measured every eval.valid_every_steps on the validation split; training "
                                     "stops after `patience` evaluations without improvement and the best "
                                     "state (kept in ckpt_best/) is restored before the final evaluation; "
                                     "null = off")
    patience: int = _help(3, "validation evaluations without improvement before training stops", ge=1)
    min_delta: float = _help(0.0, "an evaluation improves only when the metric exceeds the best so far by more "
                                  "than this", ge=0)


@dataclass
class TrainLoopConfig:
    global_batch_size: int = _help(1024, "examples per step over all devices", gt=0)
    total_steps: int | None = _help(None, "steps to train; null = num_epochs over the training split", gt=0)
    num_epochs: float = _help(1.0, "epochs when total_steps is null", gt=0)
    launcher: str = _help("pmap", "pmap (data-parallel, replicated state) | shard_map (on the `mesh`) | jit "
                                  "(GSPMD on the `mesh`); shard_map and jit can split the ID tables",
                          choices=("pmap", "shard_map", "jit"))
    num_devices: int | None = _help(None, "devices to use; null = all local devices", gt=0)
    log_every_steps: int = _help(100, "write metrics (JSON lines, TensorBoard) every N steps", gt=0)
    progress: bool = _help(True, "report steps/s, examples/s, loss and ETA every log_every_steps: a "
                                   "progress bar on a terminal, else one log line")
    prefetch: int = _help(2, "batches prepared ahead in a background thread", gt=0)
    steps_per_dispatch: int = _help(1, "training steps run in one compiled program (a lax.scan over that many "
                                       "prepared batches): the host transfers and dispatches once per group "
                                       "instead of once per step; the same results up to float rounding. Logging, "
                                       "checkpoints and validation stay at their steps (each ends a group; a group "
                                       "cut short there runs step by step)", gt=0)
    distributed: DistributedConfig = field(default_factory=DistributedConfig,
                                           metadata={"help": "multi-process (multi-host) set-up"})
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig,
                                                metadata={"help": "stop when the validation metric stops "
                                                                  "improving; keep and restore the best state"})


@dataclass
class MeshConfig:
    data: int = _help(-1, "devices along the data axis (replicas of the ID tables); -1 = the devices left over")
    model: int = _help(1, "devices along the model axis: ID tables are split by rows over it; -1 = the devices "
                          "left over; 1 = tables replicated")


@dataclass
class CheckpointConfig:
    every_steps: int = _help(1000, "save every N steps (and always at the last step)", gt=0)
    max_to_keep: int = _help(3, "checkpoints kept; older ones are deleted", gt=0)
    async_save: bool = _help(True, "write checkpoints in the background (Orbax async)")
    resume: bool = _help(True, "resume from the latest valid checkpoint in the run dir")
    allow_config_change: list[str] = _help([], "keys (or data.vocabularies / data.contents) whose change from the "
                                               "checkpoint's a resume accepts (recorded in config_changes.jsonl); "
                                               "any other change that alters results refuses the resume")


@dataclass
class EvalConfig:
    at_end: bool = _help(True, "evaluate on the held-out split after training")
    ks: list[int] = _help([10, 20, 50, 100], "cutoffs of recall@k and ndcg@k", gt=0)
    max_users: int | None = _help(None, "evaluate a seeded sample of this many held-out users; null = all", gt=0)
    user_block: int = _help(1024, "users scored per block in exact top-k", gt=0)
    item_block: int = _help(65536, "items scored per block in exact top-k", gt=0)
    seed: int = _help(0, "seed of the user sample", ge=0)
    valid_every_steps: int | None = _help(None, "evaluate on the validation split (data.valid_fraction > 0) "
                                                "every N steps and at the last step, logged as valid/model/*; "
                                                "null = never (train.early_stopping needs it or "
                                                "valid_every_epochs)", gt=0)
    valid_every_epochs: float | None = _help(None, "the same every this many epochs (the steps follow the train "
                                                   "split's size, so one config fits every dataset); instead of "
                                                   "valid_every_steps", gt=0)


@dataclass
class Config:
    seed: int = _help(0, "seed of parameter init, dropout and negative sampling", ge=0)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data source, split and history"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the towers"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "sampled softmax"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"help": "optimizers"})
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig, metadata={"help": "the loop"})
    mesh: MeshConfig = field(default_factory=MeshConfig, metadata={"help": "device mesh (data, model)"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "Orbax"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "end-of-run evaluation"})


def _fail(key: str, value, why: str):
    raise ConfigError(f"{key}={value!r}: {why}")


def to_schema(cfg: DictConfig | dict) -> Config:
    """Checks keys, types and every field's declared range against the schema; returns the typed config."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    return to_typed(Config, raw)


def validate(cfg: DictConfig | dict, *, num_devices: int | None = None) -> Config:
    """Schema check (keys, types, ranges) plus the cross-field rules that need no data, the data group's
    included. Raises `ConfigError` or, for a data rule such as a source without its path, `DataError` (one
    line each)."""
    c = to_schema(cfg)
    resolve_config(c.data)
    if not c.loss.in_batch_negatives and c.loss.num_negatives == 0 and c.loss.negatives_per_row == 0:
        _fail("loss.in_batch_negatives", False, "leaves no negatives with loss.num_negatives=0 and "
                                                "loss.negatives_per_row=0; draw uniform negatives or keep the "
                                                "in-batch ones")
    if c.loss.name == "ccl":
        if not c.model.normalize:
            _fail("loss.name", "ccl", "scores cosines, so it needs model.normalize=true")
        if c.loss.bsl_negative_power != 1.0:
            _fail("loss.bsl_negative_power", c.loss.bsl_negative_power, "applies to the softmax only; set it to "
                                                                         "1.0 with loss.name=ccl")
    if c.loss.logq_source == "streaming" and not (c.loss.name == "softmax" and c.loss.logq_correction
                                                   and c.loss.in_batch_negatives):
        _fail("loss.logq_source", "streaming", "estimates the in-batch candidates' log q, which only the softmax "
                                               "with loss.logq_correction=true and loss.in_batch_negatives=true "
                                               "uses; set loss.logq_source=counts")
    if c.loss.negatives_per_row and c.model.item.use_history:
        _fail("loss.negatives_per_row", c.loss.negatives_per_row, "cannot be combined with item audiences "
                                                                   "(model.item.use_history=true) yet; set one off")
    if c.model.user.use_history and c.data.history_len <= 0:
        _fail("data.history_len", c.data.history_len, "must be > 0 when model.user.use_history is true")
    if c.model.item.use_history:
        if c.data.item_history_len <= 0:
            _fail("data.item_history_len", c.data.item_history_len, "must be > 0 when model.item.use_history is "
                                                                     "true")
        if not c.model.user.use_id:
            _fail("model.item.use_history", True, "pools user-table rows, so it needs model.user.use_id=true")
        if c.model.user.table.hash_buckets is not None:
            _fail("model.item.use_history", True, "needs one user-table row per user; set "
                                                  "model.user.table.hash_buckets=null")
    _check_tables(c)
    _check_mesh(c)
    _check_validation(c)
    if num_devices is not None:
        check_devices(c, num_devices)
    return c


def _check_tables(c: Config) -> None:
    for tower in ("user", "item"):
        t = getattr(c.model, tower).table
        key = f"model.{tower}.table"
        if t.pretrained and t.hash_buckets:
            _fail(f"{key}.pretrained", t.pretrained, "a hashed table cannot be matched by raw id; set "
                                                     f"{key}.hash_buckets=null to start from a pre-trained table")
        if t.freeze and not t.pretrained:
            _fail(f"{key}.freeze", t.freeze, f"a frozen table without {key}.pretrained would keep its random "
                                             f"initialisation; set {key}.pretrained=RUN_DIR (or .npy) or freeze=false")
        if t.pretrained and t.pretrained.endswith(".npy") and not t.pretrained_ids:
            _fail(f"{key}.pretrained_ids", t.pretrained_ids, "a .npy pre-trained table needs the .npy of its raw "
                                                             "ids (one per row)")


def _check_validation(c: Config) -> None:
    es = c.train.early_stopping
    # A prepared dataset's split is the one it was prepared with; `run` checks that it has validation rows.
    no_valid = c.data.valid_fraction == 0 and c.data.source != "prepared"
    if c.eval.valid_every_steps is not None and c.eval.valid_every_epochs is not None:
        _fail("eval.valid_every_epochs", c.eval.valid_every_epochs, "give eval.valid_every_steps or "
                                                                    "eval.valid_every_epochs, not both")
    every_key = "valid_every_epochs" if c.eval.valid_every_epochs is not None else "valid_every_steps"
    if getattr(c.eval, every_key) is not None and no_valid:
        _fail(f"eval.{every_key}", getattr(c.eval, every_key), "evaluates on the validation split, which "
                                                                  "data.valid_fraction=0 leaves empty; set "
                                                                  "data.valid_fraction > 0 (e.g. 0.1)")
    if es.metric is None:
        if c.optimizer.sparse.plateau_factor != 1.0:
            _fail("optimizer.sparse.plateau_factor", c.optimizer.sparse.plateau_factor, "is driven by the "
                                                                                      "validation metric; set "
                                                                                      "train.early_stopping.metric")
        return
    name, _, k = es.metric.partition("@")
    if name not in ("recall", "ndcg") or not k.isdigit() or int(k) not in c.eval.ks:
        _fail("train.early_stopping.metric", es.metric, f"must be recall@K or ndcg@K with K in eval.ks "
                                                        f"{list(c.eval.ks)}")
    if no_valid:
        _fail("train.early_stopping.metric", es.metric, "is measured on the validation split, which "
                                                        "data.valid_fraction=0 leaves empty; set "
                                                        "data.valid_fraction > 0 (e.g. 0.1)")
    if c.eval.valid_every_steps is None and c.eval.valid_every_epochs is None:
        _fail("train.early_stopping.metric", es.metric, "needs eval.valid_every_steps (how often the validation "
                                                        "split is evaluated)")


def _check_mesh(c: Config) -> None:
    for axis in ("data", "model"):
        size = getattr(c.mesh, axis)
        if size == 0 or size < -1:
            _fail(f"mesh.{axis}", size, "must be a device count >= 1, or -1 for the devices left over")
    if c.mesh.data == -1 and c.mesh.model == -1:
        _fail("mesh.model", -1, "only one mesh axis can be -1; give the other a size")
    if c.train.launcher == "pmap" and c.mesh.model != 1:
        _fail("mesh.model", c.mesh.model, "pmap replicates the state and cannot split tables; use "
                                          "train.launcher=shard_map (or jit) with this mesh")


def mesh_shape(c: Config, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes of the mesh over `num_devices` devices, -1 resolved. Raises `ConfigError`."""
    data, model = c.mesh.data, c.mesh.model
    if data == -1:
        data = num_devices // model if model > 0 and num_devices % model == 0 else 0
    if model == -1:
        model = num_devices // data if num_devices % data == 0 else 0
    if data * model != num_devices:
        _fail("mesh", f"data={c.mesh.data}, model={c.mesh.model}",
              f"the mesh axes must multiply to the {num_devices} devices in use (set train.num_devices or the "
              "mesh sizes)")
    return data, model


def check_devices(c: Config, num_devices: int) -> None:
    """The devices exist, the mesh covers them, and batch and negatives split evenly over them."""
    n = c.train.num_devices or num_devices
    if c.train.num_devices is not None and c.train.num_devices > num_devices:
        _fail("train.num_devices", c.train.num_devices, f"only {num_devices} devices are available")
    mesh_shape(c, n)
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
    """(key, default, help) for every leaf of the schema: the reference table of all knobs. The help ends with
    the allowed values in brackets, e.g. `[> 0]`, where the knob has a range."""
    rows = []
    obj = schema() if isinstance(schema, type) else schema
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            rows += describe(value, key + ".")
        else:
            rows.append((key, value, with_range(f)))
    return rows
