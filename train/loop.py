"""Set-up and the outer training loop: `run(cfg, run_dir)` is the one entry point `python -m train` and the
tests call. Each section is a named function: load data, build the model, create or restore the state, train,
evaluate."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from data.load import load as load_dataset
from data.batching import Batches
from towers.two_tower import TwoTower
from train import config as config_lib
from train.checkpoint import Checkpointer
from train.input import Prefetcher, prepare
from train.metrics_writer import MetricWriter
from train.parallel import Launcher
from train.sparse import make_sparse_optimizer
from train.state import abstract_state, dense_optimizer, init_state, table_sizes
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


# ---------------------------------------------------------------- model and state
def select_devices(c: config_lib.Config) -> list:
    devices = jax.local_devices()
    config_lib.check_devices(c, len(devices))
    n = 1 if c.train.launcher == "jit" else (c.train.num_devices or len(devices))
    return devices[:n]


def total_steps(c: config_lib.Config, num_train: int) -> int:
    if c.train.total_steps is not None:
        return c.train.total_steps
    return max(1, math.ceil(c.train.num_epochs * num_train / c.train.global_batch_size))


def build(c: config_lib.Config, ds, steps: int, devices: list, table_rows: int | None = None):
    """Model, optimizers, launcher and a fresh (host-side) state.

    `table_rows` (benchmarks only) gives every ID table at least that many rows, beyond the vocabulary.
    """
    model = TwoTower(c.model, ds.user_feature_specs, ds.item_feature_specs, rngs=nnx.Rngs(c.seed))
    graphdef, _ = nnx.split(model)
    dense_tx = dense_optimizer(c, steps)
    sizes = table_sizes(c, ds.num_users, ds.num_items)
    if table_rows:
        sizes = {name: max(rows, table_rows) for name, rows in sizes.items()}
    sparse_opts = {name: make_sparse_optimizer(c.optimizer.sparse.name,
                                               learning_rate=c.optimizer.sparse.learning_rate)
                   for name in sizes}
    step_cfg = StepConfig(
        temperature=c.loss.temperature, global_batch=c.train.global_batch_size,
        global_negatives=c.loss.num_negatives, num_items=ds.num_items, logq_correction=c.loss.logq_correction,
        remove_accidental_hits=c.loss.remove_accidental_hits, embedding_l2=c.loss.embedding_l2,
        use_user_table="user" in sizes, use_item_table="item" in sizes, use_history=c.model.user.use_history)
    step_fn = make_step(graphdef=graphdef, cfg=step_cfg, dense_tx=dense_tx, sparse_opts=sparse_opts)
    launcher = Launcher(c.train.launcher, step_fn, devices)
    state = init_state(c, model, sizes, dense_tx, sparse_opts, c.seed)
    return model, graphdef, launcher, state, step_cfg


def restore_or_init(ckpt: Checkpointer, state: dict, batches: Batches, resume: bool) -> dict:
    if not resume:
        return state
    restored = ckpt.restore_latest(abstract_state(state))
    if restored is None:
        return state
    step, state, extra = restored
    batches.restore(extra["data"])
    log.info("resumed from %s at step %d", ckpt.directory, step)
    return state


def write_untrained_run(c: config_lib.Config, run_dir: str | pathlib.Path, *, step: int = 0):
    """A run directory whose checkpoint at `step` holds the freshly initialised state, without training.

    For export/serving tests and benchmarks, and as an untrained baseline for `python -m eval`.
    Returns (dataset, model, state).
    """
    run_dir = pathlib.Path(run_dir).absolute()
    ds = load_data(c)
    save_artifacts(run_dir, c, ds)
    model, _, _, state, _ = build(c, ds, max(step, 1), select_devices(c))
    ckpt = Checkpointer(run_dir / "ckpt", every_steps=1, max_to_keep=1, async_save=False)
    ckpt.save(step, state, {"data": {}}, force=True)
    ckpt.close()
    return ds, model, state


# ---------------------------------------------------------------- loop
def _summarise(window: list[dict], step: int, seconds: float, batch: int) -> dict:
    sums = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(window))
    count = max(sums.pop("count"), 1.0)
    out = {"train/loss": sums.pop("loss_sum") / count,
           "train/grad_norm": math.sqrt(sums.pop("grad_norm_sq") / len(window))}
    out.update({f"train/{k.removesuffix('_sum')}": v / count for k, v in sums.items()})
    out["train/steps_per_sec"] = len(window) / max(seconds, 1e-9)
    out["train/examples_per_sec"] = out["train/steps_per_sec"] * batch
    if not all(math.isfinite(v) for v in out.values()):
        raise TrainingDiverged(f"non-finite metrics in steps {step - len(window) + 1}..{step}: {out}")
    return out


def train_loop(c, launcher, dev_state, batches, ckpt, writer, start: int, steps: int, step_cfg):
    use = dict(use_user_table=step_cfg.use_user_table, use_item_table=step_cfg.use_item_table,
               use_history=step_cfg.use_history)

    def source():
        while True:
            b = next(batches)
            yield b, batches.state()

    feed = Prefetcher(source(), lambda bs: (prepare(bs[0], **use), bs[1]), depth=c.train.prefetch)
    bar = None
    if c.train.progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True)
    window, t_window, last = [], time.perf_counter(), {}
    try:
        for step in range(start + 1, steps + 1):
            (local, shared), data_pos = next(feed)
            dev_state, metrics = launcher(dev_state, *launcher.put_batch(local, shared))
            window.append(metrics)
            if step % c.train.log_every_steps == 0 or step == steps:
                last = _summarise(window, step, time.perf_counter() - t_window, c.train.global_batch_size)
                writer.write(step, last)
                window, t_window = [], time.perf_counter()
                if bar is not None:
                    bar.set_postfix(loss=f"{last['train/loss']:.4f}",
                                    ex_s=f"{last['train/examples_per_sec']:,.0f}")
            if step % c.checkpoint.every_steps == 0 or step == steps:
                ckpt.save(step, launcher.get_state(dev_state), {"data": data_pos}, force=True)
            if bar is not None:
                bar.update(1)
    finally:
        feed.close()
        if bar is not None:
            bar.close()
    return dev_state, last


# ---------------------------------------------------------------- entry point
def run(cfg, run_dir: str | pathlib.Path) -> dict:
    """Trains (resuming if the run dir has a checkpoint), evaluates, and returns the final metrics."""
    c = cfg if isinstance(cfg, config_lib.Config) else config_lib.validate(cfg)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    run_dir = pathlib.Path(run_dir).absolute()
    devices = select_devices(c)
    ds = load_data(c)
    save_artifacts(run_dir, c, ds)
    steps = total_steps(c, len(ds.train))
    model, graphdef, launcher, state, step_cfg = build(c, ds, steps, devices)
    batches = Batches(ds, batch_size=c.train.global_batch_size, num_negatives=c.loss.num_negatives,
                      history_len=c.data.history_len if c.model.user.use_history else 0,
                      history_mode=c.data.history_mode, seed=c.seed)
    ckpt = Checkpointer(run_dir / "ckpt", every_steps=c.checkpoint.every_steps,
                        max_to_keep=c.checkpoint.max_to_keep, async_save=c.checkpoint.async_save)
    state = restore_or_init(ckpt, state, batches, c.checkpoint.resume)
    start = int(jax.device_get(state["step"]))
    log.info("training %d steps (from step %d) on %d %s device(s) with %s, global batch %d", steps, start,
             len(devices), devices[0].platform, c.train.launcher, c.train.global_batch_size)
    writer = MetricWriter(run_dir)
    dev_state = launcher.put_state(state)
    del state
    last = {}
    try:
        if start < steps:
            dev_state, last = train_loop(c, launcher, dev_state, batches, ckpt, writer, start, steps, step_cfg)
    finally:
        ckpt.close()
    state = launcher.get_state(dev_state)
    result = {"steps": steps, "train": last}
    if c.eval.at_end:
        result["eval"] = final_eval(c, model, graphdef, state, ds)
        writer.write(steps, {f"eval/{name}/{k}": v for name in ("model", "most_popular")
                             for k, v in result["eval"][name].items()})
        (run_dir / "final_metrics.json").write_text(json.dumps(result, indent=2))
        print_report(result["eval"], c.eval.ks)
    writer.close()
    return result


def final_eval(c, model, graphdef, state, ds) -> dict:
    from eval.holdout import evaluate, heldout_users, model_embeddings

    users = heldout_users(ds, max_users=c.eval.max_users, seed=c.eval.seed)
    parts = {"graphdef": graphdef, "params": state["params"], "tables": state["tables"], "model": model}
    user_emb, item_emb = model_embeddings(parts, ds, users, c.data.history_len)
    return evaluate(user_emb, item_emb, ds, users, list(c.eval.ks), user_block=c.eval.user_block,
                    item_block=c.eval.item_block)


def print_report(ev: dict, ks: list[int]) -> None:
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    print(f"\nheld-out evaluation over {ev['num_users']} users, all items ranked, training items excluded:")
    print(f"{'':14s}" + "".join(f"{n:>12s}" for n in names))
    for who in ("model", "most_popular"):
        print(f"{who:14s}" + "".join(f"{ev[who][n]:12.4f}" for n in names))
