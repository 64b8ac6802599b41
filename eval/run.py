"""One offline evaluation run: restore a trained model, reload its data, rank, score, and write the report.

`run(c)` is what `python -m eval` calls; `evaluate_embeddings` is the part with no files (tests call it with
hand-made embeddings). Every method is scored on the same users, held-out items and exclusions with the same
metric code; `eval.holdout.heldout` gives them (the dataset's protocol: each user's training items are excluded,
and validation items too when ranking for test; held-out items repeating an excluded item are not truth):

- ``model``: exact full-corpus top-k of the two-tower embeddings (``towers.inference.exact.exact_topk``);
- ``model_ann``: the same embeddings searched with ScaNN (``eval.ann``), with its overlap with the exact top-k;
- ``most_popular`` and ``ease`` baselines (``eval.baselines``, ``eval.ease``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
import time

import numpy as np

from eval.config import ConfigError, EvaluateConfig
from eval.metrics import coverage_at_k, evaluate_rankings

log = logging.getLogger("twotower.eval")


@contextlib.contextmanager
def phase(key: str, timing: dict, what: str | None = None):
    """Logs the start and duration of a phase (`what`, default `key`) and records its seconds in timing[key]."""
    log.info("eval: %s ...", what or key)
    t0 = time.perf_counter()
    yield
    timing[key] = round(time.perf_counter() - t0, 3)
    log.info("eval: %s done in %.1fs", what or key, timing[key])


# ---------------------------------------------------------------- loading
def load_run(c: EvaluateConfig, timing: dict):
    """(trained model, dataset, the data config used) for the run directory, with the data overrides applied.

    Raises:
      ConfigError: the run directory is not a training run, or the data does not match its vocabularies.
    """
    run_dir = pathlib.Path(c.run_dir).expanduser().absolute()
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "ckpt").is_dir():
        raise ConfigError(f"run_dir={c.run_dir!r}: not a training run directory (needs config.yaml and ckpt/, "
                          "as written by `python -m train hydra.run.dir=...`)")
    from data.errors import DataError
    from data.load import load as load_dataset
    from towers.inference.vocab import VocabularyMismatch, check_vocabularies
    from towers.restore import RestoreError, load_trained

    with phase("restore_model", timing, "restore the towers"):
        try:
            trained = load_trained(run_dir, c.step)
        except RestoreError as e:
            raise ConfigError(f"run_dir={c.run_dir!r}: {e}") from None
    data_cfg = {**trained.config["data"], **c.data}
    with phase("load_data", timing, "load the dataset"):
        try:
            ds = load_dataset(data_cfg)
        except DataError as e:
            raise ConfigError(f"data: {str(e).splitlines()[0]}") from None
    try:
        check_vocabularies(trained, ds)
    except VocabularyMismatch as e:
        raise ConfigError(f"{e}; evaluate on the data the run was trained on, or fix the data.* overrides") from None
    return trained, ds, data_cfg


# ---------------------------------------------------------------- ranking
def _rank_ann(user_emb, item_emb, held: dict, c: EvaluateConfig, kmax: int, timing: dict, notes: dict):
    from eval.ann import ann_topk, build_index
    with phase("ann_build", timing, "ScaNN index build"):
        settings = {k: v for k, v in dataclasses.asdict(c.ann).items() if k != "enabled"}
        index = build_index(item_emb, kmax, **settings)
    with phase("ann_search", timing, "ScaNN search"):
        ranked = ann_topk(index, user_emb, kmax, exclude_indptr=held["ex_indptr"], exclude_items=held["ex_items"])
    notes["ann"] = {"params": index.params}
    return ranked


def _rank_ease(ds, users: np.ndarray, held: dict, c: EvaluateConfig, kmax: int, timing: dict, notes: dict):
    from eval.ease import ease_topk, ease_weights
    n = ds.num_items
    if n > c.baselines.ease_max_items:
        notes["skipped"]["ease"] = (f"{n} items > baselines.ease_max_items={c.baselines.ease_max_items} "
                                    "(the N x N inverse is O(N^3); raise the limit to run it anyway)")
        log.info("eval: EASE skipped: %s", notes["skipped"]["ease"])
        return None
    train_indptr, train_items = ds.train_csr()
    with phase("ease_fit", timing, f"EASE fit ({n} items, lambda={c.baselines.ease_lambda:g})"):
        b = ease_weights(train_indptr, train_items, n, c.baselines.ease_lambda)
    with phase("ease_topk", timing, "EASE top-k"):
        return ease_topk(b, train_indptr, train_items, users, kmax, exclude_indptr=held["ex_indptr"],
                         exclude_items=held["ex_items"], user_block=c.user_block)


def rank_methods(user_emb, item_emb, ds, users: np.ndarray, held: dict, c: EvaluateConfig,
                 timing: dict) -> tuple[dict, dict]:
    """Ranked ids [Q, max(ks)] of every method, and notes (ANN settings, skipped methods)."""
    from eval.baselines import most_popular_topk
    from towers.inference.exact import exact_topk

    kmax = max(c.ks)
    notes = {"skipped": {}}
    rankings = {}
    with phase("exact_topk", timing, f"exact top-{kmax} over {ds.num_items} items for {len(users)} users"):
        _, ranked = exact_topk(user_emb, item_emb, kmax, exclude_indptr=held["ex_indptr"],
                               exclude_items=held["ex_items"], user_block=c.user_block, item_block=c.item_block)
        rankings["model"] = np.asarray(ranked)
    if c.ann.enabled:
        rankings["model_ann"] = _rank_ann(user_emb, item_emb, held, c, kmax, timing, notes)
    if c.baselines.most_popular:
        with phase("most_popular", timing, "most-popular baseline"):
            rankings["most_popular"] = most_popular_topk(ds.item_counts(), np.arange(len(users)), kmax,
                                                         exclude_indptr=held["ex_indptr"],
                                                         exclude_items=held["ex_items"])
    if c.baselines.ease:
        ranked = _rank_ease(ds, users, held, c, kmax, timing, notes)
        if ranked is not None:
            rankings["ease"] = ranked
    return rankings, notes


# ---------------------------------------------------------------- scoring
def score_rankings(rankings: dict, held: dict, ds, c: EvaluateConfig) -> dict:
    """Metrics, ANN overlap, coverage, popularity bias and segments of every ranking (numpy only)."""
    from eval.ann import overlap_at_k
    from eval.segments import item_segment_metrics, popularity_bias, user_segment_metrics

    truth = (held["truth_indptr"], held["truth_items"])
    out = {"methods": {name: evaluate_rankings(r, *truth, c.ks) for name, r in rankings.items()}}
    if "model_ann" in rankings:
        overlap = overlap_at_k(rankings["model_ann"], rankings["model"], c.ks)
        exact, ann = out["methods"]["model"], out["methods"]["model_ann"]
        out["ann"] = {**overlap, **{f"recall_loss@{k}": exact[f"recall@{k}"] - ann[f"recall@{k}"] for k in c.ks}}
    out["coverage"] = {name: {f"coverage@{k}": coverage_at_k(r, ds.num_items, k) for k in c.ks}
                       for name, r in rankings.items()}
    counts = ds.item_counts()
    out["popularity_bias"] = popularity_bias(rankings, held["truth_items"], counts, c.ks)
    segment_rankings = {k: v for k, v in rankings.items() if k != "model_ann"}
    out["segments"] = {
        "user_activity": user_segment_metrics(segment_rankings, *truth, c.ks, held["train_lengths"],
                                              c.segments.user_activity_edges),
        "item_popularity": item_segment_metrics(segment_rankings, *truth, c.ks, counts,
                                                c.segments.item_share_edges),
        "user_activity_edges": list(c.segments.user_activity_edges),
        "item_share_edges": list(c.segments.item_share_edges),
    }
    return out


def evaluate_embeddings(user_emb, item_emb, ds, users, c: EvaluateConfig, timing: dict | None = None) -> dict:
    """Ranks and scores every method for the given users' embeddings; no files are read or written.

    Args:
      user_emb: float[Q, D] embeddings of `users`.
      item_emb: float[N, D] embeddings of every item of `ds` (row n = item n).
      ds: the `data.types.Dataset` (`eval.holdout.heldout` gives the exclusions and the truth of `c.split`).
      users: int[Q] user rows, each with at least one held-out item.
      c: the eval config (ks, ann, baselines, segments, blocks).
      timing: optional dict that receives per-phase seconds.

    Returns:
      {"num_users", "ks", "protocol" (`eval.holdout.protocol`), "methods": {name: {"recall@k", "ndcg@k", ...}},
      "ann", "coverage", "popularity_bias", "segments", "skipped", "ann_params"}.
    """
    from eval.holdout import heldout, protocol

    timing = {} if timing is None else timing
    users = np.asarray(users, dtype=np.int32)
    held = heldout(ds, users, c.split)
    rankings, notes = rank_methods(user_emb, item_emb, ds, users, held, c, timing)
    with phase("metrics", timing, "metrics, coverage, popularity bias, segments"):
        out = score_rankings(rankings, held, ds, c)
    if "ann" in out:
        out["ann"] = {**notes["ann"], **out["ann"], "build_seconds": timing.get("ann_build"),
                      "search_seconds": timing.get("ann_search")}
    return {"num_users": int(users.size), "ks": list(c.ks), "protocol": protocol(ds, c.split), **out,
            "skipped": notes["skipped"]}


# ---------------------------------------------------------------- the whole run
def default_out_dir(c: EvaluateConfig, run_dir: pathlib.Path, step: int) -> pathlib.Path:
    """<run_dir>/eval/step_<N>, suffixed by the split (if not test) and a hash of data overrides / sampling."""
    name = f"step_{step}" + ("" if c.split == "test" else f"_{c.split}")
    variant = {"data": c.data, "max_users": c.max_users, "seed": c.seed} if (c.data or c.max_users) else None
    if variant:
        name += "_" + hashlib.sha256(json.dumps(variant, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return run_dir / "eval" / name


def run(c: EvaluateConfig) -> dict:
    """Evaluates a training run and writes metrics.json, report.md and plots; returns the metrics."""
    from eval.holdout import heldout_users, model_embeddings
    from eval.report import print_summary, write_outputs, write_plots

    t0 = time.perf_counter()
    timing: dict = {}
    trained, ds, data_cfg = load_run(c, timing)
    if c.split == "valid" and ds.valid is None:
        raise ConfigError("split='valid': the dataset has no validation split; set data.valid_fraction > 0 "
                          "(it must match the training run's) or use split=test")
    if max(c.ks) > ds.num_items:
        raise ConfigError(f"ks={list(c.ks)}: k larger than the corpus ({ds.num_items} items)")
    users = heldout_users(ds, c.split, c.max_users, c.seed)
    if users.size == 0:
        raise ConfigError(f"split={c.split!r}: no user has a held-out item; nothing to evaluate")
    with phase("embed", timing, f"embed {len(users)} users and {ds.num_items} items"):
        user_emb, item_emb = model_embeddings(trained, ds, users, int(data_cfg.get("history_len", 0)))
    metrics = evaluate_embeddings(user_emb, item_emb, ds, users, c, timing)
    out_dir = pathlib.Path(c.out_dir) if c.out_dir else default_out_dir(c, trained.run_dir, trained.step)
    metrics = {
        "run_dir": str(trained.run_dir), "out_dir": str(out_dir), "model_version": trained.model_version,
        "step": trained.step, "split": c.split, "data_overrides": dict(c.data), "max_users": c.max_users,
        "seed": c.seed, "dataset": {"name": ds.name, "num_users": ds.num_users, "num_items": ds.num_items,
                                    "num_train": len(ds.train), "num_heldout": int(ds.split_csr(c.split)[0][-1])},
        **metrics,
    }
    metrics["timing"] = timing
    with phase("plots", timing, f"plots into {out_dir}"):
        files = write_plots(metrics, out_dir) if c.plots else []
    timing["total"] = round(time.perf_counter() - t0, 3)
    metrics["files"] = ["metrics.json", "report.md"] + files
    write_outputs(metrics, out_dir)
    print_summary(metrics)
    return metrics
