"""Retrieval quality on the public benchmark datasets, end to end, as a user runs it.

For each benchmark: `python -m train +experiment=NAME data.path=...` (wall time measured), then
`python -m eval run_dir=...`; the model's Recall/NDCG@{10,20,50,100}, the baselines scored in the same eval run
(most-popular, EASE up to --ease-max-items items: Gowalla's 41k-item EASE is a float32 in-place fit of about
13 minutes on one core, 7.9 GB) and the published numbers are written as a table between
the QUALITY markers of BENCHMARKS.md (or printed only, with --no-write).

  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_quality.py                 # gowalla and ml-100k
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_quality.py --only ml-100k --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- QUALITY:BEGIN -->", "<!-- QUALITY:END -->"

# Published recall@20 / ndcg@20 on the same protocols (see the issue and BENCHMARKS.md for sources).
PUBLISHED = {
    "gowalla": {"LightGCN": (0.1830, 0.1554), "SimpleX": (0.1872, 0.1557), "BSL (MF + softmax)": (0.1882, 0.1584),
                "YoutubeDNN two-tower": (0.1754, 0.1473)},
    "ml-100k": {"EASE (issue's measurement)": (0.2107, None), "iALS": (0.2034, None),
                "TFRS two-tower + logQ": (0.2055, None), "most-popular": (0.1043, None)},
}
BENCHES = {"gowalla": ("lightgcn", "gowalla"), "ml-100k": ("movielens", "ml-100k")}
# EASE's L2 weight per dataset, chosen like every model setting on the dataset's validation slice
# (data.valid_fraction=0.1, `python -m eval split=valid`; the grids and scores are in BENCHMARKS.md).
EASE_LAMBDA = {"gowalla": 70.0, "ml-100k": 100.0}


def run(cmd: list[str], log: pathlib.Path) -> float:
    """Runs a command (output to `log`), returns its wall time; raises with the log's tail on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}:\n" + log.read_text()[-2000:])
    return time.perf_counter() - t0


def bench(name: str, data_dir: str, work: pathlib.Path, ease_max_items: int) -> dict:
    experiment, folder = BENCHES[name]
    run_dir = work / name
    train_s = run([sys.executable, "-m", "train", f"+experiment={experiment}", f"data.path={data_dir}/{folder}",
                   f"hydra.run.dir={run_dir}", "train.progress=false"], work / f"{name}.train.log")
    eval_s = run([sys.executable, "-m", "eval", f"run_dir={run_dir}", f"out_dir={run_dir}/eval",
                  "plots=false"] + ([f"baselines.ease_max_items={ease_max_items}",
                                     f"baselines.ease_lambda={EASE_LAMBDA[name]}"] if ease_max_items
                                    else ["baselines.ease=false"]),
                 work / f"{name}.eval.log")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {"name": name, "experiment": experiment, "train_seconds": train_s, "eval_seconds": eval_s,
            "metrics": metrics}


def table(results: list[dict]) -> str:
    ks = (10, 20, 50, 100)
    head = "| dataset | method | " + " | ".join(f"R@{k}" for k in ks) + " | " + " | ".join(f"N@{k}" for k in ks) \
        + " | train wall |\n|" + " --- |" * (3 + 2 * len(ks)) + "\n"
    rows = []
    for r in results:
        for method, m in r["metrics"]["methods"].items():
            wall = f"{r['train_seconds'] / 60:.1f} min" if method == "model" else ""
            rows.append(f"| {r['name']} | {method} | " + " | ".join(f"{m.get(f'recall@{k}', float('nan')):.4f}"
                        for k in ks) + " | " + " | ".join(f"{m.get(f'ndcg@{k}', float('nan')):.4f}" for k in ks)
                        + f" | {wall} |")
        for method, (rec, ndcg) in PUBLISHED[r["name"]].items():
            rows.append(f"| {r['name']} | published: {method} | | {rec:.4f} | | | | "
                        f"{'' if ndcg is None else f'{ndcg:.4f}'} | | | |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=sorted(BENCHES))
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    ap.add_argument("--work", default=None, help="where runs go (default: a temp dir)")
    ap.add_argument("--ease-max-items", type=int, default=50_000,
                    help="EASE baseline up to this many items (Gowalla has 40,981); 0 skips it everywhere")
    args = ap.parse_args()
    data_dir = os.environ.get("TWOTOWER_DATA_DIR")
    if not data_dir:
        raise SystemExit("set TWOTOWER_DATA_DIR to the directory holding gowalla/ and ml-100k/")
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.only:
        print(f"{name}: training and evaluating (logs in {work}) ...", flush=True)
        results.append(bench(name, data_dir, work, args.ease_max_items))
        print(f"{name}: recall@20 {results[-1]['metrics']['methods']['model']['recall@20']:.4f}, "
              f"train {results[-1]['train_seconds']:.0f} s", flush=True)
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
              f"({os.cpu_count()} CPUs) by `TWOTOWER_DATA_DIR=... python scripts/bench_quality.py`.\n\n")
    text = header + table(results)
    print(text)
    if not args.no_write:
        doc = BENCHMARKS.read_text()
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN) + len(BEGIN)] + "\n" + text + doc[doc.index(END):]
        else:
            doc += f"\n## Retrieval quality (`scripts/bench_quality.py`)\n\n{BEGIN}\n{text}{END}\n"
        BENCHMARKS.write_text(doc)
        print(f"wrote {BENCHMARKS}")


if __name__ == "__main__":
    main()
