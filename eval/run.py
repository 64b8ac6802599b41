"""One offline evaluation run: restore a trained model, reload its data, rank, score, and write the report.

`run(c)` is what `python -m eval` calls; `evaluate_embeddings` is the part with no files (tests call it with
hand-made embeddings). Every method is scored on the same users, held-out items and exclusions with the same
metric code; `eval.holdout.heldout` gives them (the dataset's protocol: each user's training items are excluded,
and validation items too when ranking for test; held-out items repeating an excluded item are not truth):

- ``model``: exact full-corpus top-k of the two-tower embeddings (``towers.inference.exact.exact_topk``);
- ``model_ann``: the same embeddings searched with ScaNN (``eval.ann``), with its overlap with the exact top-k;
- ``most_popular`` and ``ease`` baselines (``eval.baselines``, ``eval.ease``).

A run trained on a prepared dataset (``data.source: prepared``) is evaluated without its log in memory
(``evaluate_prepared``): the dataset is opened (``data.load.open_data``), and the held-out users (all of them, or
the ``max_users`` sample ``PreparedData.eval_users`` draws) are read, embedded and ranked ``chunk_users`` at a
time; only their rankings and held-out items are kept. Most-popular uses the whole train split's item counts,
and EASE its whole train matrix, whose Gram matrix XᵀX is summed over every user's records read chunk by chunk
(memory N², as in memory), so both give the numbers of the same run evaluated in memory.
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
    The dataset is a `data.types.Dataset`, or a `data.prepared.read.PreparedData` for a prepared one.

    Raises:
      ConfigError: the run directory is not a training run, or the data does not match its vocabularies.
    """
    run_dir = pathlib.Path(c.run_dir).expanduser().absolute()
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "ckpt").is_dir():
        raise ConfigError(f"run_dir={c.run_dir!r}: not a training run directory (needs config.yaml and ckpt/, "
                          "as written by `python -m train hydra.run.dir=...`)")
    from data.errors import DataError
    from data.load import open_data
    from towers.inference.vocab import VocabularyMismatch, check_vocabularies
    from towers.restore import RestoreError, load_trained

    with phase("restore_model", timing, "restore the towers"):
        try:
            trained = load_trained(run_dir, c.step)
        except RestoreError as e:
            raise ConfigError(f"run_dir={c.run_dir!r}: {e}") from None
    data_cfg = {**trained.config["data"], **c.data}
    with phase("load_data", timing, "load the dataset (a prepared one is opened: its records stay on disk)"):
        try:
            ds = open_data(data_cfg)
        except DataError as e:
            raise ConfigError(f"data: {str(e).splitlines()[0]}") from None
    try:
        check_vocabularies(trained, ds)
    except VocabularyMismatch as e:
        raise ConfigError(f"{e}; evaluate on the data the run was trained on, or fix the data.* overrides") from None
    return trained, ds, data_cfg


# ---------------------------------------------------------------- ranking
def fit_methods(item_emb, ds, c: EvaluateConfig, timing: dict, notes: dict, *, ease_gram=None) -> dict:
    """What the rankings share across users, built once: the ScaNN index ("ann") and the EASE matrix ("ease").

    Args:
      ease_gram: XᵀX of the whole train split (`eval.ease.gram_matrix`), or a callable returning it; None
        builds it from `ds.train_csr()`.
    Returns:
      {"ann": index, "ease": B}, with the methods that are off or skipped (noted in notes["skipped"]) left out.
    """
    fitted = {}
    if c.ann.enabled:
        from eval.ann import build_index
        with phase("ann_build", timing, "ScaNN index build"):
            settings = {k: v for k, v in dataclasses.asdict(c.ann).items() if k != "enabled"}
            fitted["ann"] = build_index(item_emb, max(c.ks), **settings)
        notes["ann"] = {"params": fitted["ann"].params}
    if c.baselines.ease:
        from eval.ease import ease_from_gram, gram_matrix
        n = ds.num_items
        if n > c.baselines.ease_max_items:
            notes["skipped"]["ease"] = (f"{n} items > baselines.ease_max_items={c.baselines.ease_max_items} "
                                        "(the N x N inverse is O(N^3); raise the limit to run it anyway)")
            log.info("eval: EASE skipped: %s", notes["skipped"]["ease"])
        else:
            with phase("ease_fit", timing, f"EASE fit ({n} items, lambda={c.baselines.ease_lambda:g})"):
                gram = ease_gram() if callable(ease_gram) else ease_gram
                gram = gram_matrix(*ds.train_csr(), n) if gram is None else gram
                fitted["ease"] = ease_from_gram(gram, c.baselines.ease_lambda)
    return fitted


def rank_methods(user_emb, item_emb, ds, users: np.ndarray, held: dict, c: EvaluateConfig,
                 timing: dict, fitted: dict | None = None) -> tuple[dict, dict]:
    """Ranked ids [Q, max(ks)] of every method, and notes (ANN settings, skipped methods).

    `fitted` (from `fit_methods`) reuses an index and EASE matrix across calls; None fits them here. EASE scores
    each user's training items as `ds.train_csr()` holds them (rows of `users`).
    """
    from eval.baselines import most_popular_topk
    from towers.inference.exact import exact_topk

    kmax = max(c.ks)
    notes = {"skipped": {}}
    if fitted is None:
        fitted = fit_methods(item_emb, ds, c, timing, notes)
    rankings = {}
    with phase("exact_topk", timing, f"exact top-{kmax} over {ds.num_items} items for {len(users)} users"):
        search = dict(exclude_indptr=held["ex_indptr"], exclude_items=held["ex_items"], user_block=c.user_block,
                      item_block=c.item_block)
        if np.ndim(user_emb) == 3:   # K embeddings per user: each searched, merged round-robin
            from towers.inference.multi import multi_interest_topk
            ranked = multi_interest_topk(user_emb, item_emb, kmax, exact_topk, **search)
        else:
            _, ranked = exact_topk(user_emb, item_emb, kmax, **search)
        rankings["model"] = np.asarray(ranked)
    if "ann" in fitted and np.ndim(user_emb) == 3:
        notes["skipped"]["ann"] = "users with several embeddings are ranked exactly only"
    elif "ann" in fitted:
        from eval.ann import ann_topk
        with phase("ann_search", timing, "ScaNN search"):
            rankings["model_ann"] = ann_topk(fitted["ann"], user_emb, kmax, exclude_indptr=held["ex_indptr"],
                                             exclude_items=held["ex_items"])
    if c.baselines.most_popular:
        with phase("most_popular", timing, "most-popular baseline"):
            rankings["most_popular"] = most_popular_topk(ds.item_counts(), np.arange(len(users)), kmax,
                                                         exclude_indptr=held["ex_indptr"],
                                                         exclude_items=held["ex_items"])
    if "ease" in fitted:
        from eval.ease import ease_topk
        train_indptr, train_items = ds.train_csr()
        with phase("ease_topk", timing, "EASE top-k"):
            rankings["ease"] = ease_topk(fitted["ease"], train_indptr, train_items, users, kmax,
                                         exclude_indptr=held["ex_indptr"], exclude_items=held["ex_items"],
                                         user_block=c.user_block)
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


def _concat_csr(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """One CSR of the rows of several, in order."""
    lengths = np.concatenate([np.diff(indptr) for indptr, _ in parts] or [np.zeros(0, np.int64)])
    indptr = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return indptr, np.concatenate([items for _, items in parts] or [np.zeros(0, np.int32)])


def _add_timing(total: dict, part: dict) -> None:
    for key, seconds in part.items():
        total[key] = round(total.get(key, 0.0) + seconds, 3)


def _streamed_gram(data, chunk_users: int):
    """XᵀX of the whole train split of a prepared dataset, summed over `chunk_users` users' records at a time."""
    from eval.ease import gram_matrix

    gram = None
    for _, indptr, items in data.train_chunks(chunk_users):
        part = gram_matrix(indptr, items, data.num_items)
        gram = part if gram is None else gram + part
    return gram


def _item_source(trained, data, chunk_users: int):
    """What `embed_items` reads of a prepared dataset: the dataset itself (vocabularies, features, item counts),
    unless the item tower pools each item's training audience, which needs the train split by item: then a
    `Dataset` of the train rows only (8 bytes a row; the valid and test rows are not kept)."""
    if not trained.model.item.use_history:
        return data
    from data.types import Interactions

    log.info("eval: the item tower pools its audience: reading the train split (%d rows) by item", len(data.train))
    users, items = [], []
    for rows, indptr, chunk_items in data.train_chunks(chunk_users):
        users.append(np.repeat(rows.astype(np.int32), np.diff(indptr)))
        items.append(chunk_items)
    ds = data.load_users(np.zeros(0, np.int64))
    train = Interactions(np.concatenate(users), np.concatenate(items))
    return ds.replace(train=train)


def evaluate_prepared(trained, data, c: EvaluateConfig, history_len: int, timing: dict | None = None) -> dict:
    """`evaluate_embeddings` of a prepared dataset, chunk by chunk, with the same output.

    The evaluated users are `data.eval_users(c.split, c.max_users, c.seed)` less those whose held-out items all
    repeat excluded ones (the users `heldout_users` keeps); `c.chunk_users` of them at a time are read
    (`PreparedData.load_users`), embedded and ranked, so memory grows with the chunk and with the rankings and
    held-out items kept (Q x max(ks) ids), not with the log. The protocol's repeat counts are those of the users
    read: every user with held-out rows, or with `max_users` the sampled ones (noted as "repeats_counted_over").

    Args:
      trained: a `towers.restore.TrainedModel`.
      data: the `data.prepared.read.PreparedData` it was trained on.
      c: the eval config.
      history_len: the run's data.history_len.
      timing: optional dict that receives per-phase seconds (summed over chunks).
    Returns:
      the dict `evaluate_embeddings` returns.
    Raises:
      ConfigError: no user has a held-out item.
    """
    from eval.holdout import heldout, heldout_users, protocol
    from towers.inference.embed import embed_items, embed_users

    timing = {} if timing is None else timing
    candidates = data.eval_users(c.split, c.max_users, c.seed)
    notes = {"skipped": {}}
    with phase("embed_items", timing, f"embed {data.num_items} items"):
        item_emb = embed_items(trained, _item_source(trained, data, c.chunk_users))
    fitted = fit_methods(item_emb, data, c, timing, notes,
                         ease_gram=lambda: _streamed_gram(data, c.chunk_users))
    users, rankings, truth, lengths = [], {}, [], []
    proto = {"split": c.split, "excluded_splits": None, "heldout_rows": int(data.split_rows(c.split).sum()),
             "repeat_rows_dropped": 0, "users_dropped": 0}
    chunk_timing: dict = {}
    for start in range(0, len(candidates), c.chunk_users):
        chunk = candidates[start:start + c.chunk_users]
        part_timing: dict = {}
        with phase("read_users", part_timing, f"read users {start}..{start + len(chunk)} of {len(candidates)}"):
            sub = data.load_users(chunk)
        p = protocol(sub, c.split)
        proto["excluded_splits"] = p["excluded_splits"]
        proto["repeat_rows_dropped"] += p["repeat_rows_dropped"]
        proto["users_dropped"] += p["users_dropped"]
        rows = heldout_users(sub, c.split)   # the chunk's users with a held-out item
        if rows.size:
            held = heldout(sub, rows, c.split)
            with phase("embed", part_timing, f"embed {len(rows)} users"):
                user_emb = embed_users(trained, sub, rows, history_len=history_len)
            # user_emb is [Q, D], or [Q, K, D] for users with K embeddings (merged per-interest lists, as in
            # memory); the methods a chunk skips are noted as `evaluate_embeddings` notes them.
            ranked, chunk_notes = rank_methods(user_emb, item_emb, sub, rows, held, c, part_timing, fitted)
            notes["skipped"].update(chunk_notes["skipped"])
            for name, r in ranked.items():
                rankings.setdefault(name, []).append(r)
            users.append(rows)
            truth.append((held["truth_indptr"], held["truth_items"]))
            lengths.append(held["train_lengths"])
        _add_timing(chunk_timing, part_timing)
        del sub
    timing.update(chunk_timing)
    users = np.concatenate(users) if users else np.zeros(0, np.int32)
    if users.size == 0:
        raise ConfigError(f"split={c.split!r}: no user has a held-out item; nothing to evaluate")
    if c.max_users is not None and len(candidates) < int((data.split_rows(c.split) > 0).sum()):
        proto["repeats_counted_over"] = f"the {len(candidates)} sampled users"
    truth_indptr, truth_items = _concat_csr(truth)
    held = {"truth_indptr": truth_indptr, "truth_items": truth_items, "train_lengths": np.concatenate(lengths)}
    rankings = {name: np.concatenate(parts) for name, parts in rankings.items()}
    with phase("metrics", timing, "metrics, coverage, popularity bias, segments"):
        out = score_rankings(rankings, held, data, c)
    if "ann" in out:
        out["ann"] = {**notes["ann"], **out["ann"], "build_seconds": timing.get("ann_build"),
                      "search_seconds": timing.get("ann_search")}
    return {"num_users": int(users.size), "ks": list(c.ks), "protocol": proto, **out, "skipped": notes["skipped"]}


def _heldout_rows(ds, split: str) -> int:
    if hasattr(ds, "split_rows"):   # a prepared dataset: from its counts
        return int(ds.split_rows(split).sum())
    return int(ds.split_csr(split)[0][-1])


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
    history_len = int(data_cfg.get("history_len", 0))
    if hasattr(ds, "eval_users"):   # a prepared dataset: users read, embedded and ranked chunk by chunk
        metrics = evaluate_prepared(trained, ds, c, history_len, timing)
    else:
        users = heldout_users(ds, c.split, c.max_users, c.seed)
        if users.size == 0:
            raise ConfigError(f"split={c.split!r}: no user has a held-out item; nothing to evaluate")
        with phase("embed", timing, f"embed {len(users)} users and {ds.num_items} items"):
            user_emb, item_emb = model_embeddings(trained, ds, users, history_len)
        metrics = evaluate_embeddings(user_emb, item_emb, ds, users, c, timing)
        condition = getattr(trained.model.user, "condition", None)
        if c.conditional and condition is not None:
            from eval.conditional import evaluate_conditional
            from towers.inference.embed import embed_users
            name = trained.config["model"]["user"]["condition"]
            with phase("conditional", timing, f"recall within each value of {name}"):
                metrics["conditional"] = evaluate_conditional(
                    lambda rows, codes: embed_users(trained, ds, rows, history_len=history_len, condition=codes),
                    item_emb, ds, users, name, c.ks, split=c.split)
    out_dir = pathlib.Path(c.out_dir) if c.out_dir else default_out_dir(c, trained.run_dir, trained.step)
    metrics = {
        "run_dir": str(trained.run_dir), "out_dir": str(out_dir), "model_version": trained.model_version,
        "step": trained.step, "split": c.split, "data_overrides": dict(c.data), "max_users": c.max_users,
        "seed": c.seed, "dataset": {"name": ds.name, "num_users": ds.num_users, "num_items": ds.num_items,
                                    "num_train": len(ds.train), "num_heldout": _heldout_rows(ds, c.split)},
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
