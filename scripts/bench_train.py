"""Training throughput and the cost of large ID tables.

Prints, for each case, the median step time over timed steps (after compilation and warm-up), examples/s,
and for the table-size sweep the ratio of each step time to the smallest table's (the reference run, same
process, same batch). Input preparation (batching + de-duplication) is timed separately so it is clear
whether the step or the pipeline bounds throughput.

  python scripts/bench_train.py                       # all cases
  python scripts/bench_train.py --cases tables --rows 1e5 1e6 1e7
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_train.py --cases ml100k
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_train.py --cases tfrs_id tfrs_hist --ab pool_history=false
  python scripts/bench_train.py --cases floor          # the id-only step's dense math alone
  python scripts/bench_train.py --cases large_id_emb_input --set train.global_batch_size=16384   # host input alone
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_train.py --cases loop_id loop_hist   # per-thread CPU

A config's `train.steps_per_dispatch` (e.g. `--set train.steps_per_dispatch=4`; `large_id_emb` sets 4) is
honoured: batches are stacked in groups, each group runs in one dispatch, and the step time is the group's
divided by its steps.

The `loop_id` / `loop_hist` cases run the `tfrs_id` / `tfrs_hist` models the way the training loop does (the
Grain feed with its reading thread, the launcher's transfers and dispatch, at least 200 steps) and report the
wall time per step and the CPU time per step of XLA's threads, the input thread and the main thread, read from
/proc/self/task (Linux): on a 2-core machine every host millisecond comes out of XLA's share.

The `large_id_emb_input` case times only the host side of `large_id_emb`'s batches, one after another in
one thread: `Batches.batch_at` (order, users, histories, negatives, features) and `train.input.prepare` (the
de-duplication of ID rows), medians over at least 60 consecutive batches after 3; on a GPU this is what
bounds the loop when it is slower than the step.

The `floor` case times what no change to the framework can remove from the id-only step at batch 1,024 and
64 dimensions: the [B, d] x [d, B] logits with their two backward matmuls alone, and the same with an in-batch
softmax cross-entropy and its gradient (no ID tables, no metrics, no input), each jitted and timed to completion.

The `tfrs_id` / `tfrs_hist` cases are the models of the side-by-side comparison with TensorFlow Recommenders in
BENCHMARKS.md (raw dot products, logQ, in-batch negatives, Adagrad 0.1, batch 1024; user id, and user id + mean
of 100 causal history items). Each case reports the host phases of one batch apart (`batch_ms`: building it,
history included; `prepare_ms`: de-duplication; `put_ms`: host-to-device) besides the step. `--ab KEY=VALUE`
also builds the step with that `train.step.StepConfig` field changed and times both steps alternately, in
rounds, on the same batches, so a shared machine's load falls on both alike; it prints each one's median and
the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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
import train.loop  # noqa: E402
from train.input import prepare, stack_batches  # noqa: E402
from train.loop import build, input_flags, load_data, make_batches, prepare_kwargs, select_devices  # noqa: E402
from train.state import table_sizes  # noqa: E402


def scatter_rows(prepared: tuple[dict, dict], maps: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Moves each table's touched rows to random distinct rows of a larger table (an injective map), so a
    big-table run touches rows spread over the whole table, as real traffic does, on the same data."""
    local, shared = prepared
    shared = dict(shared)
    for name, row_map in maps.items():
        shared[f"{name}_uniq"] = row_map[shared[f"{name}_uniq"]].astype(np.int32)
    return local, shared


def time_steps(launcher, state, prepared: list, steps: int, warmup: int, per_dispatch: int = 1
               ) -> tuple[object, list[float]]:
    """Runs `warmup + steps` training steps over the prepared batches (cycled); returns the final state and the
    wall seconds of each step after the warm-up (host-to-device transfer of the batch not included).

    With `per_dispatch` > 1, `prepared` holds groups of that many batches (`group_batches`), each run in one
    dispatch (`Launcher.run_group`): `steps` and `warmup` count groups, and each group's seconds are divided
    by its steps."""
    times = []
    put, call = ((launcher.put_batch, launcher.__call__) if per_dispatch == 1 else
                 (launcher.put_group, launcher.run_group))
    for i in range(steps + warmup):
        local, shared = put(*prepared[i % len(prepared)])
        t0 = time.perf_counter()
        state, metrics = call(state, local, shared)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append((time.perf_counter() - t0) / per_dispatch)
    return state, times


def group_batches(prepared: list, per_dispatch: int) -> list:
    """Consecutive prepared batches in groups of `per_dispatch`, stacked as the training feed hands them to
    `Launcher.put_group`."""
    return [stack_batches(prepared[i:i + per_dispatch])
            for i in range(0, len(prepared) - per_dispatch + 1, per_dispatch)]


def dense_floor(steps: int, warmup: int, batch: int = 1024, dim: int = 64) -> dict:
    """Median ms of the id-only step's irreducible dense math (see the module docstring)."""
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    q, c, g = (jnp.asarray(rng.standard_normal(shape, np.float32) * 0.1)
               for shape in ((batch, dim), (batch, dim), (batch, batch)))

    @jax.jit
    def matmuls(q, c, g):      # forward logits, then the query- and candidate-side gradients
        return q @ c.T, g @ c, g.T @ q

    def loss(q, c):
        logits = q @ c.T
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

    softmax = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    out = {}
    for name, fn, args in (("matmuls", matmuls, (q, c, g)), ("softmax_step", softmax, (q, c))):
        times = []
        for i in range(steps + warmup):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        out[f"{name}_ms"] = round(ms, 3)
        out[f"{name}_examples_per_sec_ceiling"] = round(batch / ms * 1e3)
    out["gflop_matmuls"] = round(3 * 2 * batch * batch * dim / 1e9, 3)
    return out


EXTRA_OVERRIDES: list[str] = []   # --set: appended to every case
AB: dict[str, object] = {}        # --ab: StepConfig fields of the second step timed against the first


@contextlib.contextmanager
def step_fields(fields: dict):
    """Builds inside get a `StepConfig` with `fields` replaced (what the config does not set)."""
    orig = train.loop.StepConfig
    train.loop.StepConfig = functools.partial(orig, **fields)
    try:
        yield
    finally:
        train.loop.StepConfig = orig


def time_training(overrides: list[str], steps: int, warmup: int, table_rows: int | None = None) -> dict:
    """Median step time of the real step (launcher, donation, prefetch-free) for a composed config, the host
    phases of a batch apart, and with `AB` set the same for the changed step, timed alternately."""
    c = validate(compose_cfg(*overrides, *EXTRA_OVERRIDES))
    ds = load_data(c)
    devices = select_devices(c)
    _, _, launcher, state, sc = build(c, ds, steps + warmup, devices, table_rows=table_rows)
    runs = [(launcher, state)]
    if AB:
        with step_fields(AB):
            _, _, launcher_b, state_b, sc_b = build(c, ds, steps + warmup, devices, table_rows=table_rows)
        assert all(getattr(sc_b, k) == v for k, v in AB.items()), "--ab field not applied"
        runs.append((launcher_b, state_b))
    rng = np.random.default_rng(0)
    maps = {name: rng.choice(t.shape[0], size=n, replace=False)
            for name, t, n in [(k, v, ds.num_users if k == "user" else ds.num_items)
                               for k, v in state["tables"].items()]} if table_rows else {}
    batches = make_batches(c, ds, seed=0)
    use = prepare_kwargs(sc)
    prepared, batch_times, prepare_times, put_times = [], [], [], []
    for _ in range(min(steps + warmup, 64)):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        prepared.append(scatter_rows(prepare(batch, **use), maps))
        t2 = time.perf_counter()
        jax.block_until_ready(launcher.put_batch(*prepared[-1]))
        put_times.append(time.perf_counter() - t2)
        batch_times.append(t1 - t0)
        prepare_times.append(t2 - t1)
    dev = [lau.put_state(st) for lau, st in runs]
    del state, runs[:]
    launchers = [launcher] + ([launcher_b] if AB else [])
    step_times = [[] for _ in launchers]
    rounds = 5 if AB else 1
    k = c.train.steps_per_dispatch
    if k > 1:
        prepared = group_batches(prepared, k)
    per_round = max(1, steps // rounds // k)
    for r in range(rounds):   # alternate A and B in rounds: load on a shared machine falls on both
        for i, lau in enumerate(launchers):
            dev[i], times = time_steps(lau, dev[i], prepared, per_round, max(1, warmup // k) if r == 0 else 1, k)
            step_times[i].extend(times)
    step = statistics.median(step_times[0])
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    b = c.train.global_batch_size
    # Peak resident memory of this process so far (it only grows: run one case alone to read its own peak).
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out = {"step_ms": step * 1e3, "examples_per_s": b / step, "input_ms": med(batch_times) + med(prepare_times),
           "batch_ms": med(batch_times), "prepare_ms": med(prepare_times), "put_ms": med(put_times),
           "peak_rss_gb": peak_gb, "batch": b, "devices": len(devices), "steps_per_dispatch": k,
           "rows": {"user": ds.num_users, "item": ds.num_items}}
    if AB:
        out["ab"] = {"fields": dict(AB), "step_ms": med(step_times[1]),
                     "ratio_b_over_a": statistics.median(step_times[1]) / step}
    return out


def time_input(overrides: list[str], batches: int, warmup: int = 3) -> dict:
    """Medians of `batch_at` and `prepare` over `batches` consecutive batches of a composed config, one thread,
    without building the model."""
    c = validate(compose_cfg(*overrides, *EXTRA_OVERRIDES))
    ds = load_data(c)
    it = make_batches(c, ds, seed=0)
    use = input_flags(c, table_sizes(c, ds.num_users, ds.num_items))     # what `build` gives the step
    batch_times, prepare_times = [], []
    for i in range(batches + warmup):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        prepare(batch, **use)
        if i >= warmup:
            batch_times.append(t1 - t0)
            prepare_times.append(time.perf_counter() - t1)
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    b = c.train.global_batch_size
    total = med([x + y for x, y in zip(batch_times, prepare_times)])
    return {"batch_ms": med(batch_times), "prepare_ms": med(prepare_times), "input_ms": total,
            "input_examples_per_s": b / total * 1e3, "batch": b, "batches": batches}


def _thread_cpu_ms() -> dict[str, float]:
    """CPU milliseconds so far of each of this process's threads, by thread name (the main thread as "main")."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        except FileNotFoundError:   # the thread ended meanwhile
            continue
        key = "main" if int(tid) == os.getpid() else f"{name}/{tid}"
        out[key] = (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    return out


def time_loop_threads(overrides: list[str], steps: int, warmup: int) -> dict:
    """The training loop's feed and dispatch without its logging: the Grain feed (`train.prefetch`, one reading
    thread) and the launcher, `steps` steps after `warmup`, timed to completion. Returns the wall ms per step and
    the CPU ms per step of XLA's threads, the input threads and the main thread (from /proc/self/task, Linux),
    which on a machine with few cores compete with each other."""
    from train.input import dispatch_groups, grain_feed
    c = validate(compose_cfg(*overrides, *EXTRA_OVERRIDES))
    ds = load_data(c)
    _, _, launcher, state, sc = build(c, ds, steps + warmup, select_devices(c))
    k = c.train.steps_per_dispatch
    total = (steps + warmup) // k * k + k
    feed = grain_feed(make_batches(c, ds, seed=0), functools.partial(prepare, **prepare_kwargs(sc)),
                      depth=c.train.prefetch, groups=dispatch_groups(0, total, k) if k > 1 else None)
    dev = launcher.put_state(state)

    def run(n: int):
        nonlocal dev
        metrics = []
        for _ in range(max(1, n // k)):
            (local, shared), _ = next(feed)
            if k == 1:
                dev, m = launcher(dev, *launcher.put_batch(local, shared))
            else:
                dev, m = launcher.run_group(dev, *launcher.put_group(local, shared))
            metrics.append(m)
        jax.block_until_ready((dev, metrics))
        return max(1, n // k) * k

    try:
        run(warmup)
        before, t0 = _thread_cpu_ms(), time.perf_counter()
        done = run(steps)
        wall, after = time.perf_counter() - t0, _thread_cpu_ms()
    finally:
        feed.close()
    cpu = {"xla": 0.0, "input": 0.0, "main": 0.0, "other": 0.0}
    for key, ms in after.items():
        spent = (ms - before.get(key, 0.0)) / done
        group = ("main" if key == "main" else "xla" if "XLA" in key or "Eigen" in key
                 else "input" if key.startswith("python") else "other")
        cpu[group] += spent
    b = c.train.global_batch_size
    return {"wall_ms_per_step": wall / done * 1e3, "examples_per_s": done * b / wall, "steps_per_dispatch": k,
            "cpu_ms_per_step": {name: round(v, 2) for name, v in cpu.items()},
            "cpu_ms_per_step_total": round(sum(cpu.values()), 2), "steps": done}


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
                    choices=["ml100k", "ml100k_id", "ml100k_hist", "tfrs_id", "tfrs_hist", "large_id_emb", "tables",
                             "floor", "loop_id", "loop_hist", "large_id_emb_input"])
    ap.add_argument("--rows", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides appended to every case (e.g. train.global_batch_size=16384 on a GPU)")
    ap.add_argument("--ab", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="time the step with these StepConfig fields changed against the unchanged one, "
                         "alternately (e.g. pool_history=false, recall_ks=())")
    args = ap.parse_args()
    EXTRA_OVERRIDES.extend(args.set)
    for item in args.ab:
        key, value = item.split("=", 1)
        kind = {f.name: f.type for f in dataclasses.fields(train.loop.StepConfig)}.get(key)
        if kind is None:
            raise SystemExit(f"--ab {item}: StepConfig has no field {key!r}")
        if kind in ("bool", bool):
            AB[key] = {"true": True, "false": False}[value.lower()]
        elif str(kind).startswith("tuple"):   # "()" or "10,20"
            AB[key] = tuple(int(v) for v in value.strip("()").split(",") if v.strip())
        else:
            AB[key] = type(getattr(train.loop.StepConfig, key, 0))(value)
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
    tfrs = ml[:3] + ["model.id_dim=64", "model.output_dim=64", "model.normalize=false", "loss.temperature=1.0",
                     "loss.num_negatives=0", "loss.logq_correction=true", "loss.remove_accidental_hits=true",
                     "model.user.features=[]", "model.item.features=[]", "model.item.id_dropout=0.0",
                     "optimizer.sparse.name=rowwise_adagrad", "optimizer.sparse.learning_rate=0.1",
                     "optimizer.dense.name=adagrad", "optimizer.dense.learning_rate=0.1"]
    if "tfrs_id" in args.cases:
        results["tfrs_id"] = time_training(tfrs + ["model.user.use_history=false"], args.steps, args.warmup)
        print("TFRS comparison, user-id towers:", json.dumps(results["tfrs_id"]), flush=True)
    if "tfrs_hist" in args.cases:
        results["tfrs_hist"] = time_training(tfrs + ["model.user.use_history=true", "model.user.combine=sum",
                                                     "data.history_len=100"], args.steps, args.warmup)
        print("TFRS comparison, user id + mean of 100 history items:", json.dumps(results["tfrs_hist"]), flush=True)
    hist = ["model.user.use_history=true", "model.user.combine=sum", "data.history_len=100"]
    for name, extra in (("loop_id", ["model.user.use_history=false"]), ("loop_hist", hist)):
        if name in args.cases:
            results[name] = time_loop_threads(tfrs + extra, max(args.steps, 200), max(args.warmup, 20))
            print(f"{name} (the TFRS comparison's model, fed and dispatched as in training):",
                  json.dumps(results[name]), flush=True)
    if "floor" in args.cases:
        results["floor"] = dense_floor(max(args.steps, 100), args.warmup)
        print("id-only step's dense math alone (batch 1024, dim 64):", json.dumps(results["floor"]), flush=True)
    if "large_id_emb_input" in args.cases:
        results["large_id_emb_input"] = time_input(["+experiment=large_id_emb"], max(args.steps, 60))
        print("large_id_emb host input alone:", json.dumps(results["large_id_emb_input"]), flush=True)
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
