"""Set-up and the outer training loop: `run(cfg, run_dir)` is the one entry point `python -m train` and the
tests call. Each section is a named function: join the processes, load data and map ids to table rows, build
the model and the mesh, restore or create the state, train, evaluate.

In a multi-process run (see `train/distributed.py`) every process runs all of this; only process 0 writes
the run's files other than checkpoints, and evaluates.

A resume first compares the newest usable checkpoint's config and data fingerprint with this run's
(`train/resume.py`) and only then writes `config.yaml`, `vocab/` and the other run files, so a refused resume
leaves the run directory as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import datetime
import itertools
import json
import logging
import math
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from data.batching import Batches, negative_pool
from data.load import open_data as load_dataset
from eval.report import protocol_text
from towers.id_tables import TABLE_TOWERS, hashings, vocab_view
from towers.two_tower import TwoTower, select_features
from train import config as config_lib
from train import distributed
from train import freq_estimator
from train import resume
from train.checkpoint import CheckpointError, Checkpointer, NonFiniteState
from train.input import dispatch_groups, grain_feed, prepare
from train.mesh import padded_rows, table_bytes_per_device
from train.metrics_writer import MetricWriter
from train.parallel import Launcher
from train.pretrained import pretrained_overrides, save_window, train_window
from train.sparse import FrozenTable, make_sparse_optimizer
from train.state import dense_optimizer, init_state, sparse_learning_rate, table_sizes
from train.step import StepConfig, make_step

log = logging.getLogger("twotower.train")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became non-finite."""


# ---------------------------------------------------------------- data

def load_data(c: config_lib.Config):
    t0 = time.perf_counter()
    ds = load_dataset(c.data)
    log.info("data %s: %d users, %d items, %d train / %d test interactions (%.1fs); stats: %s", ds.name,
             ds.num_users, ds.num_items, len(ds.train), len(ds.test), time.perf_counter() - t0,
             json.dumps(ds.stats, default=str))
    config_lib.check_against_data(c, ds.num_users, ds.num_items, len(ds.train))
    return ds


def save_artifacts(run_dir: pathlib.Path, cfg, ds) -> None:
    """What eval/export/serve need besides the checkpoint: resolved config, vocabularies, data stats."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    vocab_dir = run_dir / "vocab"
    vocab_dir.mkdir(exist_ok=True)
    ds.user_vocab.save(vocab_dir / "user.npy")
    ds.item_vocab.save(vocab_dir / "item.npy")
    for name, vocab in ds.feature_vocabs.items():
        vocab.save(vocab_dir / f"feature.{name}.npy")
    specs = {"user": [dataclasses.asdict(s) for s in ds.user_feature_specs],
             "item": [dataclasses.asdict(s) for s in ds.item_feature_specs]}
    (run_dir / "features.json").write_text(json.dumps(specs, indent=2))
    (run_dir / "data_stats.json").write_text(json.dumps(ds.stats, indent=2, default=str))
    save_window(run_dir, ds.train.timestamp)


def id_row_maps(c: config_lib.Config, ds, run_dir: pathlib.Path | None = None) -> dict[str, np.ndarray]:
    """Vocabulary rows -> rows of each hashed table, built from the vocabularies' raw ids.

    Logs each hashed table's collision rate and, when `run_dir` is given, saves the report to `hashing.json`.

    Returns:
      {table: int32[vocab, num_hashes]} for the hashed tables only (see `train.input.prepare`).
    """
    vocabs = {"user": ds.user_vocab, "item": ds.item_vocab}
    maps, reports = {}, {}
    for name, hashing in hashings(c.model).items():
        raw = vocabs[name].raw_ids
        maps[name] = hashing.rows(raw)
        reports[name] = hashing.collision_report(raw, maps[name])
        r = reports[name]
        log.info("%s ids hashed into %d rows (%d hash(es)): %.4g%% of the %d ids share their whole embedding with "
                 "another id (%.4g%% expected at random; per hash %s%%), %d rows used", name, r["buckets"],
                 r["num_hashes"], 100 * r["collision_rate"], r["ids"], 100 * r["expected_collision_rate"],
                 "/".join(f"{100 * x:.3g}" for x in r["collision_rate_per_hash"]), r["rows_used"])
    if reports and run_dir is not None:
        (pathlib.Path(run_dir) / "hashing.json").write_text(json.dumps(reports, indent=2))
    return maps


# ---------------------------------------------------------------- model and state
def select_devices(c: config_lib.Config) -> list:
    """The devices of the mesh: `train.num_devices` of them, or all (of every process in a multi-process run)."""
    devices = jax.devices() if c.train.launcher != "pmap" else jax.local_devices()
    config_lib.check_devices(c, len(devices))
    return devices[:c.train.num_devices or len(devices)]


def total_steps(c: config_lib.Config, num_train: int) -> int:
    if c.train.total_steps is not None:
        return c.train.total_steps
    return max(1, math.ceil(c.train.num_epochs * num_train / c.train.global_batch_size))


def valid_every(c: config_lib.Config, num_train: int) -> int | None:
    """Steps between validation evaluations: `eval.valid_every_steps`, or `eval.valid_every_epochs` in steps of
    this train split (at least 1); None = no validation during training."""
    if c.eval.valid_every_epochs is not None:
        return max(1, round(c.eval.valid_every_epochs * num_train / c.train.global_batch_size))
    return c.eval.valid_every_steps


def _scaled(schedule, scale: float, step):
    return scale * schedule(step)


@dataclasses.dataclass
class Parts:
    """What training needs besides the state; built before the state exists, so a resumed run restores
    straight into the launcher's layout without creating a fresh state first."""
    model: TwoTower
    graphdef: object
    launcher: Launcher
    step_cfg: StepConfig
    dense_tx: object
    sparse_opts: dict
    sizes: dict[str, int]


def build_parts(c: config_lib.Config, ds, steps: int, devices: list, table_rows: int | None = None, *,
                sparse_lr_scale: float = 1.0) -> Parts:
    """Model, optimizers and launcher on a (data, model) mesh from `mesh.*`.

    `sparse_lr_scale` multiplies the ID tables' learning rate (reduce on plateau; 1 leaves it as configured).

    `table_rows` (benchmarks only) gives every ID table at least that many rows, beyond the vocabulary.
    """
    model = TwoTower(c.model, ds.user_feature_specs, ds.item_feature_specs, rngs=nnx.Rngs(c.seed))
    graphdef, _ = nnx.split(model)
    dense_tx = dense_optimizer(c, steps)
    _, model_axis = config_lib.mesh_shape(c, len(devices))
    sizes = table_sizes(c, ds.num_users, ds.num_items, model_axis)
    if table_rows:
        sizes = {name: padded_rows(max(rows, table_rows), model_axis) for name, rows in sizes.items()}
    sparse_lr = sparse_learning_rate(c.optimizer.sparse, steps)
    if sparse_lr_scale != 1.0:
        sparse_lr = (sparse_lr * sparse_lr_scale if not callable(sparse_lr) else
                     functools.partial(_scaled, sparse_lr, sparse_lr_scale))
    sparse_opts = {name: FrozenTable() if getattr(c.model, TABLE_TOWERS[name]).table.freeze else
                   make_sparse_optimizer(c.optimizer.sparse.name, learning_rate=sparse_lr)
                   for name in sizes}
    streaming = None
    if c.loss.logq_source == "streaming":   # item vocabulary rows, B_global of them per step
        streaming = freq_estimator.make_spec(c.loss.streaming_buckets, c.loss.streaming_hashes,
                                             c.loss.streaming_alpha, num_ids=ds.num_items,
                                             draws_per_step=c.train.global_batch_size)
    step_cfg = StepConfig(
        temperature=c.loss.temperature, global_batch=c.train.global_batch_size,
        global_negatives=c.loss.num_negatives, num_items=len(negative_pool(ds)),
        logq_correction=c.loss.logq_correction, logq_mixture=c.loss.logq_mixture,
        remove_accidental_hits=c.loss.remove_accidental_hits, embedding_l2=c.loss.embedding_l2,
        in_batch_negatives=c.loss.in_batch_negatives, loss_type=c.loss.name, ccl_margin=c.loss.ccl_margin,
        ccl_negative_weight=c.loss.ccl_negative_weight, negative_power=c.loss.bsl_negative_power,
        negatives_per_row=c.loss.negatives_per_row, user_dropout=c.loss.user_dropout,
        **input_flags(c, sizes), logq_streaming=streaming,
        condition=c.model.user.condition, condition_dropout=c.model.user.condition_dropout,
        condition_filter=c.loss.condition_filter)
    step_fn = make_step(graphdef=graphdef, cfg=step_cfg, dense_tx=dense_tx, sparse_opts=sparse_opts)
    launcher = Launcher(c.train.launcher, step_fn, devices, model=model_axis,
                        replicated=("logq_freq",) if streaming else ())
    return Parts(model, graphdef, launcher, step_cfg, dense_tx, sparse_opts, sizes)


def create_state(c: config_lib.Config, parts: Parts, *, overrides: dict | None = None,
                 abstract: bool = False) -> dict:
    """A fresh state in the launcher's layout (tables drawn shard by shard on their devices), or with
    `abstract` its shape/sharding twin, the target a checkpoint restores into."""
    state = init_state(c, parts.model, parts.sizes, parts.dense_tx, parts.sparse_opts, c.seed,
                       table_sharding=parts.launcher.table_sharding, overrides=overrides, abstract=abstract,
                       logq_freq=parts.step_cfg.logq_streaming)
    return parts.launcher.abstract_state(state) if abstract else parts.launcher.put_state(state)


def build(c: config_lib.Config, ds, steps: int, devices: list, table_rows: int | None = None):
    """Model, optimizers, launcher and a fresh state already on the devices (no pre-trained rows).

    Returns:
      (model, graphdef, launcher, state, step_cfg).
    """
    parts = build_parts(c, ds, steps, devices, table_rows)
    return parts.model, parts.graphdef, parts.launcher, create_state(c, parts), parts.step_cfg


def fresh_state(c: config_lib.Config, parts: Parts, ds, run_dir: pathlib.Path | None) -> dict:
    """A fresh state with any pre-trained table rows (matched by raw id, reported to `pretrained.json`)."""
    vocabs = {"user": ds.user_vocab, "item": ds.item_vocab}
    overrides = pretrained_overrides(c, vocabs, set(parts.sizes), run_dir, window=train_window(ds.train.timestamp))
    return create_state(c, parts, overrides=overrides)


def restore_or_init(c: config_lib.Config, ckpt: Checkpointer, parts: Parts, ds, batches: Batches,
                    run_dir: pathlib.Path | None, fingerprint: dict | None = None,
                    restored_extra: dict | None = None) -> tuple[dict, dict]:
    """The latest usable checkpoint, restored straight into the launcher's layout (split tables arrive split),
    or a fresh state when there is none or `checkpoint.resume` is false.

    With `fingerprint` (`train.resume.fingerprint`), a checkpoint whose config or data differ in a way
    `checkpoint.allow_config_change` does not accept refuses the resume (`ConfigError`) before its state is read.
    `restored_extra`, when given, receives the restored checkpoint's `extra` (the early-stopping tracking).

    Returns:
      (state, the accepted changes {key: [old, new]} of the restored checkpoint's config).
    """
    if c.checkpoint.resume:
        changes = {}

        def accept(step: int, extra: dict) -> None:
            if fingerprint is not None:
                changes.clear()
                changes.update(resume.check(ckpt.directory.parent, step, extra.get("config"), fingerprint,
                                            list(c.checkpoint.allow_config_change)))

        restored = ckpt.restore_latest(create_state(c, parts, abstract=True), accept)
        if restored is not None:
            step, state, extra = restored
            batches.restore(extra["data"])
            if restored_extra is not None:
                restored_extra.update(extra)
            log.info("resumed from %s at step %d", ckpt.directory, step)
            return state, changes
    return fresh_state(c, parts, ds, run_dir), {}


def write_untrained_run(c: config_lib.Config, run_dir: str | pathlib.Path, *, step: int = 0):
    """A run directory whose checkpoint at `step` holds the freshly initialised state, without training.

    For export/serving tests and benchmarks, and as an untrained baseline for `python -m eval`.
    Returns (dataset, model, state).
    """
    run_dir = pathlib.Path(run_dir).absolute()
    ds = load_data(c)
    save_artifacts(run_dir, c, ds)
    id_row_maps(c, ds, run_dir)
    parts = build_parts(c, ds, max(step, 1), select_devices(c))
    state = fresh_state(c, parts, ds, run_dir)
    ckpt = Checkpointer(run_dir / "ckpt", every_steps=1, max_to_keep=1, async_save=False)
    ckpt.save(step, state, {"data": {}}, force=True)
    ckpt.close()
    return ds, parts.model, state


# ---------------------------------------------------------------- loop
def _summarise(window: list[dict], step: int, steps_timed: int, seconds: float, batch: int) -> dict:
    """The means of a log window's metrics (host copies; one entry per dispatch, each a step's scalars or a group's
    [G] arrays) and its throughput: `steps_timed` steps took `seconds`."""
    num_steps = sum(int(np.size(m["count"])) for m in window)
    # In float64 over the steps in order: the same sums however the steps were grouped into dispatches.
    sums = jax.tree.map(lambda *xs: float(np.sum(np.concatenate([np.ravel(x) for x in xs]), dtype=np.float64)),
                        *window)
    count = max(sums.pop("count"), 1.0)
    out = {"train/loss": sums.pop("loss_sum") / count,
           "train/grad_norm": math.sqrt(sums.pop("grad_norm_sq") / num_steps)}
    out.update({f"train/{k.removesuffix('_sum')}": v / count for k, v in sums.items()})
    out["train/steps_per_sec"] = steps_timed / max(seconds, 1e-9)
    out["train/examples_per_sec"] = out["train/steps_per_sec"] * batch
    if not all(math.isfinite(v) for v in out.values()):
        raise TrainingDiverged(f"non-finite metrics in steps {step - num_steps + 1}..{step}: {out}")
    return out


class WindowClock:
    """Wall-clock time of the training steps, read only where the device has finished them.

    JAX dispatches a step and returns before it has run, so a clock read after dispatching a window's steps
    times their dispatch, not their execution, and overstates throughput the more often metrics are logged.
    This clock is read at synchronised points only: once the first step has finished (`first_step`; it
    includes compilation and the first batch, and is reported on its own as `first_step_seconds`) and once each
    log window's metrics have been fetched (`lap`), so the first window's clock starts after the first step.
    Checkpoint saves (`saving_checkpoint`) are timed on their own and left out of the window they fall in.
    """

    def __init__(self):
        self.mark = time.perf_counter()
        self.started = self.mark
        self.first_step_seconds: float | None = None
        self.first_steps = 1        # steps in the first dispatch
        self.steps = 0              # steps since `mark`, the first dispatch excepted
        self.saving = 0.0           # checkpoint seconds since the last lap
        self.checkpoint_seconds = 0.0
        self.paused = 0.0           # validation seconds since the last lap
        self.validation_seconds = 0.0

    def first_step(self, metrics, steps: int = 1) -> None:
        """Waits for the first dispatch (`steps` steps) and starts the first window's clock."""
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        self.first_step_seconds, self.first_steps, self.mark = now - self.mark, steps, now

    def step(self, steps: int = 1) -> None:
        self.steps += steps

    def lap(self) -> tuple[int, float, float]:
        """(steps, their seconds, checkpoint seconds) since the last lap; call once the window's metrics are on
        the host. A window that holds only the first dispatch is timed with its compilation: nothing else to
        time."""
        now = time.perf_counter()
        steps, seconds, saving = self.steps, now - self.mark - self.saving - self.paused, self.saving
        if steps == 0:
            steps, seconds = self.first_steps, self.first_step_seconds
        self.mark, self.steps, self.saving, self.paused = now, 0, 0.0, 0.0
        return steps, seconds, saving

    @contextlib.contextmanager
    def _apart(self, state, window: str, total: str):
        """Times a block apart from the steps: the steps it would wait for are finished first, and its seconds go
        to the window's `window` counter and the run's `total`."""
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t0
            setattr(self, window, getattr(self, window) + seconds)
            setattr(self, total, getattr(self, total) + seconds)

    def validating(self, state):
        """Times a validation evaluation apart from the steps (and from the checkpoint saves)."""
        return self._apart(state, "paused", "validation_seconds")

    def saving_checkpoint(self, state):
        """Times a checkpoint save apart from the steps."""
        return self._apart(state, "saving", "checkpoint_seconds")

    def totals(self) -> dict[str, float]:
        """For `final_metrics.json`: the first step, the whole loop (saves included) and the saves."""
        out = {"first_step_seconds": self.first_step_seconds or 0.0,
               "training_seconds": time.perf_counter() - self.started,
               "checkpoint_seconds": self.checkpoint_seconds}
        if self.validation_seconds:
            out["validation_seconds"] = self.validation_seconds
        return out


class Progress:
    """Progress for whoever watches the run, every log window: steps/s, examples/s, loss and ETA.

    On a terminal, a tqdm bar on stderr. Written to a file or a pipe, a bar leaves one carriage-return frame per
    step in the log, so there it is one `log.info` line per log window instead. Nothing when not `enabled`.
    """

    def __init__(self, start: int, steps: int, *, enabled: bool):
        self.steps, self.enabled, self.bar = steps, enabled, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def window(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}",
                                 ex_s=f"{metrics['train/examples_per_sec']:,.0f}")
        elif self.enabled:
            eta = (self.steps - step) / max(metrics["train/steps_per_sec"], 1e-9)
            line = (f"step {step}/{self.steps} ({100 * step / self.steps:.0f}%): "
                    f"{metrics['train/steps_per_sec']:.2f} steps/s, {metrics['train/examples_per_sec']:,.0f} "
                    f"examples/s, loss {metrics['train/loss']:.4f}, ETA {datetime.timedelta(seconds=round(eta))}")
            if "train/first_step_seconds" in metrics:
                line += f"; first step {metrics['train/first_step_seconds']:.1f}s (compilation included)"
            log.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_batches(c: config_lib.Config, ds, seed: int | None = None, share: tuple[int, int] = (0, 1)) -> Batches:
    """The training batches `c` asks for (histories and audiences only for towers that read them, side features
    only those the towers read); `share` is (process index, process count): the part of each global batch this
    process reads (`Launcher.batch_share`)."""
    reads = {t: [s.name for s in select_features(getattr(ds, f"{t}_feature_specs"), getattr(c.model, t).features, t)]
             for t in ("user", "item")}
    return Batches(ds, batch_size=c.train.global_batch_size, num_negatives=c.loss.num_negatives,
                   history_len=c.data.history_len if c.model.user.use_history else 0,
                   history_mode=c.data.history_mode, seed=c.seed if seed is None else seed,
                   item_history_len=c.data.item_history_len if c.model.item.use_history else 0,
                   negatives_per_row=c.loss.negatives_per_row, process_index=share[0], process_count=share[1],
                   condition=c.model.user.condition, user_features=reads["user"], item_features=reads["item"])


def input_flags(c: config_lib.Config, sizes: dict[str, int]) -> dict:
    """What a config's step reads from a batch, given its tables (`table_sizes`): the `StepConfig` fields that
    `prepare_kwargs` hands to `train.input.prepare`."""
    return dict(use_user_table="user" in sizes, use_item_table="item" in sizes, use_history=c.model.user.use_history,
                use_item_history=c.model.item.use_history)


def prepare_kwargs(step_cfg: StepConfig) -> dict:
    """The `train.input.prepare` flags that match a step."""
    return dict(use_user_table=step_cfg.use_user_table, use_item_table=step_cfg.use_item_table,
                use_history=step_cfg.use_history, use_item_history=step_cfg.use_item_history)


def train_loop(c, launcher, dev_state, batches, ckpt, writer, start: int, steps: int, step_cfg,
               row_maps: dict | None = None, extra: dict | None = None, validation: "Validation | None" = None):
    """Steps `start+1 .. steps`: prefetched batches, metrics every `log_every_steps` (to `writer` unless it is
    None, as on processes other than 0), checkpoints on the cadence and at the end, each with `extra` (the
    config fingerprint) besides the data position. A state with NaN or inf stops the run before it is saved.

    With `train.steps_per_dispatch` > 1 the steps run in groups of up to that many per dispatch
    (`train.input.dispatch_groups`; `Launcher.run_group`); every step where the loop logs, saves or validates
    ends a group, so those happen at the same steps, and the results are the same up to float rounding. A group
    cut short by such a step runs its steps one at a time: two programs (a full group, one step) whatever the
    sizes.

    Throughput is timed by a `WindowClock`: each logged line's steps/s covers the steps the device finished
    since the previous line, without the first dispatch (compilation; `train/first_step_seconds` on the first
    line) and without checkpoint saves (`train/checkpoint_seconds`).

    With a `validation`, the validation split is evaluated on its cadence (timed apart from the steps); when it
    asks to stop early, the step's checkpoint (with the tracking in its `extra`) is saved and the loop ends.

    Returns:
      (state, the last logged metrics, `WindowClock.totals()`).
    """
    use = dict(prepare_kwargs(step_cfg), row_maps=row_maps)
    if batches.process_count > 1:   # each process reads its own share; the touched rows are exchanged
        use["exchange"] = distributed.RowExchange()
        launcher.process_local_batches = True

    per_dispatch = c.train.steps_per_dispatch
    cadences = (c.train.log_every_steps, c.checkpoint.every_steps) + (() if validation is None else
                                                                       (validation.every,))
    sizes = dispatch_groups(start, steps, per_dispatch, cadences) if per_dispatch > 1 else None
    feed = grain_feed(batches, functools.partial(prepare, **use), depth=c.train.prefetch,
                      threads=c.data.input_threads, workers=c.data.input_workers, groups=sizes)
    progress = Progress(start, steps, enabled=c.train.progress and distributed.is_primary())
    clock = WindowClock()
    window, last, first_window = [], {}, True
    step = start
    try:
        for size in (itertools.repeat(1, steps - start) if sizes is None else sizes):
            size = int(size)
            (local, shared), data_pos = next(feed)
            if sizes is None:
                dev_state, metrics = launcher(dev_state, *launcher.put_batch(local, shared))
                window.append(metrics)
            elif size == per_dispatch:
                dev_state, metrics = launcher.run_group(dev_state, *launcher.put_group(local, shared))
                window.append(metrics)
            else:   # cut short by a logging, checkpoint or validation step: one step at a time, one program for all
                for i in range(size):
                    one = jax.tree.map(lambda x, i=i: x[i], (local, shared))
                    dev_state, metrics = launcher(dev_state, *launcher.put_batch(*one))
                    window.append(metrics)
            if step == start:
                clock.first_step(metrics, size)
            else:
                clock.step(size)
            step += size
            stop = False
            if validation is not None and validation.due(step, steps):
                with clock.validating(dev_state):
                    stop = validation(step, dev_state, data_pos, writer)
                launcher = validation.launcher   # a new one after a reduce-on-plateau
            if step % c.train.log_every_steps == 0 or step == steps or stop:
                window = jax.device_get(window)   # waits for the window's steps: only now is the clock read
                steps_timed, seconds, saving = clock.lap()
                last = _summarise(window, step, steps_timed, seconds, c.train.global_batch_size)
                last["train/checkpoint_seconds"] = saving
                if first_window:
                    last["train/first_step_seconds"] = clock.first_step_seconds
                    first_window = False
                if writer is not None:
                    writer.write(step, last)
                progress.window(step, last)
                window = []
            if step % c.checkpoint.every_steps == 0 or step == steps or stop:
                tracked = {} if validation is None else {"early_stopping": validation.tracking()}
                with clock.saving_checkpoint(dev_state):
                    try:
                        ckpt.save(step, launcher.get_state(dev_state),
                                  {**(extra or {}), **tracked, "data": data_pos}, force=True)
                    except NonFiniteState as e:
                        raise TrainingDiverged(str(e)) from None
            progress.step(size)
            if stop:
                break
    finally:
        feed.close()
        progress.close()
    return dev_state, last, clock.totals()


# ---------------------------------------------------------------- validation and early stopping
class Validation:
    """Evaluation on the validation split during training (`eval.valid_every_steps`) and, with
    `train.early_stopping.metric`, early stopping that keeps the best state.

    The best state is saved by a `Checkpointer` of its own, `<run_dir>/ckpt_best` (one checkpoint kept, verified
    on restore like the periodic ones), rather than through Orbax's metric-ranked retention (`best_fn`) in
    `ckpt/`: there `max_to_keep` would then rank the periodic checkpoints a resume needs by a metric most of them
    lack. The tracking (best step and metric, evaluations without improvement, the step training stopped at,
    the reduce-on-plateau scale) goes into every periodic checkpoint's `extra`, so a resumed run carries on with
    the best-so-far it had; a best checkpoint newer than the resumed step (saved by the attempt that was killed)
    is replaced when the replayed steps reach it again.

    Reduce on plateau (`optimizer.sparse.plateau_factor` < 1) multiplies the ID tables' rate by the factor after
    `plateau_patience` evaluations without improvement. The scale is a host value: `rebuild(scale)` makes the
    parts (and launcher: one compilation per reduction) whose step applies it, and `launcher` is the one to use.
    """

    def __init__(self, c: config_lib.Config, parts: Parts, ds, row_maps: dict | None, launcher,
                 best_ckpt: Checkpointer | None, tracking: dict | None = None, rebuild=None):
        self.c, self.parts, self.ds, self.row_maps, self.launcher = c, parts, ds, row_maps, launcher
        self.every = valid_every(c, len(ds.train))
        es = c.train.early_stopping
        self.metric, self.patience, self.min_delta = es.metric, es.patience, es.min_delta
        self.best_ckpt = best_ckpt
        t = tracking or {}
        self.best_step: int | None = t.get("best_step")
        self.best_metric: float | None = t.get("best_metric")
        self.bad_evals: int = t.get("bad_evals", 0)
        self.stopped_at: int | None = t.get("stopped_at")
        self.plateau_factor = c.optimizer.sparse.plateau_factor
        self.plateau_patience = c.optimizer.sparse.plateau_patience
        self.lr_scale: float = t.get("lr_scale", 1.0)
        self.plateau_count: int = t.get("plateau_count", 0)
        self.rebuild = rebuild

    def due(self, step: int, steps: int) -> bool:
        return step % self.every == 0 or step == steps

    def tracking(self) -> dict:
        """What a checkpoint's `extra` keeps of the tracking (JSON)."""
        out = {"metric": self.metric, "best_step": self.best_step, "best_metric": self.best_metric,
               "bad_evals": self.bad_evals, "stopped_at": self.stopped_at}
        if self.plateau_factor != 1.0:
            out.update(lr_scale=self.lr_scale, plateau_count=self.plateau_count)
        return out

    def __call__(self, step: int, dev_state, data_pos, writer) -> bool:
        """Evaluates the validation split at `step`, logs valid/model/*, saves the state when the metric
        improved. Returns whether training stops here (the same answer on every process)."""
        state = self.launcher.get_state(dev_state)
        ev = final_eval(self.c, self.parts.model, self.parts.graphdef, state, self.ds, self.row_maps,
                        split="valid", baselines=False)
        value = float(ev["model"][self.metric]) if ev is not None and self.metric else None
        if ev is not None:
            if writer is not None:
                writer.write(step, {f"valid/model/{k}": v for k, v in ev["model"].items()})
            log.info("validation at step %d over %d users: %s", step, ev["num_users"],
                     ", ".join(f"{k} {v:.4f}" for k, v in ev["model"].items() if "@" in k))
        if not self.metric:
            return False
        value = _from_primary(value)
        improved = self.best_metric is None or value > self.best_metric + self.min_delta
        if improved:
            self.best_step, self.best_metric, self.bad_evals, self.plateau_count = step, value, 0, 0
            self.best_ckpt.wait()
            stale = [s for s in self.best_ckpt.steps() if s >= step]   # from an attempt that was killed
            for s in stale:
                self.best_ckpt.manager.delete(s)
            try:
                self.best_ckpt.save(step, state, {"data": data_pos, "valid": {self.metric: value}}, force=True)
            except NonFiniteState as e:
                raise TrainingDiverged(str(e)) from None
        else:
            self.bad_evals += 1
            self.plateau_count += 1
        log.info("early stopping: %s %.4f at step %d; best %.4f at step %d; %d of %d evaluations without "
                 "improvement", self.metric, value, step, self.best_metric, self.best_step, self.bad_evals,
                 self.patience)
        if self.bad_evals < self.patience and self.plateau_factor != 1.0 and \
                self.plateau_count >= self.plateau_patience:
            self.lr_scale *= self.plateau_factor
            self.plateau_count = 0
            log.info("reduce on plateau at step %d: ID-table learning rate scaled by %.4g", step, self.lr_scale)
            local = self.launcher.process_local_batches
            self.parts = self.rebuild(self.lr_scale)
            self.launcher = self.parts.launcher
            self.launcher.process_local_batches = local
        if self.bad_evals >= self.patience:
            self.stopped_at = step
            log.info("early stopping at step %d: no improvement of %s for %d evaluations", step, self.metric,
                     self.patience)
            return True
        return False

    def restore_best(self, abstract_state):
        """The best state, restored from `ckpt_best` into the launcher's layout (None when nothing was saved)."""
        if self.best_step is None:
            return None
        self.best_ckpt.wait()

        def accept(step: int, extra: dict) -> None:
            if step != self.best_step:
                raise CheckpointError(f"{self.best_ckpt.directory} holds step {step}, but the best validation "
                                      f"{self.metric} was at step {self.best_step}")

        step, state, _ = self.best_ckpt.restore_latest(abstract_state, accept)
        log.info("restored the best state (step %d, %s %.4f) from %s", step, self.metric, self.best_metric,
                 self.best_ckpt.directory)
        return state

    def summary(self, steps: int) -> dict:
        """For `final_metrics.json`."""
        out = {"metric": self.metric, "best_step": self.best_step, "best_metric": self.best_metric,
               "stopped_at": self.stopped_at, "planned_steps": steps, "patience": self.patience,
               "min_delta": self.min_delta}
        if self.plateau_factor != 1.0:
            out["sparse_lr_scale"] = self.lr_scale
        return out


def _from_primary(value):
    """Process 0's value (the only one that evaluates) on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return float(multihost_utils.broadcast_one_to_all(np.float64(value if value is not None else 0.0)))


# ---------------------------------------------------------------- entry point
def run(cfg, run_dir: str | pathlib.Path) -> dict:
    """Trains (resuming if the run dir has a checkpoint), evaluates, and returns the final metrics."""
    c = cfg if isinstance(cfg, config_lib.Config) else config_lib.validate(cfg)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    run_dir = pathlib.Path(run_dir).absolute()
    distributed.initialize(c.train.distributed, c.train.launcher)   # before anything touches a device
    primary = distributed.is_primary()
    devices = select_devices(c)
    ds = load_data(c)
    fingerprint = resume.fingerprint(c, ds)
    steps = total_steps(c, len(ds.train))
    parts = build_parts(c, ds, steps, devices)
    # Several processes: each reads only its share of every global batch (the same global batches as one process).
    share = parts.launcher.batch_share(c.train.global_batch_size) if jax.process_count() > 1 else (0, 1)
    batches = make_batches(c, ds, share=share)
    if share[1] > 1:
        rows = c.train.global_batch_size // share[1]
        log.info("input: process %d of %d reads examples [%d, %d) of every global batch of %d", share[0], share[1],
                 share[0] * rows, (share[0] + 1) * rows, c.train.global_batch_size)
    ckpt = Checkpointer(run_dir / "ckpt", every_steps=c.checkpoint.every_steps,
                        max_to_keep=c.checkpoint.max_to_keep, async_save=c.checkpoint.async_save)
    if primary:
        run_dir.mkdir(parents=True, exist_ok=True)
    # Nothing but checkpoint directories is written before the resume is accepted.
    restored_extra = {}
    dev_state, changes = restore_or_init(c, ckpt, parts, ds, batches, run_dir if primary else None, fingerprint,
                                         restored_extra)
    start = int(jax.device_get(dev_state["step"]))
    if primary:
        save_artifacts(run_dir, c, ds)
        resume.record(run_dir, start, changes)
        resume.drop_replayed_metrics(run_dir, start, evaluates_at=steps if c.eval.at_end else None)
    row_maps = id_row_maps(c, ds, run_dir if primary else None)
    launcher = parts.launcher
    log.info("training %d steps (from step %d) on %d %s device(s) in %d process(es) with %s, mesh data=%d x "
             "model=%d, global batch %d; ID table bytes per device: %s", steps, start, len(devices),
             devices[0].platform, jax.process_count(), c.train.launcher, launcher.n // launcher.model_size,
             launcher.model_size, c.train.global_batch_size, table_bytes_per_device(dev_state["tables"]))
    # TensorBoard hides the events of steps after `start` that an attempt which crashed after checkpoint `start`
    # logged, as `drop_replayed_metrics` removed them from metrics.jsonl.
    writer = MetricWriter(run_dir, purge_step=start + 1) if primary else None
    last, timing = {}, {}
    validation, best_ckpt = None, None
    if valid_every(c, len(ds.train)) is not None:
        has_valid = ds.split_rows("valid").any() if hasattr(ds, "split_rows") else ds.valid is not None
        if not has_valid:
            raise config_lib.ConfigError("eval.valid_every_steps/valid_every_epochs: the dataset has no "
                                         "validation rows; set data.valid_fraction > 0 (a prepared dataset: "
                                         "prepare it with one)")
        if c.train.early_stopping.metric:
            best_ckpt = Checkpointer(run_dir / "ckpt_best", every_steps=1, max_to_keep=1,
                                     async_save=c.checkpoint.async_save)
        tracking = restored_extra.get("early_stopping") or {}
        if tracking.get("lr_scale", 1.0) != 1.0:   # a resumed run whose rate was reduced on plateau
            parts = build_parts(c, ds, steps, devices, sparse_lr_scale=tracking["lr_scale"])
            launcher = parts.launcher
        validation = Validation(c, parts, ds, row_maps, launcher, best_ckpt, tracking,
                                rebuild=lambda scale: build_parts(c, ds, steps, devices, sparse_lr_scale=scale))
    try:
        if start < steps and (validation is None or validation.stopped_at is None):
            dev_state, last, timing = train_loop(c, launcher, dev_state, batches, ckpt, writer, start, steps,
                                                 parts.step_cfg, row_maps, {"config": fingerprint}, validation)
        if best_ckpt is not None:
            best = validation.restore_best(create_state(c, parts, abstract=True))
            dev_state = dev_state if best is None else best
    finally:
        ckpt.close()
        if best_ckpt is not None:
            best_ckpt.close()
    state = launcher.get_state(dev_state)
    result = {"steps": steps, "train": last, "timing": timing}
    if best_ckpt is not None:
        result["early_stopping"] = validation.summary(steps)
    if c.eval.at_end:
        t0 = time.perf_counter()
        ev = final_eval(c, parts.model, parts.graphdef, state, ds, row_maps)   # every process joins the gather
        timing["eval_seconds"] = time.perf_counter() - t0
        if primary:
            log.info("evaluated in %.1fs", timing["eval_seconds"])
            result["eval"] = ev
            writer.write(steps, {f"eval/{name}/{k}": v for name in ("model", "most_popular")
                                 for k, v in ev[name].items()})
            (run_dir / "final_metrics.json").write_text(json.dumps(result, indent=2))
            print_report(ev, c.eval.ks)
    if writer is not None:
        writer.close()
    return result


def final_eval(c, model, graphdef, state, ds, row_maps: dict | None = None, *, split: str = "test",
               baselines: bool = True) -> dict | None:
    """Held-out metrics of the trained towers and of most-popular (without `baselines`, of the towers only) on
    `split` ("test", or "valid" during training); None on processes other than 0.

    Hashed tables are first turned into per-id embeddings (`towers.id_tables.vocab_view`), so evaluation
    indexes every table by vocabulary row.
    """
    from eval.holdout import evaluate, heldout_users, model_embeddings
    from towers.inference.embed import Towers

    params, tables = distributed.host_copy((state["params"], state["tables"]))
    if not distributed.is_primary():
        return None
    tables = {name: vocab_view(t, row_maps[name]) if name in (row_maps or {}) else t for name, t in tables.items()}
    # Inference runs on one device: inputs replicated over a mesh would make every device embed every item,
    # and host (numpy) tables would be copied to the device again for every batch.
    params, tables = jax.device_put((params, tables), jax.local_devices()[0])
    if hasattr(ds, "eval_subset"):   # a prepared dataset: read the evaluated users' records only
        ds = ds.eval_subset(split, max_users=c.eval.max_users, seed=c.eval.seed)
    users = heldout_users(ds, split, max_users=c.eval.max_users, seed=c.eval.seed)
    user_emb, item_emb = model_embeddings(Towers(graphdef, params, tables, model), ds, users, c.data.history_len)
    return evaluate(user_emb, item_emb, ds, users, list(c.eval.ks), split=split, user_block=c.eval.user_block,
                    item_block=c.eval.item_block, baselines=baselines)


def print_report(ev: dict, ks: list[int]) -> None:
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    print(f"\nheld-out evaluation over {ev['num_users']} users, all items ranked, {protocol_text(ev)}:")
    print(f"{'':14s}" + "".join(f"{n:>12s}" for n in names))
    for who in ("model", "most_popular"):
        print(f"{who:14s}" + "".join(f"{ev[who][n]:12.4f}" for n in names))
