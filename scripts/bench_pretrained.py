"""Pre-trained, frozen ID tables with element-wise dropout (Pinterest's homefeed recipe), measured on MovieLens.

The ratings are cut in time at the median timestamp. A pre-training run learns user and item ID tables on the
early half; the two-tower runs train on the late half (its own temporal split: each user's latest 20% are
test, and a validation slice of the train part for choosing), starting from those tables or not:

- scratch: no pre-trained tables;
- pretrained, fine-tuned: initialised from the early run, trained further;
- pretrained, frozen: initialised and frozen (`table.freeze`), no dropout;
- pretrained, frozen, dropout 0.5: frozen with element-wise dropout p = 0.5 on both ID rows
  (`id_dropout_elementwise`), the recipe Pinterest reports;
- overlapping window: the same recipe from a run pre-trained on ALL ratings (its window overlaps the late
  half's, so `allow_window_overlap` has to be set): the snapshot choice Pinterest avoids.

Ids the early run never saw keep their fresh initialisation (frozen ones stay random: the towers fall back on
the genres and the history). Every run is `+experiment=movielens`'s model and loss (history, 20 epochs) on the
`parquet` source with the movie genres as a multi-hot item feature.

  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_pretrained.py            # ml-latest-small
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

COMMON = ("data=parquet", "data.item_feature_columns=[genres]", "data.history_len=50", "data.split=temporal",
          "data.test_fraction=0.2", "train.global_batch_size=512", "loss.num_negatives=512", "loss.temperature=0.2",
          "train.progress=false", "checkpoint.async_save=false", "eval.ks=[20,50]")


def write_logs(ratings_csv: str, movies_csv: str, out: str) -> dict:
    """early.parquet (ratings before the median timestamp), late.parquet (the rest), all.parquet; each row
    user_id, item_id, timestamp, genres (list of strings)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    r = pcsv.read_csv(ratings_csv)
    m = pcsv.read_csv(movies_csv)
    genres = {int(i): g.split("|") for i, g in zip(m["movieId"].to_pylist(), m["genres"].to_pylist())}
    ts = r["timestamp"].to_numpy()
    cut = int(np.median(ts))
    table = pa.table({"user_id": r["userId"], "item_id": r["movieId"], "timestamp": r["timestamp"],
                      "genres": pa.array([genres.get(int(i), []) for i in r["movieId"].to_pylist()],
                                         pa.list_(pa.string()))})
    paths = {}
    for name, mask in (("early", ts < cut), ("late", ts >= cut), ("all", np.ones(len(ts), bool))):
        paths[name] = os.path.join(out, f"{name}.parquet")
        pq.write_table(table.filter(pa.array(mask)), paths[name])
    return {"cut": cut, **paths, "rows": {k: int(pq.read_metadata(v).num_rows) for k, v in paths.items()}}


def train(log: str, run_dir: str, *overrides: str, valid: float = 0.1, epochs: float = 20) -> dict:
    from tests.helpers import compose_cfg
    from train.config import validate
    from train.loop import run

    c = validate(compose_cfg(*COMMON, f"data.path={log}", f"data.valid_fraction={valid}",
                             f"train.num_epochs={epochs}", *overrides))
    t0 = time.perf_counter()
    result = run(c, run_dir)
    return {"seconds": round(time.perf_counter() - t0, 1), "test": result["eval"]["model"], "config": c}


def valid_metrics(run_dir: str) -> dict:
    from eval.config import validate
    from eval.run import run

    m = run(validate({"run_dir": run_dir, "split": "valid", "ks": [20, 50], "plots": False,
                      "baselines": {"ease": False}}))
    return m["methods"]["model"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.environ.get("TWOTOWER_DATA_DIR", "."), "ml-latest-small"))
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        logs = write_logs(os.path.join(args.data, "ratings.csv"), os.path.join(args.data, "movies.csv"), work)
        print(f"cut at {logs['cut']}: {logs['rows']}", flush=True)
        early, overlap = os.path.join(work, "early_run"), os.path.join(work, "all_run")
        pre = train(logs["early"], early, valid=0.0, epochs=args.epochs)
        train(logs["all"], overlap, valid=0.0, epochs=args.epochs)
        both = lambda src, *kw: [f"model.{t}.table.{k}" for t in ("user", "item") for k in  # noqa: E731
                                 [f"pretrained={src}", *kw]]
        variants = [
            ("scratch", []),
            ("pretrained, fine-tuned", both(early)),
            ("pretrained, frozen", both(early, "freeze=true")),
            ("pretrained, frozen, dropout 0.5", both(early, "freeze=true")
             + ["model.user.id_dropout_elementwise=0.5", "model.item.id_dropout_elementwise=0.5"]),
            ("overlapping window, frozen, dropout 0.5", both(overlap, "freeze=true", "allow_window_overlap=true")
             + ["model.user.id_dropout_elementwise=0.5", "model.item.id_dropout_elementwise=0.5"]),
        ]
        for name, overrides in variants:
            run_dir = os.path.join(work, name.replace(" ", "_").replace(",", ""))
            r = train(logs["late"], run_dir, *overrides, epochs=args.epochs)
            v = valid_metrics(run_dir)
            row = {"variant": name, "seconds": r["seconds"], "valid_recall@20": v["recall@20"],
                   "valid_ndcg@20": v["ndcg@20"], "test_recall@20": r["test"]["recall@20"],
                   "test_ndcg@20": r["test"]["ndcg@20"], "overrides": overrides}
            pretrained = os.path.join(run_dir, "pretrained.json")
            if os.path.exists(pretrained):
                row["pretrained"] = json.load(open(pretrained))
            rows.append(row)
            print(f"{name}: valid R@20 {row['valid_recall@20']:.4f}, test R@20 {row['test_recall@20']:.4f} "
                  f"N@20 {row['test_ndcg@20']:.4f} ({r['seconds']:.0f} s)", flush=True)
    print("\n| variant | valid R@20 | valid N@20 | test R@20 | test N@20 | train s |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['valid_recall@20']:.4f} | {r['valid_ndcg@20']:.4f} | {r['test_recall@20']:.4f} "
              f"| {r['test_ndcg@20']:.4f} | {r['seconds']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"logs": logs["rows"], "cut": logs["cut"], "pretrain_seconds": pre["seconds"], "rows": rows},
                      f, indent=1, default=str)


if __name__ == "__main__":
    main()
