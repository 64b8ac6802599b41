"""The per-user rules that turn a log's rows into train, valid and test rows: one implementation for every path.

Every rule here looks only at one user's rows (their items, timestamps, positions in the log and given split
flags), never at other users. That is what lets the same code run

* in memory on a whole log (`data.assemble`, all users at once),
* out of core on chunks of complete users streamed in user order (`data.prepared.local`), and
* in an Apache Beam pipeline after a group-by-user (`data.prepared.beam`),

and give the same rows in the same order on all three. The rules, in the order they apply:

1. Duplicates (`drop_duplicates`): a repeated (user, item) pair is dropped; the earliest row is kept, equal
   timestamps ordered by position in the log.
2. `min_user_interactions`: users with fewer remaining rows are dropped.
3. Split: "given" keeps the source's test flags; "temporal" holds out each user's latest rows (`split.tail_counts`).
4. Validation (`valid_fraction` > 0): the same tail rule on each user's train rows.

Order: equal timestamps of a user are ordered by a pseudo-random key of (`split_seed`, the row's position in
the log) (`split.tie_keys`), a hash rather than a permutation of all rows so a chunk or a Beam worker computes it
for its own rows. Train and valid rows of a temporal split follow that order; those of a given split keep the
log's order among equal timestamps (the file order of a LightGCN line), and only the choice of validation rows
uses the key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data import split as splitlib
from data.errors import DataError
from data.split import tie_keys

def _order(user, ts, key) -> np.ndarray:
    """int64 order of the rows by (user, ts, key); `key` breaks ties (distinct per row).

    Rows already in (user, time) order without ties (generated logs) need no sort; otherwise a sort by `key`
    then a stable sort by one packed (user, ts) key, about twice as fast as a three-key `np.lexsort`."""
    if splitlib._sorted_without_ties(user, ts):
        return np.arange(user.shape[0], dtype=np.int64)
    pre = None if np.all(key[1:] > key[:-1]) else np.argsort(key)      # keys are distinct: any sort will do
    if pre is None:
        return splitlib._stable_order(user, ts).astype(np.int64)
    return pre[splitlib._stable_order(user[pre], ts[pre])].astype(np.int64)


@dataclass
class Parts:
    """Row indices (into the input arrays) of each split, each in canonical (user, time) order.

    Attributes:
      train, test: int64 [n] indices.
      valid: int64 [n] indices, or None when `valid_fraction` is 0.
    """

    train: np.ndarray
    valid: np.ndarray | None
    test: np.ndarray


def split_rows(user: np.ndarray, item: np.ndarray, ts: np.ndarray, row_id: np.ndarray, is_test: np.ndarray | None,
               cfg, num_users: int, num_items: int, stats: dict) -> Parts:
    """Applies the module's rules to whole users.

    Args:
      user: int [N] user codes in [0, num_users); every user's rows must all be present (a complete user).
      item: int [N] item codes in [0, num_items).
      ts: int64 [N] timestamps (zeros when the source has none).
      row_id: int64 [N] each row's position in the whole log (distinct): orders equal timestamps.
      is_test: bool [N] the source's test flags, or None.
      cfg: the data config (`drop_duplicates`, `min_user_interactions`, `split`, `test_fraction`,
        `valid_fraction`, `split_seed`).
      num_users, num_items: bounds of the codes.
      stats: receives `filtered` counts ({"duplicates", "min_user_interactions"}: added to existing values),
        `duplicate_rows` (repeats left after rule 1), `users_filtered_min_interactions` and `split` (added up
        over calls, so chunks accumulate into one report).

    Returns:
      the `Parts`; rows in none of them were filtered (and counted).
    """
    n = user.shape[0]
    user = np.asarray(user, np.int64)
    item = np.asarray(item, np.int64)
    ts = np.asarray(ts, np.int64)
    row_id = np.asarray(row_id, np.int64)
    filtered = stats.setdefault("filtered", {})
    by_log = _order(user, ts, row_id)                   # (user, time, position in the log)
    keep = np.ones(n, dtype=bool)
    if cfg.drop_duplicates:
        dup = splitlib.duplicate_mask(user, item, num_items, by_log)
        filtered["duplicates"] = filtered.get("duplicates", 0) + int(dup.sum())
        keep &= ~dup
    stats["duplicate_rows"] = stats.get("duplicate_rows", 0) + splitlib.count_duplicates(user[keep], item[keep],
                                                                                         num_items)
    counts = np.bincount(user[keep], minlength=num_users)
    if cfg.min_user_interactions > 1:
        low = (counts > 0) & (counts < cfg.min_user_interactions)
        dropped = keep & low[user]
        filtered["min_user_interactions"] = filtered.get("min_user_interactions", 0) + int(dropped.sum())
        stats["users_filtered_min_interactions"] = stats.get("users_filtered_min_interactions", 0) + int(low.sum())
        keep &= ~dropped
    mode = cfg.split or ("given" if is_test is not None else "temporal")
    stats["split"] = mode
    keys = tie_keys(cfg.split_seed, row_id)
    if mode == "given":
        if is_test is None:
            raise DataError("data.split is 'given' but this source has no test split; use split: temporal")
        kept = by_log[keep[by_log]]
        flags = np.asarray(is_test, bool)[kept]
        train, test = kept[~flags], kept[flags]
    else:
        by_key = _order(user, ts, keys)
        kept = by_key[keep[by_key]]
        held = splitlib.tail_mask(user[kept], num_users, cfg.test_fraction)
        train, test = kept[~held], kept[held]
    valid = None
    if cfg.valid_fraction > 0:
        ranked = train[_order(user[train], ts[train], keys[train])]
        held = np.zeros(n, dtype=bool)
        held[ranked] = splitlib.tail_mask(user[ranked], num_users, cfg.valid_fraction)
        train, valid = train[~held[train]], train[held[train]]
    return Parts(train, valid, test)


def user_codes_sorted(user_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct raw ids in sorted order, int64 codes) of a chunk whose rows are grouped by user."""
    ids, codes = np.unique(user_raw, return_inverse=True)
    return ids, codes.astype(np.int64).reshape(-1)
