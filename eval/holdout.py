"""Held-out evaluation of a trained model on a `data.types.Dataset`: embed the held-out users and every item,
rank the full corpus exactly, and score recall@k / ndcg@k next to a most-popular baseline ranked the same way.
Used at the end of training and by `python -m eval`.

The protocol is the dataset's (`Dataset.seen_splits`, `seen_csr`, `heldout_csr`) and `heldout` hands it to
every ranking: a user's training items are excluded (and validation items too when ranking for test), and the
truth is the held-out items that were not excluded; `protocol` counts the repeats this drops."""
from __future__ import annotations

import time

import numpy as np

from data.types import sub_csr
from eval.baselines import most_popular_topk
from eval.metrics import diversity_metrics, evaluate_rankings
from towers.inference.embed import embed_items, embed_users
from towers.inference.exact import exact_topk
from towers.inference.multi import multi_interest_topk


def heldout_users(ds, split: str = "test", max_users: int | None = None, seed: int = 0) -> np.ndarray:
    """Users with at least one held-out item (`Dataset.heldout_csr`: repeats of excluded items do not count),
    optionally a seeded sample of `max_users` of them (sorted)."""
    indptr, _ = ds.heldout_csr(split)
    users = np.flatnonzero(np.diff(indptr) > 0).astype(np.int32)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False)).astype(np.int32)
    return users


def heldout(ds, users: np.ndarray, split: str = "test") -> dict:
    """What every ranking of `users` for `split` is scored against, as CSRs whose rows align with `users`.

    Returns:
      {"ex_indptr", "ex_items"}: the items to exclude (`Dataset.seen_csr`); {"truth_indptr", "truth_items"}:
      the held-out items (`Dataset.heldout_csr`); "train_lengths": int64[Q] training interactions per user.
    """
    ex_indptr, ex_items = sub_csr(*ds.seen_csr(split), users)
    truth_indptr, truth_items = sub_csr(*ds.heldout_csr(split), users)
    return {"ex_indptr": ex_indptr, "ex_items": ex_items, "truth_indptr": truth_indptr,
            "truth_items": truth_items, "train_lengths": np.diff(ds.train_csr()[0])[users]}


def protocol(ds, split: str = "test") -> dict:
    """How `split` is scored, for the metrics output: the excluded splits, the split's rows, and the rows and
    users dropped from the truth because they only repeat excluded items."""
    indptr, _ = ds.split_csr(split)
    truth_indptr, _ = ds.heldout_csr(split)
    lost = (np.diff(indptr) > 0) & (np.diff(truth_indptr) == 0)
    return {"split": split, "excluded_splits": ds.seen_splits(split), "heldout_rows": int(indptr[-1]),
            "repeat_rows_dropped": int(indptr[-1] - truth_indptr[-1]), "users_dropped": int(lost.sum())}


def model_embeddings(trained, ds, users: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(user embeddings [Q, d] (or [Q, K, d] for users with K embeddings), item embeddings [N, d]) for `users` and every item of `ds`, by the inference
    layer's recipe (`towers.inference.embed`), the one export, trending, the server and candidates follow.

    trained: a `towers.restore.TrainedModel`, or `towers.inference.embed.Towers` during training.
    """
    return embed_users(trained, ds, users, history_len=history_len), embed_items(trained, ds)


def evaluate(user_emb: np.ndarray, item_emb: np.ndarray, ds, users: np.ndarray, ks: list[int], *,
             split: str = "test", user_block: int = 1024, item_block: int = 65536,
             baselines: bool = True, diversity: bool | None = None, item_categories=None) -> dict:
    """Exact full-corpus metrics of the model (and of most-popular) on the held-out items of `users`.

    Users with K embeddings (`user_emb` [Q, K, d], `model.user.num_embeddings`) get each active embedding's
    exact top-k merged round-robin (`towers.inference.multi`), as they are served.

    Args:
      diversity: add the model's beyond-accuracy metrics at the largest k (`eval.metrics.diversity_metrics`:
        catalogue coverage, mean pairwise cosine distance of the top-k and, with `item_categories`, distinct
        categories per list); None = only for users with K embeddings.
      item_categories: optional int[N] or int[N, L] (-1 padded) category ids of each item (e.g. genres).

    Returns {"model": {"recall@10": ...}, "most_popular": {...}, "num_users": Q, "protocol": {...}, "seconds": t}.
    """
    t0 = time.perf_counter()
    kmax = max(ks)
    held = heldout(ds, users, split)
    ex = {"exclude_indptr": held["ex_indptr"], "exclude_items": held["ex_items"]}
    truth = (held["truth_indptr"], held["truth_items"])
    multi = np.ndim(user_emb) == 3
    if multi:
        ranked = multi_interest_topk(user_emb, item_emb, kmax, exact_topk, **ex, user_block=user_block,
                                     item_block=item_block)
    else:
        _, ranked = exact_topk(user_emb, item_emb, kmax, **ex, user_block=user_block, item_block=item_block)
    out = {"model": evaluate_rankings(np.asarray(ranked), *truth, ks)}
    if multi if diversity is None else diversity:
        out["model"].update(diversity_metrics(np.asarray(ranked), np.asarray(item_emb), kmax, item_categories))
    if baselines:
        pop = most_popular_topk(ds.item_counts(), np.arange(len(users)), kmax, **ex)
        out["most_popular"] = evaluate_rankings(pop, *truth, ks)
    out["num_users"] = int(len(users))
    out["protocol"] = protocol(ds, split)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
