"""Multi-embedding users (`model.user.num_embeddings` = K) at equal training time: accuracy and diversity.

Protocol: `+experiment=multi_interest` with `model.user.num_embeddings` = K for each K (K = 1 is the plain
single-embedding user tower with use_history=true), on a temporal split with a validation slice
(`data.valid_fraction`, default 0.1) carved from each user's latest training items; every choice is made on
validation, test is reported next to it from the same runs.

1. Step time: each K trains `--warm-steps` steps logged every 10, in `--warm-rounds` rounds of every K in turn;
   a run's step time is the median seconds per step of its windows (`median_step_seconds`: the first step's
   compilation is timed apart by the loop, and the median leaves out the few windows that recompile the step
   for a new batch shape); K's step time is K = 1's median times the median over the rounds of K's step time
   over K = 1's in the same round (`round_ratio_step_seconds`: the load other jobs put on a shared machine
   changes from minute to minute, and a round's runs are back to back).
2. Budget: K = 1 trains `--epochs` epochs (S_1 steps); each other K gets the steps that fit the same training
   time at the measured step times, S_K = floor(S_1 * t_1 / t_K) (`equal_time_steps`). The step times of all K
   are measured side by side, so a change of machine load during the long runs does not move the budget (it
   does move their seconds, which are reported).
3. Each K trains its steps and is evaluated on valid and on test (`eval.holdout.evaluate`, exact full-corpus
   search; K > 1 users' per-interest lists merged round-robin as they are served): recall/ndcg at the cut-off,
   catalogue coverage, intra-list distance and distinct genres of the top-k (`eval.metrics.diversity_metrics`
   with the items' `genres` bag).
4. Each K > 1 is evaluated on valid with every `--history-per-interest` value (inference only: how many of a
   user's K embeddings are searched, so the same trained towers serve every value); the value with the best
   valid recall is the one reported, on test too.
5. With `--equal-epochs`, each K > 1 is also trained for K = 1's steps, for reference.

  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_multi_interest.py                # ml-latest-small
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_multi_interest.py --data ml-100k --ks 1 4 --epochs 10
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def equal_time_steps(reference_steps: int, step_seconds: dict[int, float], reference: int = 1) -> dict[int, int]:
    """Training steps per configuration that fit the reference configuration's training time.

    Args:
      reference_steps: steps of the reference configuration (e.g. K = 1 at 20 epochs), >= 1.
      step_seconds: steady seconds per step of each configuration (> 0), measured under the same conditions.
      reference: the key of `step_seconds` whose time is the budget.
    Returns:
      {key: steps}: the reference keeps `reference_steps`; every other key gets
      max(1, floor(reference_steps * step_seconds[reference] / step_seconds[key])).

    Raises:
      ValueError: `reference` has no step time, a step time is not positive, or `reference_steps` < 1.
    """
    if reference not in step_seconds:
        raise ValueError(f"equal_time_steps: the reference {reference!r} has no step time "
                         f"(measured: {sorted(step_seconds)})")
    if reference_steps < 1:
        raise ValueError(f"equal_time_steps: reference_steps={reference_steps} must be >= 1")
    bad = {k: t for k, t in step_seconds.items() if not t > 0}
    if bad:
        raise ValueError(f"equal_time_steps: step times must be > 0 seconds, got {bad}")
    budget = reference_steps * step_seconds[reference]
    # The epsilon keeps an exact ratio that floats just below its integer (0.3 / 0.1 = 2.9999999999999996) from
    # losing a step.
    return {k: reference_steps if k == reference else max(1, math.floor(budget / t * (1 + 1e-9)))
            for k, t in step_seconds.items()}


def median_step_seconds(metrics_lines) -> float:
    """Median seconds per step over a run's logged windows (`metrics.jsonl` lines with `train/steps_per_sec`).

    The median leaves out the few windows that recompile the step (a batch's unique-id bucket grows the first
    time it is seen; the first step's compilation is timed apart already), so it is the steady step time.

    Args:
      metrics_lines: the lines of `metrics.jsonl` (JSON strings) or their parsed dicts.
    Raises:
      ValueError: no line holds a throughput.
    """
    rates = []
    for line in metrics_lines:
        d = json.loads(line) if isinstance(line, str) else line
        if "train/steps_per_sec" in d:
            rates.append(d["train/steps_per_sec"])
    if not rates:
        raise ValueError("median_step_seconds: no logged window holds train/steps_per_sec")
    return float(np.median(1.0 / np.asarray(rates, np.float64)))


def round_ratio_step_seconds(measured: dict, reference=1) -> dict:
    """Step times for `equal_time_steps` from rounds of step-time runs taken side by side under changing load.

    Within a round every configuration runs back to back, under about the same load, so the ratio of each one's
    step time to the reference's in the same round is what the rounds agree on; each ratio is the median over
    the rounds, applied to the reference's median step time.

    Args:
      measured: {key: [seconds per step of round 0, round 1, ...]}, the same number of rounds (>= 1) each.
      reference: the key the ratios are taken to.
    Returns:
      {key: seconds}: the reference's median, and for every other key that times its median per-round ratio.

    Raises:
      ValueError: no reference, no rounds, or keys with different numbers of rounds.
    """
    if reference not in measured:
        raise ValueError(f"round_ratio_step_seconds: the reference {reference!r} has no step times")
    rounds = {k: len(v) for k, v in measured.items()}
    if len(set(rounds.values())) != 1 or not rounds[reference]:
        raise ValueError(f"round_ratio_step_seconds: every key needs the same number (>= 1) of rounds, got {rounds}")
    ref = np.asarray(measured[reference], np.float64)
    base = float(np.median(ref))
    return {k: base if k == reference else base * float(np.median(np.asarray(v, np.float64) / ref))
            for k, v in measured.items()}


def config(data_path: str, k: int, *, steps: int | None = None, epochs: float | None = None,
           valid_fraction: float = 0.1, extra: tuple[str, ...] = ()):
    """The validated training config of `+experiment=multi_interest` with K = `k` user embeddings, for `steps`
    steps (or `epochs` epochs), no end-of-training evaluation and one (synchronous) checkpoint at the end."""
    from tests.helpers import compose_cfg
    from train.config import validate

    length = [f"train.total_steps={steps}"] if steps is not None else [f"train.num_epochs={epochs}"]
    return validate(compose_cfg("+experiment=multi_interest", f"data.path={data_path}",
                                f"data.valid_fraction={valid_fraction}", f"model.user.num_embeddings={k}",
                                *length, "train.progress=false", "eval.at_end=false",
                                "checkpoint.async_save=false", "checkpoint.every_steps=1000000", *extra))


def train(c, run_dir: str) -> dict:
    """Trains `c` into `run_dir` (`train.loop.run`).

    Returns:
      {"steps", "wall_seconds", "train_seconds" (the training loop without checkpoint saves, compilation
      included), "first_step_seconds", "median_step_seconds" (`median_step_seconds` of its logged windows)}.
    """
    from train.loop import run

    t0 = time.perf_counter()
    result = run(c, run_dir)
    timing = result["timing"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        step_seconds = median_step_seconds(f)
    return {"steps": result["steps"], "wall_seconds": time.perf_counter() - t0,
            "train_seconds": timing["training_seconds"] - timing["checkpoint_seconds"],
            "first_step_seconds": timing["first_step_seconds"], "median_step_seconds": step_seconds}


def evaluate_run(run_dir: str, ds, splits=("valid", "test"), ks=(20, 50), history_per_interest: int | None = None,
                 history_len: int = 50) -> dict:
    """Held-out metrics of a trained run on each split, with the diversity of the top-max(ks) lists.

    Args:
      ds: the run's dataset (`data.load.load` of its data config).
      history_per_interest: overrides the run's `model.user.history_per_interest` (K > 1 only; inference reads
        it to choose how many of a user's embeddings it searches); None keeps the run's.
      history_len: the run's `data.history_len`.
    Returns:
      {split: {"recall@k", "ndcg@k", "coverage@K", "ild@K", "categories@K" (distinct genres), "num_users"}}.
    """
    from eval.holdout import evaluate, heldout_users, model_embeddings
    from towers.restore import load_trained

    trained = load_trained(run_dir)
    if history_per_interest is not None:
        trained.model.user.history_per_interest = int(history_per_interest)
    genres = ds.item_features["genres"]
    out = {}
    for split in splits:
        users = heldout_users(ds, split)
        user_emb, item_emb = model_embeddings(trained, ds, users, history_len)
        ev = evaluate(user_emb, item_emb, ds, users, list(ks), split=split, baselines=False, diversity=True,
                      item_categories=genres)
        out[split] = {**ev["model"], "num_users": ev["num_users"]}
    return out


def train_and_evaluate(data_path: str, k: int, steps: int, run_dir: str, ds, *, valid_fraction: float = 0.1,
                       cut_offs=(20, 50), hpi_values=(), extra: tuple[str, ...] = ()) -> dict:
    """Trains K = `k` for `steps` steps into `run_dir` and evaluates it on valid and test.

    For K > 1 with `hpi_values`, each `model.user.history_per_interest` value (and the run's own) is evaluated on
    valid; the one with the best valid recall at the largest cut-off is chosen (the run's own on a tie) and its
    valid and test metrics are the row's.

    Returns:
      {"K", "run_dir", `train`'s keys, "epochs", "history_per_interest" (the chosen; None for K = 1),
       "metrics": {"valid", "test"}, "valid_by_history_per_interest": {value: valid metrics} (K > 1 only)}.
    """
    if os.path.exists(run_dir):   # the loop would resume it
        raise FileExistsError(f"{run_dir} exists; pass an empty --work directory")
    c = config(data_path, k, steps=steps, valid_fraction=valid_fraction, extra=extra)
    row = {"K": k, "run_dir": run_dir, **train(c, run_dir),
           "epochs": steps * c.train.global_batch_size / len(ds.train), "history_per_interest": None}
    evaluate = functools.partial(evaluate_run, run_dir, ds, ks=cut_offs, history_len=c.data.history_len)
    if k == 1:
        row["metrics"] = evaluate()
        return row
    own = c.model.user.history_per_interest
    valid = {own: evaluate(("valid",), history_per_interest=own)["valid"]}
    for h in hpi_values:
        if h not in valid:
            valid[h] = evaluate(("valid",), history_per_interest=h)["valid"]
    key = f"recall@{max(cut_offs)}"
    best = max(valid, key=lambda h: (valid[h][key], h == own))
    row.update(history_per_interest=best, valid_by_history_per_interest=valid,
               metrics={"valid": valid[best], **evaluate(("test",), history_per_interest=best)})
    return row


def bench(data_path: str, ks_embeddings=(1, 2, 4), *, epochs: float = 20, warm_steps: int = 200,
          valid_fraction: float = 0.1, cut_offs=(20, 50), hpi_values=(), extra: tuple[str, ...] = (),
          log_every: int = 10, warm_rounds: int = 5, work: str | None = None, equal_epochs: bool = False) -> dict:
    """Step times, equal-time steps, training and evaluation of every K (see the module docstring).

    Args:
      data_path: the MovieLens directory.
      ks_embeddings: the K values; 1 (the time reference) must be among them.
      epochs: K = 1's training epochs.
      warm_steps: steps of each K's step-time run, logged every `log_every` steps; `warm_rounds` rounds of them
        (every K in turn), combined by `round_ratio_step_seconds`.
      cut_offs: metric cut-offs; the diversity metrics are taken at the largest.
      hpi_values: `model.user.history_per_interest` values each K > 1 is evaluated with on valid
        (`train_and_evaluate`).
      extra: training overrides for every run.
      work: where the runs go (`<work>/K<k>`, kept for `python -m eval run_dir=...`); None = a temp dir.
      equal_epochs: also train each K > 1 for K = 1's steps (`<work>/K<k>_equal_epochs`), for reference.
    Returns:
      {"dataset", "num_users", "num_items", "train_rows", "reference_steps", "epochs", "step_seconds",
       "rows": one per run (`train_and_evaluate`, with "budget": "equal time" or "equal epochs")}.
    """
    from data.load import load
    from train.loop import total_steps

    if 1 not in ks_embeddings:
        raise ValueError(f"K = 1 is the equal-time reference; got K = {list(ks_embeddings)}")
    base = config(data_path, 1, epochs=epochs, valid_fraction=valid_fraction, extra=extra)
    ds = load(base.data)
    reference_steps = total_steps(base, len(ds.train))
    work = work or tempfile.mkdtemp(prefix="bench_multi_interest_")
    measured = {k: [] for k in ks_embeddings}
    for r in range(warm_rounds):   # rounds of every K in turn, so a change of load reaches every K alike
        for k in ks_embeddings:
            with tempfile.TemporaryDirectory() as warm:
                measured[k].append(train(config(data_path, k, steps=warm_steps, valid_fraction=valid_fraction,
                                                extra=(*extra, f"train.log_every_steps={log_every}")),
                                         warm)["median_step_seconds"])
            print(f"K={k}: {1e3 * measured[k][-1]:.1f} ms/step (warm run {r + 1} of {warm_rounds}, "
                  f"{warm_steps} steps)", flush=True)
    step_seconds = round_ratio_step_seconds(measured)
    steps = equal_time_steps(reference_steps, step_seconds)
    arms = [(k, steps[k], "equal time", f"K{k}") for k in ks_embeddings]
    if equal_epochs:
        arms += [(k, reference_steps, "equal epochs", f"K{k}_equal_epochs") for k in ks_embeddings if k != 1]
    rows = []
    for k, n, budget, name in arms:
        row = train_and_evaluate(data_path, k, n, os.path.join(work, name), ds, valid_fraction=valid_fraction,
                                 cut_offs=cut_offs, hpi_values=hpi_values, extra=extra)
        row.update(budget=budget, warm_step_seconds=step_seconds[k], warm_step_seconds_all=measured[k])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"dataset": ds.name, "num_users": ds.num_users, "num_items": ds.num_items, "train_rows": len(ds.train),
            "reference_steps": reference_steps, "epochs": epochs, "step_seconds": step_seconds, "rows": rows}


def table(result: dict, k: int = 50) -> str:
    """Markdown table of `bench`'s result: one row per (run, split) (ms/step: the step-time runs'; train s: the
    training loop's seconds, compilation included), then each K > 1's valid metrics by history_per_interest."""
    head = (f"| K | budget | history_per_interest | split | recall@{k} | ndcg@{k} | coverage@{k} | ild@{k} | "
            f"genres@{k} | ms/step | steps (epochs) | train s |\n|" + " --- |" * 12 + "\n")
    lines = []
    for r in result["rows"]:
        hpi = "" if r["history_per_interest"] is None else r["history_per_interest"]
        for split in ("valid", "test"):
            m = r["metrics"][split]
            lines.append(f"| {r['K']} | {r['budget']} | {hpi} | {split} | {m[f'recall@{k}']:.4f} | "
                         f"{m[f'ndcg@{k}']:.4f} | {m[f'coverage@{k}']:.3f} | {m[f'ild@{k}']:.3f} | "
                         f"{m[f'categories@{k}']:.2f} | {1e3 * r['warm_step_seconds']:.1f} | "
                         f"{r['steps']} ({r['epochs']:.1f}) | {r['train_seconds']:.0f} |")
    text = head + "\n".join(lines) + "\n"
    hpi = [(r["K"], r["budget"], h, m) for r in result["rows"]
           for h, m in sorted(r.get("valid_by_history_per_interest", {}).items())]
    if hpi:
        text += (f"\n| K | budget | history_per_interest | valid recall@{k} | ndcg@{k} | coverage@{k} | ild@{k} | "
                 f"genres@{k} |\n|" + " --- |" * 8 + "\n")
        text += "\n".join(f"| {kk} | {b} | {h} | {m[f'recall@{k}']:.4f} | {m[f'ndcg@{k}']:.4f} | "
                          f"{m[f'coverage@{k}']:.3f} | {m[f'ild@{k}']:.3f} | {m[f'categories@{k}']:.2f} |"
                          for kk, b, h, m in hpi) + "\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None,
                    help="MovieLens directory (default: $TWOTOWER_DATA_DIR/ml-latest-small; a relative path is "
                         "also tried under $TWOTOWER_DATA_DIR)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="K values (1 is the time reference)")
    ap.add_argument("--epochs", type=float, default=20, help="K = 1's training epochs (the budget)")
    ap.add_argument("--warm-steps", type=int, default=200, help="steps of each K's step-time run")
    ap.add_argument("--warm-rounds", type=int, default=5, help="rounds of step-time runs (every K in turn)")
    ap.add_argument("--work", default=None, help="where the runs go (default: a temp dir); kept")
    ap.add_argument("--valid-fraction", type=float, default=0.1, help="data.valid_fraction")
    ap.add_argument("--cutoff", type=int, default=50, help="k of the reported metrics (recall@k, coverage@k, ...)")
    ap.add_argument("--history-per-interest", type=int, nargs="*", default=[0, 10],
                    help="model.user.history_per_interest values evaluated on valid for each K > 1; the best is "
                         "reported (none: the experiment's own)")
    ap.add_argument("--equal-epochs", action="store_true", help="also train each K > 1 for K = 1's steps")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="extra training overrides, e.g. loss.temperature=0.1")
    args = ap.parse_args()
    data = args.data or os.path.join(os.environ.get("TWOTOWER_DATA_DIR", "."), "ml-latest-small")
    cut_offs = tuple(sorted({min(20, args.cutoff), args.cutoff}))
    load_start = os.getloadavg()
    result = bench(data, tuple(args.ks), epochs=args.epochs, warm_steps=args.warm_steps,
                   valid_fraction=args.valid_fraction, cut_offs=cut_offs, hpi_values=tuple(args.history_per_interest),
                   extra=tuple(args.overrides), warm_rounds=args.warm_rounds, work=args.work,
                   equal_epochs=args.equal_epochs)
    result.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=platform.node(),
                  cpus=os.cpu_count(), load_average_start=load_start, load_average_end=os.getloadavg(),
                  argv=sys.argv[1:])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\n{result['dataset']}: {result['num_users']} users, {result['num_items']} items, {result['train_rows']} "
          f"train rows; K = 1 trains {result['epochs']:g} epochs ({result['reference_steps']} steps), the others "
          f"the same training time at the measured step times\n")
    print(table(result, args.cutoff))


if __name__ == "__main__":
    main()
