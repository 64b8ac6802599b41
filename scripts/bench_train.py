"""Training throughput and the cost of large ID tables.

Prints, for each case, the median step time over timed steps (after compilation and warm-up), examples/s,
and for the table-size sweep the ratio of each step time to the smallest table's (the reference run, same
process, same batch). Input preparation (batching + de-duplication) is timed separately so it is clear
whether the step or the pipeline bounds throughput.

  python scripts/bench_train.py                       # all cases
  python scripts/bench_train.py --cases tables --rows 1e5 1e6 1e7
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_train.py --cases ml100k
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.helpers import compose_cfg  # noqa: E402
from train.config import validate  # noqa: E402
from train.input import prepare  # noqa: E402
from train.loop import build, load_data, make_batches, prepare_kwargs, select_devices  # noqa: E402


def scatter_rows(prepared: tuple[dict, dict], maps: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Moves each table's touched rows to random distinct rows of a larger table (an injective map), so a
    big-table run touches rows spread over the whole table, as real traffic does, on the same data."""
    local, shared = prepared
    shared = dict(shared)
    for name, row_map in maps.items():
        shared[f"{name}_uniq"] = row_map[shared[f"{name}_uniq"]].astype(np.int32)
    return local, shared


def time_steps(launcher, state, prepared: list, steps: int, warmup: int) -> tuple[object, list[float]]:
    """Runs `warmup + steps` training steps over the prepared batches (cycled); returns the final state and the
    wall seconds of each step after the warm-up (host-to-device transfer of the batch not included)."""
    times = []
    for i in range(steps + warmup):
        local, shared = launcher.put_batch(*prepared[i % len(prepared)])
        t0 = time.perf_counter()
        state, metrics = launcher(state, local, shared)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return state, times


EXTRA_OVERRIDES: list[str] = []   # --set: appended to every case


def time_training(overrides: list[str], steps: int, warmup: int, table_rows: int | None = None) -> dict:
    """Median step time of the real step (launcher, donation, prefetch-free) for a composed config."""
    c = validate(compose_cfg(*overrides, *EXTRA_OVERRIDES))
    ds = load_data(c)
    devices = select_devices(c)
    _, _, launcher, state, sc = build(c, ds, steps + warmup, devices, table_rows=table_rows)
    rng = np.random.default_rng(0)
    maps = {name: rng.choice(t.shape[0], size=n, replace=False)
            for name, t, n in [(k, v, ds.num_users if k == "user" else ds.num_items)
                               for k, v in state["tables"].items()]} if table_rows else {}
    batches = make_batches(c, ds, seed=0)
    use = prepare_kwargs(sc)
    prepared, input_times = [], []
    for _ in range(min(steps + warmup, 64)):
        t0 = time.perf_counter()
        prepared.append(scatter_rows(prepare(next(batches), **use), maps))
        input_times.append(time.perf_counter() - t0)
    dev_state = launcher.put_state(state)
    del state
    dev_state, step_times = time_steps(launcher, dev_state, prepared, steps, warmup)
    step = statistics.median(step_times)
    prep = statistics.median(input_times)
    b = c.train.global_batch_size
    # Peak resident memory of this process so far (it only grows: run one case alone to read its own peak).
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"step_ms": step * 1e3, "examples_per_s": b / step, "input_ms": prep * 1e3, "peak_rss_gb": peak_gb,
            "batch": b, "devices": len(devices), "rows": {"user": ds.num_users, "item": ds.num_items}}


def table_sweep(rows_list: list[int], steps: int, warmup: int) -> list[dict]:
    """Same model, data and batch (large_id_emb's towers on 100k users x 100k items), ID tables of growing size
    with the touched rows spread over the whole table: the step must not grow with the table."""
    out = []
    for rows in rows_list:
        r = time_training(["+experiment=large_id_emb", "data.num_users=100000", "data.num_items=100000",
                           "data.num_clusters=2000"], steps, warmup, table_rows=rows)
        r["table_rows"] = rows
        out.append(r)
        print(json.dumps(r), flush=True)
    base = out[0]["step_ms"]
    for r in out:
        r["ratio_to_smallest"] = r["step_ms"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["ml100k", "large_id_emb", "tables"],
                    choices=["ml100k", "ml100k_id", "ml100k_hist", "large_id_emb", "tables"])
    ap.add_argument("--rows", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides appended to every case (e.g. train.global_batch_size=16384 on a GPU)")
    args = ap.parse_args()
    EXTRA_OVERRIDES.extend(args.set)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, {time.strftime('%Y-%m-%d %H:%M')}")
    results = {}
    data_dir = os.environ.get("TWOTOWER_DATA_DIR")
    ml = ["+experiment=movielens", f"data.path={data_dir}/ml-100k", "train.global_batch_size=1024",
          "model.output_dim=64", "model.id_dim=64"]
    if "ml100k" in args.cases:
        results["ml100k"] = time_training(ml, args.steps, args.warmup)
        print("ml100k (id + history + side features, logQ, in-batch + 512 uniform negatives, batch 1024):",
              json.dumps(results["ml100k"]), flush=True)
    if "ml100k_id" in args.cases:
        results["ml100k_id"] = time_training(ml + ["model.user.use_history=false", "model.user.features=[]",
                                                   "model.item.features=[]", "loss.num_negatives=0"],
                                             args.steps, args.warmup)
        print("ml100k id-only towers (logQ, in-batch negatives, batch 1024):", json.dumps(results["ml100k_id"]))
    if "ml100k_hist" in args.cases:
        results["ml100k_hist"] = time_training(ml + ["model.user.features=[]", "model.item.features=[]",
                                                     "loss.num_negatives=0"], args.steps, args.warmup)
        print("ml100k user-id + mean-of-50-history towers (logQ, in-batch negatives, batch 1024):",
              json.dumps(results["ml100k_hist"]), flush=True)
    if "large_id_emb" in args.cases:
        results["large_id_emb"] = time_training(["+experiment=large_id_emb"], args.steps, args.warmup)
        print("large_id_emb:", json.dumps(results["large_id_emb"]), flush=True)
    if "tables" in args.cases:
        results["tables"] = table_sweep([int(r) for r in args.rows], args.steps, args.warmup)
        print("table sweep (step ms, ratio to smallest):")
        for r in results["tables"]:
            print(f"  {r['table_rows']:>12,d} rows: {r['step_ms']:8.1f} ms  x{r['ratio_to_smallest']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
