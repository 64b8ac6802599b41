"""Step time and memory of training with large ID tables: 1e5, 1e6 and 1e7 rows per table (dim 128, both
towers), tables replicated on one device or split by rows over 4 devices (fake CPU devices on a CPU host).

Each case runs in its own process (so its peak RSS is its own): large_id_emb's towers and batch on 100k users x
100k items, whose ids are hashed into tables of the given size (so touched rows spread over the whole table).
Reported: median and minimum step time of the real step (after compilation and warm-up; batches prepared
beforehand) and their ratios to the smallest table's (the minimum is the robust one on a machine shared with
other jobs), the ID-table bytes each device holds, XLA's per-device argument and temporary bytes for the
compiled step, and the process's peak RSS.

  python scripts/bench_embeddings.py                          # every case, table on stdout
  python scripts/bench_embeddings.py --rows 1e5 1e6 --layouts sharded --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"replicated": (1, ["train.launcher=jit", "train.num_devices=1"]),
           "replicated_pmap": (1, ["train.launcher=pmap"]),
           "sharded": (4, ["train.launcher=shard_map", "mesh=sharded"]),
           "sharded_jit": (4, ["train.launcher=jit", "mesh=sharded"])}   # GSPMD partitions the same step


def run_case(rows: int, layout: str, steps: int, warmup: int) -> dict:
    """Times one case in this process (the child side)."""
    import resource
    import statistics

    import numpy as np
    sys.path.insert(0, REPO)
    from tests.helpers import compose_cfg
    from train.config import validate
    from train.input import prepare
    from train.loop import build, id_row_maps, load_data, make_batches, prepare_kwargs, select_devices
    from train.mesh import table_bytes_per_device

    from bench_train import time_steps   # this script's directory is on sys.path

    c = validate(compose_cfg("+experiment=large_id_emb", "data.num_users=100000", "data.num_items=100000",
                             "data.num_clusters=2000", f"model.user.table.hash_buckets={rows}",
                             f"model.item.table.hash_buckets={rows}", *LAYOUTS[layout][1]))
    ds = load_data(c)
    maps = id_row_maps(c, ds)
    _, _, launcher, state, sc = build(c, ds, steps + warmup, select_devices(c))
    batches = make_batches(c, ds, seed=0)
    use = prepare_kwargs(sc)
    prepared = [prepare(next(batches), **use, row_maps=maps) for _ in range(min(steps + warmup, 32))]
    mem = launcher._fn.lower(state, *launcher.put_batch(*prepared[0])).compile().memory_analysis()
    state, times = time_steps(launcher, state, prepared, steps, warmup)
    return {"rows": rows, "layout": layout, "devices": launcher.n, "step_ms": statistics.median(times) * 1e3,
            "step_min_ms": min(times) * 1e3,
            "table_gb_per_device": sum(table_bytes_per_device(state["tables"]).values()) / 1e9,
            "step_args_gb_per_device": mem.argument_size_in_bytes / 1e9,
            "step_temp_gb_per_device": mem.temp_size_in_bytes / 1e9,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "unique_item_rows": int(np.mean([p[1]["item_valid"].sum() for p in prepared]))}


def spawn(rows: int, layout: str, steps: int, warmup: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={LAYOUTS[layout][0]}")
    cmd = [sys.executable, __file__, "--child", str(rows), layout, "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        return {"rows": rows, "layout": layout, "error": out.stderr.strip().splitlines()[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["replicated", "sharded"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--child", nargs=2, metavar=("ROWS", "LAYOUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_case(int(args.child[0]), args.child[1], args.steps, args.warmup)))
        return
    print(f"# {platform.node()}, {os.cpu_count()} cpus, {time.strftime('%Y-%m-%d %H:%M')}; replicated = 1 device, "
          "sharded = 4 devices (fake CPU devices on a CPU host)", flush=True)
    results = []
    for layout in args.layouts:
        base = None
        for rows in (int(r) for r in args.rows):
            r = spawn(rows, layout, args.steps, args.warmup)
            base = base or r
            if "step_ms" in r:
                r["ratio_to_smallest"] = r["step_ms"] / base["step_ms"]
                r["min_ratio_to_smallest"] = r["step_min_ms"] / base["step_min_ms"]
            results.append(r)
            print(json.dumps(r), flush=True)
    print("| layout | rows per table | step ms median (x smallest) | step ms min (x smallest) | tables GB / device "
          "| step args GB / device | step temp GB / device | peak RSS GB |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['layout']} | {r['rows']:,} | failed: {r['error']} |||||||")
            continue
        print(f"| {r['layout']} ({r['devices']} dev) | {r['rows']:,} | {r['step_ms']:.0f} ({r['ratio_to_smallest']:.2f}) "
              f"| {r['step_min_ms']:.0f} ({r['min_ratio_to_smallest']:.2f}) | {r['table_gb_per_device']:.3f} | "
              f"{r['step_args_gb_per_device']:.3f} | {r['step_temp_gb_per_device']:.3f} | {r['peak_rss_gb']:.2f} |")


if __name__ == "__main__":
    main()
