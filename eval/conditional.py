"""Offline evaluation of conditional retrieval (`model.user.condition`): recall@k within each condition's items.

The protocol. Every held-out user u and every value c of the condition feature that one of u's held-out items
has is one query (u, c); its truth is u's held-out items with value c, its candidates are the items with value c
(u's excluded items, as in the main evaluation, removed). Two rankings of the same candidates are scored:

- `conditional`: the user tower fed condition c, searched exactly over the items with value c (what the server's
  filtered search returns when it is exact);
- `post_filter`: an unconditioned user embedding (the same tower fed 'no condition', or another model's, given as
  `baseline_user_emb`) ranked over all items, keeping only the items with value c: the exact top-k of the
  filtered list, i.e. post-filtering with unbounded over-fetch, the best a post-filter can do.

Metrics are means over the (u, c) queries, overall, per value, and for the long tail: the values whose items hold
fewer training interactions than the median value's (the half of the values users engage with least).
"""
from __future__ import annotations

import time

import numpy as np

from data.types import PAD
from eval.holdout import heldout
from eval.metrics import per_user_metrics
from towers.inference.filtered import ConditionLists
from towers.inference.search import exact_topk_host


def condition_queries(ds, users: np.ndarray, name: str, split: str = "test") -> dict:
    """The (user, value) queries of `users` and their truth.

    Returns:
      {"user": int32[P] positions into `users`, "value": int32[P], "truth_indptr", "truth_items": CSR of each
      query's held-out items with that value}; queries sorted by value, then user.
    """
    held = heldout(ds, users, split)
    ind, items = held["truth_indptr"], held["truth_items"]
    values = np.asarray(ds.item_features[name])
    values = values[:, None] if values.ndim == 1 else values
    owner = np.repeat(np.arange(len(users)), np.diff(ind))
    pair_user = np.repeat(owner, values.shape[1])
    pair_item = np.repeat(items, values.shape[1])
    pair_value = values[items].reshape(-1)
    keep = pair_value >= 0
    pair_user, pair_item, pair_value = pair_user[keep], pair_item[keep], pair_value[keep]
    order = np.lexsort((pair_item, pair_user, pair_value))
    pair_user, pair_item, pair_value = pair_user[order], pair_item[order], pair_value[order]
    key = pair_value.astype(np.int64) * (len(users) + 1) + pair_user
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    indptr = np.r_[first, len(key)].astype(np.int64)
    # a repeated held-out item counts once (the truth of the main evaluation is already de-duplicated)
    return {"user": pair_user[first].astype(np.int32), "value": pair_value[first].astype(np.int32),
            "truth_indptr": indptr, "truth_items": pair_item, "held": held}


def _search_within(queries: np.ndarray, item_emb: np.ndarray, cand: np.ndarray, users: np.ndarray, held: dict,
                   k: int) -> np.ndarray:
    """int64[Q, k] exact top-k item rows among `cand` for each query (user position `users`), the user's
    excluded items removed; PAD past the eligible items."""
    local = np.full(item_emb.shape[0], -1, np.int64)
    local[cand] = np.arange(len(cand))
    ex_ind, ex_items = held["ex_indptr"], held["ex_items"]
    rows = [local[ex_items[ex_ind[u]:ex_ind[u + 1]]] for u in users]
    rows = [r[r >= 0] for r in rows]
    indptr = np.r_[0, np.cumsum([len(r) for r in rows])].astype(np.int64)
    ex = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    kk = min(k, len(cand))
    _, ids = exact_topk_host(np.ascontiguousarray(queries, np.float32), item_emb[cand], kk, indptr, ex)
    out = np.full((len(queries), k), PAD, np.int64)
    out[:, :kk] = np.where(ids >= 0, cand[np.maximum(ids, 0)], PAD)
    return out


def _first_within(ranked: np.ndarray, member: np.ndarray, k: int) -> np.ndarray:
    """int64[Q, k]: the first k entries of each ranked row that `member` (bool[N]) holds, PAD past them."""
    ok = member[np.maximum(ranked, 0)] & (ranked >= 0)
    pick = np.argsort(~ok, axis=1, kind="stable")[:, :k]
    out = np.where(np.take_along_axis(ok, pick, axis=1), np.take_along_axis(ranked, pick, axis=1), PAD)
    if out.shape[1] < k:
        out = np.concatenate([out, np.full((len(out), k - out.shape[1]), PAD, out.dtype)], axis=1)
    return out


def evaluate_conditional(embed_users_fn, item_emb: np.ndarray, ds, users: np.ndarray, name: str, ks: list[int], *,
                         split: str = "test", baseline_user_emb: np.ndarray | None = None,
                         post_filter_depths: tuple[int, ...] = ()) -> dict:
    """Recall and NDCG within each condition value's items, conditioned vs unconditioned + post-filter.

    Args:
      embed_users_fn: (user rows int[Q], condition codes int[Q] or None) -> float32[Q, d]: the conditional
        user tower (e.g. `towers.inference.embed.embed_users(trained, ds, rows, condition=codes)`).
      item_emb: float32[N, d] every item's embedding.
      users: int[U] held-out users (`eval.holdout.heldout_users`).
      name: the condition feature (an item feature).
      baseline_user_emb: float32[U, d] the post-filter baseline's unconditioned embeddings of `users` (e.g. a
        model trained without a condition); None = the conditional tower fed 'no condition'.
      post_filter_depths: also score post-filtering as a search without filters serves it: the unconditioned
        top-D of all items (exact, exclusions applied), filtered to the value, first k kept (fewer when the top-D
        holds fewer of the value's items), as `post_filter@D`.
    Returns:
      {"conditional": {"recall@k": ...}, "post_filter": {...}, "tail": {same two, over the long-tail values},
       "per_value": [{"value", "items", "train_interactions", "queries", "conditional", "post_filter"}],
       "tail_values": [...], "num_queries": P, "seconds": t}
    """
    t0 = time.perf_counter()
    kmax = max(ks)
    q = condition_queries(ds, users, name, split)
    held = q["held"]
    rows = np.asarray(users, np.int32)[q["user"]]
    cond_emb = np.asarray(embed_users_fn(rows, q["value"]), np.float32)
    base_users = np.asarray(embed_users_fn(np.asarray(users, np.int32), None) if baseline_user_emb is None
                            else baseline_user_emb, np.float32)   # [U, d], unconditioned
    base = base_users[q["user"]]
    item_emb = np.asarray(item_emb, np.float32)
    spec = next(s for s in ds.item_feature_specs if s.name == name)
    lists = ConditionLists(ds.item_features[name], spec.size, item_emb)   # value -> its items, ascending
    cand_of = [lists.items(v) for v in range(spec.size)]
    ranked = {"conditional": np.full((len(rows), kmax), PAD, np.int64),
              "post_filter": np.full((len(rows), kmax), PAD, np.int64)}
    values = np.unique(q["value"])
    depth_ranked = {}
    for depth in post_filter_depths:
        everything = np.arange(item_emb.shape[0])
        depth_ranked[depth] = _search_within(base_users, item_emb, everything, np.arange(len(users)), held,
                                             min(depth, item_emb.shape[0]))
        ranked[f"post_filter@{depth}"] = np.full((len(rows), kmax), PAD, np.int64)
    for v in values:
        sel = np.flatnonzero(q["value"] == v)
        for method, emb in (("conditional", cond_emb), ("post_filter", base)):
            ranked[method][sel] = _search_within(emb[sel], item_emb, cand_of[v], q["user"][sel], held, kmax)
        member = np.zeros(item_emb.shape[0], bool)
        member[cand_of[v]] = True
        for depth, top in depth_ranked.items():
            ranked[f"post_filter@{depth}"][sel] = _first_within(top[q["user"][sel]], member, kmax)
    per = {m: per_user_metrics(r, q["truth_indptr"], q["truth_items"], ks) for m, r in ranked.items()}
    counts = ds.item_counts()
    train_of = np.array([int(counts[c].sum()) for c in cand_of], np.int64)
    present = train_of[values]
    tail = values[present < np.median(present)]
    in_tail = np.isin(q["value"], tail)

    def means(mask):
        return {m: {key: float(np.mean(arr[mask])) if mask.any() else float("nan") for key, arr in p.items()}
                for m, p in per.items()}

    vocab = getattr(ds, "feature_vocabs", {}).get(name)
    per_value = []
    for v in values:
        mask = q["value"] == v
        label = vocab.raw_ids[v].item() if vocab is not None and v < len(vocab) else int(v)
        per_value.append({"value": label, "code": int(v),
                          "items": int(len(cand_of[v])), "train_interactions": int(train_of[v]),
                          "queries": int(mask.sum()), **means(mask)})
    return {**means(np.ones(len(rows), bool)), "tail": means(in_tail), "per_value": per_value,
            "tail_values": [int(v) for v in tail], "num_queries": int(len(rows)),
            "seconds": round(time.perf_counter() - t0, 3)}
