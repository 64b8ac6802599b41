"""Cold items: how well the item tower retrieves items it never saw in training, from their features alone.

Protocol: `data.cold_item_fraction` of the items (a seeded permutation) are held out of training entirely and
all their interactions moved to test. After training, each cold item is embedded from its features (ID row
-1, see `towers.inference.embed.trained_item_rows`), and each user with a held-out cold item ranks ONLY the C
cold items. Recall@k (|top-k ∩ H| / |H|, H = the user's held-out cold items) is compared with a random ranking
of the same C items, whose expected recall@k is exactly min(k, C) / C for every user. For reference the same
cold items are also ranked with their own (never positively trained) ID rows.

  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_cold_items.py                # ml-100k, 20 epochs
  TWOTOWER_DATA_DIR=../shared/data python scripts/bench_cold_items.py --epochs 3 --fraction 0.2
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

from data.batching import item_audience_mean, user_history  # noqa: E402
from eval.metrics import recall_at_k  # noqa: E402
from towers.embed import embed_items, embed_users  # noqa: E402
from towers.inference.embed import trained_item_rows  # noqa: E402
from towers.two_tower import feature_names  # noqa: E402


def cold_truth(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Users with held-out cold items and those items.

    Returns:
      (users int32 [Q], truth_indptr int64 [Q + 1], truth_items int32 [nnz]): each user's distinct cold test
      items (global item rows), users in row order.
    """
    indptr, items = ds.test_csr()
    user_of = np.repeat(np.arange(ds.num_users), np.diff(indptr))
    cold = np.isin(items, ds.cold_items)
    key = np.unique(user_of[cold].astype(np.int64) * ds.num_items + items[cold])
    user, item = key // ds.num_items, (key % ds.num_items).astype(np.int32)
    users, counts = np.unique(user, return_counts=True)
    truth_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return users.astype(np.int32), truth_indptr, item


def _user_embeddings(trained, ds, users: np.ndarray, history_len: int) -> np.ndarray:
    model = trained.model
    names = feature_names(model)[0]
    history = user_history(ds, users, history_len) if model.user.use_history else None
    user_table = trained.tables.get("user") if model.user.use_id else None
    return embed_users(trained.graphdef, trained.params, user_table, trained.tables.get("item"), users,
                       {k: ds.user_features[k][users] for k in names}, history)


def _item_embeddings(trained, ds, rows: np.ndarray) -> np.ndarray:
    names = feature_names(trained.model)[1]
    table = trained.tables.get("item") if trained.model.item.use_id else None
    feats = {k: ds.item_features[k][ds.cold_items] for k in names}
    # Cold items have no train users, so an audience-pooling tower gets an empty audience for each.
    audience = item_audience_mean(ds, trained.tables["user"], ds.cold_items) if trained.model.item.use_history \
        else None
    return embed_items(trained.graphdef, trained.params, table, rows, feats, audience=audience)


def cold_item_recall(trained, ds, ks=(20, 100), *, history_len: int = 50) -> dict:
    """Recall@k of ranking only the cold items, next to the exact expectation of a random ranking.

    Args:
      trained: a `towers.restore.TrainedModel` trained on `ds` (with `cold_item_fraction` > 0).
      ks: cut-offs.
      history_len: user-history items fed to the user tower (the run's `data.history_len`).

    Returns:
      {"num_cold_items": C, "num_users": Q, "features_only": {"recall@k": mean}, "own_id_row": {...},
       "random": {"recall@k": min(k, C) / C}}.
    """
    cold = ds.cold_items
    if cold.size == 0:
        raise ValueError(f"dataset {ds.name!r} has no cold items; load it with data.cold_item_fraction > 0")
    if np.isin(ds.train.item, cold).any():
        raise ValueError("cold items appear in the train split; the dataset is not a cold-item split")
    users, truth_indptr, truth_items = cold_truth(ds)
    user_emb = _user_embeddings(trained, ds, users, history_len)
    kmax = min(max(ks), cold.size)
    out = {"num_cold_items": int(cold.size), "num_users": int(users.size)}
    for name, rows in (("features_only", trained_item_rows(cold, ds.item_counts())),
                       ("own_id_row", cold.astype(np.int32))):
        scores = user_emb @ _item_embeddings(trained, ds, rows).T
        ranked = cold[np.argsort(-scores, axis=1, kind="stable")[:, :kmax]]
        per_user = recall_at_k(ranked, truth_indptr, truth_items, [min(k, kmax) for k in ks])
        out[name] = {f"recall@{k}": float(per_user[min(k, kmax)].mean()) for k in ks}
    out["random"] = {f"recall@{k}": min(k, cold.size) / cold.size for k in ks}
    return out


def train_and_measure(data_path: str, run_dir: str, *, fraction: float = 0.1, seed: int = 0, epochs: float = 20,
                      ks=(20, 100), extra: tuple[str, ...] = ()) -> dict:
    """Trains `+experiment=movielens` on `data_path` with cold items held out, then `cold_item_recall`."""
    from data.load import load
    from tests.helpers import compose_cfg
    from towers.restore import load_trained
    from train.config import validate
    from train.loop import run

    c = validate(compose_cfg("+experiment=movielens", f"data.path={data_path}",
                             f"data.cold_item_fraction={fraction}", f"data.cold_item_seed={seed}",
                             f"train.num_epochs={epochs}", "train.progress=false", "eval.at_end=false",
                             "checkpoint.async_save=false", *extra))
    t0 = time.perf_counter()
    run(c, run_dir)
    train_seconds = time.perf_counter() - t0
    ds = load(c.data)
    result = cold_item_recall(load_trained(run_dir), ds, ks, history_len=c.data.history_len)
    result.update(train_seconds=round(train_seconds, 1), epochs=epochs, cold_item_fraction=fraction,
                  cold_item_seed=seed, dataset=ds.name, num_items=ds.num_items,
                  cold_test_rows=ds.stats["cold_item_test_rows"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="ml-100k", help="MovieLens directory (relative: under $TWOTOWER_DATA_DIR)")
    ap.add_argument("--fraction", type=float, default=0.1, help="data.cold_item_fraction")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="data.cold_item_seed values, one run each")
    ap.add_argument("--epochs", type=float, default=20,
                    help="train.num_epochs (BENCHMARKS.md's figures used 20; the experiment's own is 15)")
    ap.add_argument("overrides", nargs="*", help="extra training overrides, e.g. model.item.id_dropout=0.3")
    args = ap.parse_args()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as work:
            r = train_and_measure(args.data, work, fraction=args.fraction, seed=seed, epochs=args.epochs,
                                  extra=tuple(args.overrides))
        results.append(r)
        print(json.dumps(r))
        print(f"seed {seed}: {r['num_cold_items']} cold items, {r['num_users']} users; recall@100 from features "
              f"{r['features_only']['recall@100']:.4f} vs random {r['random']['recall@100']:.4f} (own ID row "
              f"{r['own_id_row']['recall@100']:.4f}); recall@20 {r['features_only']['recall@20']:.4f} vs random "
              f"{r['random']['recall@20']:.4f}; train {r['train_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
