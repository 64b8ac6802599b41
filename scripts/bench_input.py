"""Input-pipeline throughput on a prepared dataset, against the training step's own throughput.

Measures, each as the median over `--repeats` wall-clock runs of `--steps` batches (examples/s):

  a. `Batches.batch_at` alone: record reads, histories, negatives (the data side);
  b. `batch_at` + `train.input.prepare` (the host-side de-duplication of ID rows the step needs);
  c. the whole `grain_feed` pipeline (threads=1, threads=2, workers=1, workers=2), consuming `--steps` batches
     after `--skip` start-up batches;
  d. the training step alone for the same batch shape (id-only towers that also pool the user's history;
     `--no-history-step` leaves the history out): the jitted step over prepared batches, each step waited for (`block_until_ready`), so the
     figure is execution, not dispatch.

Then the ratio input / step for each pipeline and the peak RSS of this process. Each repeat of (a) to (c) starts
at a different offset, so record reads are not served from a warm cache of the previous repeat's users alone.

  python scripts/bench_input.py --data /path/to/prepared [--batch-size 1024] [--history-len 50] \
      [--negatives 1024] [--steps 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.batching import Batches  # noqa: E402
from data.prepared.read import PreparedData  # noqa: E402
from train.input import grain_feed, prepare  # noqa: E402


def peak_rss_gb(who=resource.RUSAGE_SELF) -> float:
    """Peak resident memory so far (Linux reports KiB), in GB: of this process, or with RUSAGE_CHILDREN of its
    largest finished child (Grain's worker processes)."""
    return resource.getrusage(who).ru_maxrss * 1024 / 1e9


def median_rate(fn, batch: int, steps: int, repeats: int) -> dict:
    """Runs `fn(repeat)` (which processes `steps` batches) `repeats` times; median examples/s over the runs."""
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(r)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return {"examples_per_s": statistics.median(rates), "runs": [round(x) for x in rates]}


def bench_data_side(batches: Batches, use: dict, steps: int, repeats: int) -> dict:
    """(a) `batch_at` alone and (b) `batch_at` + `prepare`, each from a fresh offset per repeat."""
    b = batches.batch_size
    base = lambda r, k: ((2 * r) * steps + k) * b   # noqa: E731 - (a) and (b) read different batches

    def batch_only(r):
        for k in range(steps):
            batches.batch_at(base(r, k))

    def with_prepare(r):
        for k in range(steps):
            prepare(batches.batch_at(base(r, k) + steps * b), **use)

    return {"batch_at": median_rate(batch_only, b, steps, repeats),
            "batch_at+prepare": median_rate(with_prepare, b, steps, repeats)}


def bench_feed(batches: Batches, use: dict, steps: int, repeats: int, skip: int, depth: int, threads: int,
               workers: int, first_offset: int) -> dict:
    """(c) the `grain_feed` pipeline: `skip` start-up batches, then `steps` timed ones, per repeat."""
    rates = []
    for r in range(repeats):
        batches.restore({"epoch": 0, "position": (first_offset + r * (steps + skip) * batches.batch_size)
                         % batches.examples_per_epoch})
        feed = grain_feed(batches, functools.partial(prepare, **use), depth=depth, threads=threads, workers=workers)
        try:
            for _ in range(skip):
                next(feed)
            t0 = time.perf_counter()
            for _ in range(steps):
                next(feed)
            rates.append(steps * batches.batch_size / (time.perf_counter() - t0))
        finally:
            feed.close()
    return {"examples_per_s": statistics.median(rates), "runs": [round(x) for x in rates]}


def bench_step(data_dir: str, batch: int, history_len: int, negatives: int, use_history: bool, steps: int,
               repeats: int, warmup: int, overrides: list[str]) -> dict:
    """(d) the real training step (launcher, donation) over pre-prepared batches; each step is waited for."""
    import jax

    from tests.helpers import compose_cfg
    from train.config import validate
    from train.loop import build, load_data, make_batches, prepare_kwargs, select_devices

    c = validate(compose_cfg("data=prepared", f"data.path={data_dir}", f"train.global_batch_size={batch}",
                             f"data.history_len={history_len}", f"loss.num_negatives={negatives}",
                             f"model.user.use_history={str(use_history).lower()}", "model.user.features=[]",
                             "model.item.features=[]", *overrides))
    ds = load_data(c)
    devices = select_devices(c)
    _, _, launcher, state, sc = build(c, ds, steps * repeats + warmup, devices)
    batches = make_batches(c, ds, seed=0)
    use = prepare_kwargs(sc)
    prepared = [prepare(next(batches), **use) for _ in range(min(32, steps))]
    dev_state = launcher.put_state(state)
    del state
    times, wall0 = [], None
    for i in range(warmup + steps * repeats):
        if i == warmup:
            wall0 = time.perf_counter()
        local, shared = launcher.put_batch(*prepared[i % len(prepared)])
        t0 = time.perf_counter()
        dev_state, metrics = launcher(dev_state, local, shared)
        jax.block_until_ready((dev_state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0   # the whole timed loop, host-to-device copies included: a check
    # Median per repeat of `steps` steps (each its summed wall time), then the median over repeats.
    rates = [steps * batch / sum(times[r * steps:(r + 1) * steps]) for r in range(repeats)]
    return {"examples_per_s": statistics.median(rates), "runs": [round(x) for x in rates],
            "median_step_ms": statistics.median(times) * 1e3,
            "wall_clock_examples_per_s": steps * repeats * batch / wall, "use_history": use_history,
            "model": {"id_dim": c.model.id_dim, "output_dim": c.model.output_dim, "launcher": c.train.launcher,
                      "devices": len(devices), "platform": devices[0].platform}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared dataset directory (python -m data.prepare)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--history-len", type=int, default=50)
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=200, help="batches per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=int, default=5, help="grain_feed: start-up batches not timed")
    ap.add_argument("--depth", type=int, default=2, help="grain_feed: prefetch depth (train.prefetch)")
    ap.add_argument("--step-steps", type=int, default=None, help="timed training steps per repeat "
                    "(default: --steps)")
    ap.add_argument("--no-history-step", action="store_true",
                    help="time the step with id-only towers without the user history (default: with it)")
    ap.add_argument("--skip-step", action="store_true", help="do not time the training step")
    ap.add_argument("--feeds", nargs="*", default=["threads=1", "threads=2", "workers=1", "workers=2"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for the step")
    args = ap.parse_args()
    from absl import flags
    if not flags.FLAGS.is_parsed():   # Grain's mp_prefetch reads its absl flags; parse their defaults
        flags.FLAGS.mark_as_parsed()

    t0 = time.perf_counter()
    data = PreparedData(args.data, verify="size")
    open_s = time.perf_counter() - t0
    use_history = not args.no_history_step
    batches = Batches(data, batch_size=args.batch_size, num_negatives=args.negatives,
                      history_len=args.history_len, history_mode="causal", seed=0)
    use = dict(use_user_table=True, use_item_table=True, use_history=use_history and args.history_len > 0)
    print(f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, {time.strftime('%Y-%m-%d %H:%M')} "
          f"UTC, load {os.getloadavg()[0]:.2f}; {args.data}: {data.num_users:,} users, {data.num_items:,} items, "
          f"{batches.examples_per_epoch:,} train examples, {len(data.manifest['shards'])} shards (opened in "
          f"{open_s:.1f}s); batch {args.batch_size}, history {args.history_len}, negatives {args.negatives}, "
          f"{args.steps} batches x {args.repeats} repeats", flush=True)

    res = bench_data_side(batches, use, args.steps, args.repeats)
    for k, v in res.items():
        print(f"{k}: {v}", flush=True)
    first = 2 * args.repeats * args.steps * args.batch_size
    for spec in args.feeds:
        kind, n = spec.split("=")
        kw = {"threads": int(n), "workers": 0} if kind == "threads" else {"threads": 1, "workers": int(n)}
        res[f"grain_feed {spec}"] = bench_feed(batches, use, args.steps, args.repeats, args.skip, args.depth,
                                               first_offset=first, **kw)
        print(f"grain_feed {spec}: {res[f'grain_feed {spec}']}", flush=True)
    step = None
    if not args.skip_step:
        step = bench_step(args.data, args.batch_size, args.history_len, args.negatives, use_history,
                          args.step_steps or args.steps, args.repeats, warmup=5, overrides=args.set)
        print(f"step: {step}", flush=True)

    print()
    print("| measurement | examples/s (median) | runs | input / step |")
    print("| --- | --- | --- | --- |")
    for k, v in res.items():
        ratio = f"{v['examples_per_s'] / step['examples_per_s']:.2f}" if step else "-"
        print(f"| {k} | {v['examples_per_s']:,.0f} | {', '.join(f'{x:,}' for x in v['runs'])} | {ratio} |")
    if step:
        print(f"| training step ({'id + mean-of-history' if use_history else 'id-only'} towers, "
              f"{step['median_step_ms']:.1f} ms median) | {step['examples_per_s']:,.0f} | "
              f"{', '.join(f'{x:,}' for x in step['runs'])} | 1.00 |")
    if step:
        print(f"training step checked against the wall clock of the whole timed loop (copies included): "
              f"{step['wall_clock_examples_per_s']:,.0f} examples/s")
    print(f"peak RSS {peak_rss_gb():.2f} GB (largest worker process {peak_rss_gb(resource.RUSAGE_CHILDREN):.2f} GB)")
    print(json.dumps({"results": res, "step": step, "peak_rss_gb": peak_rss_gb(),
                      "peak_rss_children_gb": peak_rss_gb(resource.RUSAGE_CHILDREN)}))


if __name__ == "__main__":
    main()
