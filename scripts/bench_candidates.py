"""Batch-candidate search benchmark: users/s of the top-100 unseen items over a synthetic 1M x 64 corpus, exact
(blocked JAX, `towers.inference.exact.exact_topk`) against the ScaNN index, and recall@100 of the ScaNN candidates against
the exact ones.

The corpus and queries are those of `scripts/bench_serve.py` (clustered unit vectors around 1,000 centres,
seed 0, the queries drawn with the corpus); the index is a `serve.scann_index.ScaNNIndex` as `python -m serve.export`
builds it (1,000 leaves), with the leaves searched swept. Each user has seen items (median 20, log-normal,
capped at 400), half of them among the user's nearest items, so excluding them changes the top-100 and long
histories take the widened-fetch and exact-fallback paths of `serve.candidates.search.topk_unseen`, the
function the command runs. Timings cover that function (search, seen-item filtering, tie ordering), not the
user tower or Parquet writing. Medians over --repeats runs; the first run of each setting is a warm-up.

  python scripts/bench_candidates.py                                # ~2-3 min on 2 cores
  python scripts/bench_candidates.py --leaves 5,10,40 --reorder 30 --users 50000
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def make_corpus(items: int, dim: int, users: int) -> tuple[np.ndarray, np.ndarray]:
    """(corpus float32[items, dim], user embeddings float32[users, dim]), drawn together as bench_serve does."""
    from tests.serve.test_index import clustered

    both = clustered(items + users, dim, np.random.default_rng(0), clusters=1000)
    return both[:items], both[items:]


def make_seen(near: np.ndarray, num_items: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Seen-item CSR: per user, half of a log-normal count (median 20, <= 400) from its nearest items `near`
    int[Q, M] and half uniform over the corpus. Returns (indptr int64[Q + 1], slots int64[nnz]), sorted rows."""
    from serve.candidates.search import seen_csr

    q, m = near.shape
    counts = np.minimum(400, np.round(rng.lognormal(np.log(20), 1.0, q))).astype(np.int64)
    rows = []
    for u in range(q):
        close = rng.choice(near[u], min(m, counts[u] // 2), replace=False)
        rows.append(np.concatenate([close, rng.integers(0, num_items, counts[u] - len(close))]))
    indptr = np.zeros(q + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=indptr[1:])
    return seen_csr([(indptr, np.concatenate(rows))], np.arange(q), np.arange(num_items, dtype=np.int64))


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median wall seconds, median CPU seconds of this process, over `repeats` runs after one warm-up run;
    the last result). CPU seconds show what the search costs when other jobs share the cores."""
    out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def recall(got: np.ndarray, want: np.ndarray) -> float:
    """Mean over users of |got ∩ want| / |want| (slots; -1 padding ignored)."""
    return float(np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max((w >= 0).sum(), 1)
                          for g, w in zip(got, want)]))


def main() -> None:
    from serve.candidates.search import Corpus, topk_unseen
    from towers.inference.search import default_overfetch
    from serve.scann_index import ScaNNIndex

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--users", type=int, default=20_000, help="users searched with ScaNN per timed run")
    p.add_argument("--exact-users", type=int, default=500, help="users searched exactly (and for recall)")
    p.add_argument("--leaves", default="5,10,20", help="comma-separated num_leaves_to_search to sweep")
    p.add_argument("--reorder", type=int, default=20, help="ScaNN reorder (scaled by fetch / 10 per search)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    load = os.getloadavg()
    t0 = time.perf_counter()
    items, queries = make_corpus(a.items, a.dim, a.users)
    index = ScaNNIndex(reorder=a.reorder).index(items, np.arange(a.items))
    build_s = time.perf_counter() - t0
    leaves = [int(x) for x in a.leaves.split(",")]
    exact, ann = Corpus(index, "exact"), Corpus(index, "index")
    ann.tune(leaves_to_search=40)
    _, near = index.search(queries, 200)           # each user's neighbourhood, for its seen items
    indptr, slots = make_seen(near, a.items, np.random.default_rng(1))
    overfetch = default_overfetch(np.diff(indptr))
    e = a.exact_users
    wall, cpu, (_, exact_ids, _) = timed(lambda: topk_unseen(exact, queries[:e], a.k, indptr[:e + 1],
                                                             slots[:indptr[e]]), a.repeats)
    report = {"items": a.items, "dim": a.dim, "k": a.k, "users": a.users, "exact_users": e, "reorder": a.reorder,
              "num_leaves": index.num_leaves, "overfetch": overfetch, "build_s": round(build_s, 1),
              "exact": {"seconds": round(wall, 2), "users_per_s": round(e / wall, 1),
                        "users_per_cpu_s": round(e / cpu, 1)}, "scann": []}
    for n in leaves:
        ann.tune(leaves_to_search=n)
        wall, cpu, (_, ids, stats) = timed(lambda: topk_unseen(ann, queries, a.k, indptr, slots,
                                                               overfetch=overfetch), a.repeats)
        row = {"leaves_to_search": n, "seconds": round(wall, 2), "users_per_s": round(a.users / wall, 1),
               "users_per_cpu_s": round(a.users / cpu, 1),
               "speedup_vs_exact": round((a.users / wall) / report["exact"]["users_per_s"], 1),
               f"recall@{a.k}": round(recall(ids[:e], exact_ids), 4), "widened": stats.widened,
               "exact_fallback": stats.exact_fallback}
        report["scann"].append(row)
        print(json.dumps(row), flush=True)
    report["load_before"], report["load_after"] = [round(x, 2) for x in load], [round(x, 2) for x in os.getloadavg()]
    report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
