"""Out-of-core preparation of a Parquet log on one machine, with DuckDB doing the one global sort.

Two passes, each holding one chunk of users at a time:

1. DuckDB reads the Parquet files and streams the rows sorted by (user id, timestamp, position in the log),
   spilling to disk beyond `memory_limit`. Python cuts the stream into chunks of complete users and applies
   `data.peruser.split_rows` to each (the rules every path shares); the kept rows, labelled train/valid/test in
   canonical order, go to intermediate Parquet files.
2. The item vocabulary and train counts are one DuckDB aggregate over the intermediate files (memory grows with
   items); then the intermediate files are read again in user order and each user becomes one record
   (`write.ShardWriter`).

Memory grows with the number of users and items (vocabularies, per-user counts) and with the chunk size, never
with the number of interactions.
"""
from __future__ import annotations

import logging
import os
import pathlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from data import peruser
from data.errors import DataError
from data.ids import as_id_array
from data.paths import resolve_path
from data.prepared import write
from data.types import Vocab

log = logging.getLogger(__name__)
_PART = {"train": 0, "valid": 1, "test": 2}


def parquet_files(path: pathlib.Path) -> list[str]:
    """The log's Parquet files in the order the in-memory loader reads them (pyarrow's dataset order)."""
    try:
        files = pads.dataset(str(path), format="parquet").files
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    if not files:
        raise DataError(f"{path}: no Parquet files")
    return list(files)


def _check_columns(files: list[str], cfg) -> dict:
    """Checks the configured columns exist in every file; returns {file: rows}."""
    if cfg.user_feature_columns or cfg.item_feature_columns:
        raise DataError("data.user_feature_columns / item_feature_columns are not supported by the out-of-core "
                        "preparation yet; prepare with engine=memory (reads the log whole) or drop them")
    rows = {}
    need = [cfg.user_column, cfg.item_column] + ([cfg.rating_column] if cfg.min_rating is not None else [])
    if cfg.min_rating is not None and not cfg.rating_column:
        raise DataError("data.min_rating is set but data.rating_column is not; name the rating column")
    for f in files:
        try:
            meta = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f}: cannot read as Parquet ({e})") from None
        names = meta.schema_arrow.names
        for col in need:
            if col not in names:
                raise DataError(f"{f}: no column {col!r}; columns are {names}")
        if cfg.timestamp_column and cfg.timestamp_column not in names and cfg.timestamp_column != "timestamp":
            raise DataError(f"{f}: no column {cfg.timestamp_column!r} for timestamp_column; columns are {names}")
        rows[f] = meta.metadata.num_rows
    return rows


def _connect(tmp: pathlib.Path, memory_limit: str, threads: int):
    import duckdb
    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_limit}'")
    con.execute(f"SET temp_directory='{tmp}'")
    con.execute(f"SET threads={int(threads)}")
    con.execute("SET preserve_insertion_order=false")
    return con


def _source_sql(files: list[str], rows: dict, cfg, has_ts: bool) -> str:
    offsets = np.concatenate([[0], np.cumsum([rows[f] for f in files])[:-1]])
    values = ", ".join(f"('{f}', {int(o)})" for f, o in zip(files, offsets))
    ts = f'CAST("{cfg.timestamp_column}" AS BIGINT)' if has_ts else "CAST(0 AS BIGINT)"
    where = f'WHERE "{cfg.rating_column}" >= {float(cfg.min_rating)!r}' if cfg.min_rating is not None else ""
    file_list = ", ".join(f"'{f}'" for f in files)
    return (f'SELECT "{cfg.user_column}" AS u, "{cfg.item_column}" AS i, {ts} AS t, '
            f"o.off + file_row_number AS r FROM read_parquet([{file_list}], filename=true, file_row_number=true) "
            f"JOIN (VALUES {values}) o(fname, off) ON filename = o.fname {where}")


def _null_check(con, files, cfg):
    for col in (cfg.user_column, cfg.item_column):
        for f in files:
            row = con.execute(f"SELECT min(file_row_number) FROM read_parquet('{f}', file_row_number=true) "
                              f'WHERE "{col}" IS NULL').fetchall()[0][0]
            if row is not None:
                raise DataError(f"{f}: column {col!r} has a null id in data row {row + 1}; every interaction "
                                "needs a user and an item id")


def _chunks(reader, chunk_rows: int):
    """Yields dicts of numpy columns holding complete users (the stream is sorted by user)."""
    pending = None
    for batch in reader:
        cols = {k: batch.column(k).to_numpy(zero_copy_only=False) for k in ("u", "i", "t", "r")}
        if pending is not None:
            cols = {k: np.concatenate([pending[k], cols[k]]) for k in cols}
        u = cols["u"]
        if len(u) < chunk_rows:
            pending = cols
            continue
        last = u[-1]
        cut = int(np.searchsorted(u, last, side="left")) if u.dtype.kind != "O" else _first_of_last(u)
        if cut == 0:                       # one user spans the whole buffer: keep reading
            pending = cols
            continue
        yield {k: v[:cut] for k, v in cols.items()}
        pending = {k: v[cut:] for k, v in cols.items()}
    if pending is not None and len(pending["u"]):
        yield pending


def _first_of_last(u: np.ndarray) -> int:
    same = np.flatnonzero(u != u[-1])
    return 0 if same.size == 0 else int(same[-1]) + 1


def prepare_parquet(cfg, out: os.PathLike, *, num_shards: int, config: dict, chunk_rows: int = 2_000_000,
                    memory_limit: str = "2GB", threads: int | None = None) -> dict:
    """Prepares the Parquet log `cfg.path` into `out` out of core; returns the manifest.

    Args:
      cfg: the resolved `DataConfig` (source parquet).
      out: the output directory (created; a re-run of the same preparation keeps finished shards).
      num_shards: shard files to write.
      config: the config recorded in the manifest (and compared on a re-run).
      chunk_rows: rows per chunk of users in Python (memory ~ 100 bytes per row).
      memory_limit: DuckDB's memory cap; beyond it the sort spills to `out`/work.
      threads: DuckDB threads (default: all cores).
    """
    t0 = time.perf_counter()
    path = resolve_path(cfg.path)
    files = parquet_files(path)
    rows = _check_columns(files, cfg)
    root = write.start(out, {"source": "parquet", "files": [os.path.basename(f) for f in files],
                             "rows": sum(rows.values()), "config": config, "num_shards": num_shards})
    work = root / "work"
    work.mkdir(exist_ok=True)
    con = _connect(work, memory_limit, threads or os.cpu_count() or 1)
    has_ts = bool(cfg.timestamp_column) and cfg.timestamp_column in pq.ParquetFile(files[0]).schema_arrow.names
    _null_check(con, files, cfg)
    stats: dict = {"source": "parquet", "name": path.stem, "rows_read": int(sum(rows.values())), "filtered": {}}
    if not has_ts:
        stats["timestamps"] = "absent (zeros); ties are broken by split_seed"
    if cfg.min_rating is not None:
        stats["filtered"]["min_rating"] = int(con.execute(
            f"SELECT count(*) FROM read_parquet([{', '.join(repr(f) for f in files)}]) "
            f'WHERE NOT ("{cfg.rating_column}" >= {float(cfg.min_rating)!r})').fetchall()[0][0])
    # ---- pass 1: per-user rules on chunks of complete users --------------------------------------------------
    reader = con.sql(_source_sql(files, rows, cfg, has_ts) + " ORDER BY u, t, r").to_arrow_reader(262_144)
    user_ids, user_counts, n_chunks, seen = [], [], 0, 0
    for chunk in _chunks(reader, chunk_rows):
        u_ids, u_codes = peruser.user_codes_sorted(chunk["u"])
        i_ids, i_codes = np.unique(chunk["i"], return_inverse=True)
        parts = peruser.split_rows(u_codes, i_codes.reshape(-1), chunk["t"], chunk["r"], None, cfg, len(u_ids),
                                   len(i_ids), stats)
        idx = [np.zeros(0, np.int64) if p is None else p for p in (parts.train, parts.valid, parts.test)]
        label = np.concatenate([np.full(len(p), k, np.int8) for k, p in enumerate(idx)])
        rows_at = np.concatenate(idx)
        # user-major, then split, then canonical order: a stable sort by user keeps the rest
        order = np.argsort(u_codes[rows_at], kind="stable")
        rows_at, label = rows_at[order], label[order]
        counts = np.zeros((len(u_ids), 3), np.int64)
        np.add.at(counts, (u_codes[rows_at], label), 1)
        present = counts.sum(axis=1) > 0
        user_ids.append(u_ids[present])
        user_counts.append(counts[present])
        table = pa.table({"u": chunk["u"][rows_at], "i": chunk["i"][rows_at], "t": chunk["t"][rows_at],
                          "p": label})
        tmp = work / f"kept-{n_chunks:06d}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, work / f"kept-{n_chunks:06d}.parquet")
        n_chunks += 1
        seen += len(chunk["u"])
        log.info("prepare pass 1: %d rows (%.0f rows/s)", seen, seen / (time.perf_counter() - t0))
    if not n_chunks or not sum(len(x) for x in user_ids):
        raise DataError(f"{path}: every interaction was filtered ({stats['filtered']}); relax the filters")
    user_vocab = Vocab(np.concatenate(user_ids))
    counts = np.concatenate(user_counts)
    # ---- item vocabulary and counts -------------------------------------------------------------------------
    kept_glob = str(work / "kept-*.parquet")
    items = con.sql(f"SELECT i, count(*) FILTER (WHERE p = 0) FROM read_parquet('{kept_glob}') GROUP BY i "
                        "ORDER BY i").fetchnumpy()
    item_vocab = Vocab(as_id_array(items["i"], "item ids"))
    item_counts = np.asarray(items[list(items)[1]], np.int64)
    # ---- pass 2: one record per user into the shards --------------------------------------------------------
    writer = write.ShardWriter(root, write.shard_bounds(counts.sum(axis=1), num_shards))
    next_user, t_min, t_max = 0, None, None
    for k in range(n_chunks):
        table = pq.read_table(work / f"kept-{k:06d}.parquet")
        u = table.column("u").to_numpy(zero_copy_only=False)
        item = item_vocab.lookup(as_id_array(table.column("i").to_numpy(zero_copy_only=False), "item ids"))
        ts, part = table.column("t").to_numpy(), table.column("p").to_numpy()
        train_ts = ts[part == 0]
        if train_ts.size:
            t_min = train_ts.min() if t_min is None else min(t_min, train_ts.min())
            t_max = train_ts.max() if t_max is None else max(t_max, train_ts.max())
        starts = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
        ends = np.concatenate([starts[1:], [len(u)]])
        for a, b in zip(starts, ends):
            p = part[a:b]
            cut = np.searchsorted(p, [1, 2], side="left") + a
            bounds = [a, cut[0], cut[1], b]
            writer.add(next_user, [item[bounds[j]:bounds[j + 1]] for j in range(3)],
                       [ts[bounds[j]:bounds[j + 1]] for j in range(3)])
            next_user += 1
        log.info("prepare pass 2: %d/%d users", next_user, len(user_vocab))
    shards = writer.close()
    con.close()
    _finish_stats(stats, counts, item_counts)
    manifest = write.finish(root, name=cfg.name or path.stem, shards=shards, user_counts=counts,
                            item_counts=item_counts, user_vocab=user_vocab, item_vocab=item_vocab, feature_vocabs={},
                            user_features={}, item_features={}, user_specs=[], item_specs=[], stats=stats,
                            config=config, window=None if t_min is None else (t_min, t_max))
    for f in work.glob("*"):
        f.unlink()
    work.rmdir()
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def _finish_stats(stats: dict, counts: np.ndarray, item_counts: np.ndarray) -> None:
    """The counts `data.assemble` reports, from the per-user and per-item counts."""
    totals = counts.sum(axis=0)
    stats.update(num_users=int(len(counts)), num_items=int(len(item_counts)), num_train=int(totals[0]),
                 num_valid=int(totals[1]), num_test=int(totals[2]))
    stats["items_without_train"] = int((item_counts == 0).sum())
    stats["users_without_test"] = int((counts[:, 2] == 0).sum())
    stats["users_without_train"] = int((counts[:, 0] == 0).sum())
    accounted = sum(stats["filtered"].values()) + int(totals.sum())
    if accounted != stats["rows_read"]:
        raise AssertionError(f"row accounting broke: read {stats['rows_read']}, accounted {accounted} "
                             f"({stats['filtered']}); this is a bug in the preparation")
