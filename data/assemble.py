"""From a source's raw columns to a `Dataset`: filter, build vocabularies, align features, split (holding
out cold items when asked), count.

Every source returns a `RawLog` (raw ids, timestamps, optional given test split, optional feature tables) and
`assemble` does the rest the same way for all of them. It keeps the books: `stats["rows_read"]` always equals
the rows filtered (by reason, in `stats["filtered"]`) plus the train, valid and test rows, and a mismatch is
an internal error rather than silent loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data import peruser
from data import split as splitlib
from data.config import DataConfig
from data.errors import DataError
from data.ids import as_id_array, factorize, sorted_unique
from data.types import Dataset, FeatureSpec, Interactions, Vocab


@dataclass
class FeatureTable:
    """Side features keyed by raw id: `features[name][j]` belongs to `ids[j]`.

    Attributes:
      ids: raw ids [T], distinct.
      features: {name: array [T, ...]} matching `specs`.
      specs: the features' specs.
      source: file or table name for messages and stats.
    """

    ids: np.ndarray
    features: dict[str, np.ndarray]
    specs: list[FeatureSpec]
    source: str


@dataclass
class RawLog:
    """What a source reads, before vocabularies and splits.

    Attributes:
      name: dataset name.
      user, item: raw ids [N] (int64 or str).
      timestamp: int64 [N] or None (no time: zeros).
      is_test: bool [N] for a split given by the source, else None.
      stats: source counts; "rows_read" (default N) and "filtered" {reason: rows} are carried over.
      user_table, item_table: optional side features.
      item_catalog: True when every id of `item_table` is an item even without interactions (a movie list).
      feature_vocabs: raw values of categorical/multi-hot features, by feature name.
      row_id: int64 [N] each row's position in the source before any source-side filter (None: 0..N-1); it
        orders equal timestamps (`data.peruser`), so an out-of-core job reading the same files agrees.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray | None = None
    is_test: np.ndarray | None = None
    stats: dict = field(default_factory=dict)
    user_table: FeatureTable | None = None
    item_table: FeatureTable | None = None
    item_catalog: bool = False
    feature_vocabs: dict = field(default_factory=dict)
    row_id: np.ndarray | None = None


def _vocab_for(raw_ids: np.ndarray, catalog: FeatureTable | None, what: str) -> Vocab:
    ids = sorted_unique(raw_ids)
    if catalog is not None:
        cat_ids = as_id_array(catalog.ids, f"{catalog.source} ids")
        if cat_ids.dtype.kind != ids.dtype.kind and ids.size and cat_ids.size:
            raise DataError(f"{what} ids in the log are {ids.dtype} but {catalog.source} has {cat_ids.dtype}")
        ids = sorted_unique(np.concatenate([ids, cat_ids])) if ids.size else sorted_unique(cat_ids)
    return Vocab(ids)


def _default_fill(spec: FeatureSpec, rows: int) -> np.ndarray:
    if spec.kind == "dense":
        return np.zeros((rows, spec.size), dtype=np.float32)
    if spec.kind == "multihot":
        return np.full((rows, spec.max_len), -1, dtype=np.int32)
    return np.zeros(rows, dtype=np.int32)  # code 0 is "unknown" for categoricals built from raw values


def align_features(table: FeatureTable | None, vocab: Vocab, side: str, stats: dict):
    """Feature arrays indexed by vocabulary row; rows absent from the table get code 0 / -1 / 0.0.

    Returns:
      ({name: array [len(vocab), ...]}, specs).
    """
    if table is None:
        return {}, []
    try:
        Vocab(table.ids)
    except DataError as e:
        raise DataError(f"{table.source}: {e}") from None
    pos = vocab.lookup(as_id_array(table.ids, f"{table.source} ids"), missing="minus_one")
    ok = pos >= 0
    covered = np.zeros(len(vocab), dtype=bool)
    covered[pos[ok]] = True
    stats[f"{side}s_without_features"] = int(len(vocab) - covered.sum())
    stats[f"{side}s_in_{table.source}_unused"] = int((~ok).sum())
    out = {}
    for spec in table.specs:
        arr = _default_fill(spec, len(vocab))
        arr[pos[ok]] = table.features[spec.name][ok]
        out[spec.name] = arr
    return out, list(table.specs)


def _cold_split(user, item, ts, parts, cfg: DataConfig, num_items: int, stats: dict):
    """Holds the cold items (`cold_item_fraction`) out of train and valid; returns (parts, cold item rows)."""
    cold = splitlib.pick_cold_items(item, num_items, cfg.cold_item_fraction, cfg.cold_item_seed)
    if cold.size == 0:
        return parts, cold
    train_idx, valid_idx, test_idx, moved = splitlib.hold_out_items(user, item, ts, *parts, cold)
    # Moved rows stay counted (now as test), so rows_read still equals filtered + train + valid + test.
    stats.update(cold_items=int(cold.size), cold_item_rows_moved_to_test=moved,
                 cold_item_test_rows=int(np.isin(item[test_idx], cold).sum()))
    return (train_idx, valid_idx, test_idx), cold


def _columns(raw: RawLog, cfg: DataConfig):
    """Checked raw columns and the stats so far."""
    user_raw = as_id_array(raw.user, "user ids")
    item_raw = as_id_array(raw.item, "item ids")
    n = user_raw.shape[0]
    ts = np.zeros(n, np.int64) if raw.timestamp is None else np.asarray(raw.timestamp, dtype=np.int64)
    if not (item_raw.shape[0] == ts.shape[0] == n) or (raw.is_test is not None and raw.is_test.shape[0] != n):
        raise DataError(f"{raw.name}: user, item, timestamp and split columns differ in length")
    stats = {"source": cfg.source, "name": raw.name, **raw.stats}
    stats.setdefault("rows_read", n)
    stats["filtered"] = dict(raw.stats.get("filtered", {}))
    if n == 0:
        raise DataError(f"{raw.name}: no interactions left to load (rows read: {stats['rows_read']}, "
                        f"filtered: {stats['filtered']})")
    is_test = None if raw.is_test is None else np.asarray(raw.is_test, dtype=bool)
    return user_raw, item_raw, ts, is_test, stats


def assemble(raw: RawLog, cfg: DataConfig) -> Dataset:
    """Builds the `Dataset` for a source's `RawLog` under the config's filter and split keys.

    The filters and the split are `data.peruser.split_rows` on all users at once (the chunked and Beam
    preparation jobs run the same function on groups of users).

    Args:
      raw: what the source read.
      cfg: the resolved data config.

    Returns:
      a validated `Dataset` whose split rows are each in (user, time) order.
    """
    user_raw, item_raw, ts, is_test, stats = _columns(raw, cfg)
    u_ids, u_codes = factorize(user_raw)
    i_ids, i_codes = factorize(item_raw)
    row_id = np.arange(len(u_codes)) if raw.row_id is None else np.asarray(raw.row_id, np.int64)
    parts = peruser.split_rows(u_codes, i_codes, ts, row_id, is_test, cfg, len(u_ids), len(i_ids),
                               stats)
    kept = np.concatenate([p for p in (parts.train, parts.valid, parts.test) if p is not None])
    if kept.size == 0:
        raise DataError(f"{raw.name}: every interaction was filtered ({stats['filtered']}); relax the filters")
    user_vocab = Vocab(u_ids[np.bincount(u_codes[kept], minlength=len(u_ids)) > 0])
    item_vocab = _vocab_for(item_raw[kept], raw.item_table if raw.item_catalog else None, "item")
    # From here on only the kept rows, in log order (so the parts' indices become positions among them).
    kept.sort()
    at = np.zeros(len(u_codes), np.int64)
    at[kept] = np.arange(kept.size)
    user, item, ts = user_vocab.lookup(user_raw[kept]), item_vocab.lookup(item_raw[kept]), ts[kept]
    moved = tuple(None if p is None else at[p] for p in (parts.train, parts.valid, parts.test))
    (train_idx, valid_idx, test_idx), cold = _cold_split(user, item, ts, moved, cfg, len(item_vocab), stats)
    take = lambda idx: None if idx is None else Interactions(user[idx], item[idx], ts[idx])  # noqa: E731
    user_features, user_specs = align_features(raw.user_table, user_vocab, "user", stats)
    item_features, item_specs = align_features(raw.item_table, item_vocab, "item", stats)
    ds = Dataset(name=cfg.name or raw.name, train=take(train_idx), test=take(test_idx), valid=take(valid_idx),
                 user_vocab=user_vocab, item_vocab=item_vocab, user_features=user_features,
                 item_features=item_features, user_feature_specs=user_specs, item_feature_specs=item_specs,
                 stats=stats, feature_vocabs=dict(raw.feature_vocabs), cold_items=cold)
    _finish_stats(ds, stats)
    ds.validate()
    return ds


def _finish_stats(ds: Dataset, stats: dict) -> None:
    valid = 0 if ds.valid is None else len(ds.valid)
    stats.update(num_users=ds.num_users, num_items=ds.num_items, num_train=len(ds.train), num_valid=valid,
                 num_test=len(ds.test))
    counts = ds.item_counts()
    stats["items_without_train"] = int((counts == 0).sum())
    stats["users_without_test"] = int((np.bincount(ds.test.user, minlength=ds.num_users) == 0).sum())
    # Users with no train rows (only test or valid ones), as a given split or cold items can leave them.
    stats["users_without_train"] = int((np.bincount(ds.train.user, minlength=ds.num_users) == 0).sum())
    accounted = sum(stats["filtered"].values()) + len(ds.train) + valid + len(ds.test)
    if accounted != stats["rows_read"]:
        raise AssertionError(f"row accounting broke: read {stats['rows_read']}, accounted {accounted} "
                             f"({stats['filtered']}); this is a bug in the data loader")
