"""Conditional retrieval on MovieLens with the genre as the interest: per-genre recall@k of the conditioned user
tower against single-embedding retrieval + post-filtering (`eval.conditional`).

Two runs of `+experiment=movielens` with the same data, steps and seed: one with `model.user.condition=genres`
(the genre of each positive enters the user tower; `condition_dropout` of them are fed 'no condition'), one
without. Each (held-out user, genre of one of the user's held-out movies) query ranks only that genre's movies:

- conditioned: the conditional tower fed the genre;
- post-filter (same model): the conditional tower fed no condition, its ranking filtered to the genre;
- post-filter (plain model): the unconditioned run's embedding, its ranking filtered to the genre;
- the plain model's top-(5k) post-filtered: what a search without filters serves (an unfiltered ANN list of
  depth 5k, filtered to the genre; short when the genre is rare among the user's top items).

Choices are made on the validation slice (`data.valid_fraction`); the test split is reported for the final
table. The long tail = genres whose movies hold fewer training ratings than the median genre's.

  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_conditional.py                       # ml-latest-small
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_conditional.py --epochs 5 model.user.condition_dropout=0.3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(data_path: str, run_dir: str, *, epochs: float, valid_fraction: float, overrides: tuple[str, ...]):
    """Trains `+experiment=movielens` with `overrides`; returns (config, training seconds)."""
    from tests.helpers import compose_cfg
    from train.config import validate
    from train.loop import run

    c = validate(compose_cfg("+experiment=movielens", f"data.path={data_path}", f"train.num_epochs={epochs}",
                             f"data.valid_fraction={valid_fraction}", "train.progress=false", "eval.at_end=false",
                             "checkpoint.async_save=false", *overrides))
    t0 = time.perf_counter()
    run(c, run_dir)
    return c, time.perf_counter() - t0


def measure(cond_dir: str, plain_dir: str, c, split: str, ks: list[int]) -> dict:
    """`eval.conditional.evaluate_conditional` of the conditional run, with both post-filter baselines."""
    from data.load import load
    from eval.conditional import evaluate_conditional
    from eval.holdout import heldout_users
    from towers.inference.embed import embed_items, embed_users
    from towers.restore import load_trained

    ds = load(c.data)
    users = heldout_users(ds, split)
    cond, plain = load_trained(cond_dir), load_trained(plain_dir)
    h = c.data.history_len
    name = c.model.user.condition
    fn = lambda rows, codes: embed_users(cond, ds, rows, history_len=h, condition=codes)  # noqa: E731
    same = evaluate_conditional(fn, embed_items(cond, ds), ds, users, name, ks, split=split)
    depth = 5 * max(ks)
    base = embed_users(plain, ds, users, history_len=h)
    other = evaluate_conditional(lambda rows, codes: embed_users(plain, ds, rows, history_len=h), embed_items(plain, ds),
                                 ds, users, name, ks, split=split, baseline_user_emb=base, post_filter_depths=(depth,))
    for key, theirs in (("post_filter_plain", "post_filter"), ("post_filter_plain_top", f"post_filter@{depth}")):
        same[key] = other[theirs]
        same["tail"][key] = other["tail"][theirs]
        for mine, their in zip(same["per_value"], other["per_value"]):
            mine[key] = their[theirs]
    same["depth"] = depth
    return same


def table(r: dict, k: int) -> str:
    key = f"recall@{k}"
    rows = [("all", r["num_queries"], r), ("long tail", sum(v["queries"] for v in r["per_value"]
                                                           if v["code"] in r["tail_values"]), r["tail"])]
    rows += [(f"{v['value']}{' (tail)' if v['code'] in r['tail_values'] else ''}", v["queries"], v)
             for v in sorted(r["per_value"], key=lambda v: -v["train_interactions"])]
    out = [f"| genre | queries | conditioned {key} | post-filter, same model | post-filter, plain model | "
           f"plain model's top-{r['depth']} post-filtered |", "| --- | --- | --- | --- | --- | --- |"]
    out += [f"| {name} | {n} | {m['conditional'][key]:.4f} | {m['post_filter'][key]:.4f} | "
            f"{m['post_filter_plain'][key]:.4f} | {m['post_filter_plain_top'][key]:.4f} |" for name, n, m in rows]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.environ.get("TWOTOWER_DATA_DIR", "."), "ml-latest-small"))
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="extra overrides of both runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        cond_dir, plain_dir = os.path.join(work, "cond"), os.path.join(work, "plain")
        c, t_cond = train(args.data, cond_dir, epochs=args.epochs, valid_fraction=args.valid_fraction,
                          overrides=("model.user.condition=genres", *args.overrides))
        _, t_plain = train(args.data, plain_dir, epochs=args.epochs, valid_fraction=args.valid_fraction,
                           overrides=tuple(args.overrides))
        print(f"training: conditional {t_cond:.0f} s, plain {t_plain:.0f} s", flush=True)
        results = {}
        for split in ("valid", "test"):
            results[split] = measure(cond_dir, plain_dir, c, split, [args.k, 50])
            print(f"\n{split} split\n" + table(results[split], args.k), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train_seconds": {"conditional": t_cond, "plain": t_plain}, **results}, f, indent=1)


if __name__ == "__main__":
    main()
