"""Users' own logs from Parquet (a file or a directory of files) or CSV with a header row.

Columns: `user_column` and `item_column` (int or string ids, required; a CSV id column holds integer ids when
all its values are integers, and a few stray non-integer values among integers are an error naming their
lines, not a switch to string ids), `timestamp_column` (integer seconds, a timestamp or a date; optional,
zeros when absent), `rating_column` (optional, for `min_rating`), and the per-user / per-item feature columns
named in `user_feature_columns` / `item_feature_columns`:

* string, integer, boolean or dictionary columns -> categorical (code 0 = null, then values in order of first
  appearance);
* floating columns -> dense float32 [n, 1] (nulls and NaN become 0 and are counted);
* list columns -> multi-hot over the distinct list values, `multihot_max_len` slots (extra values counted).

A user's (item's) feature value is taken from its latest row; users whose rows disagree are counted in stats.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.assemble import FeatureTable, RawLog
from data.config import DataConfig
from data.errors import DataError
from data.features import UNKNOWN, lists_to_multihot
from data.ids import as_id_array, factorize
from data.paths import resolve_path
from data.split import canonical_order
from data.textio import check_rows, iter_csv
from data.types import FeatureSpec, Vocab

_INT_TEXT = r"^-?\d+$"  # what pyarrow reads as an int64 id
# Stray values in an integer id column ('NA', 'unknown', a repeated header) are a handful; a string id column
# whose ids are mostly digits (ISBNs, a tenth of which end in 'X') has many non-integer ids.
_MAX_STRAY_IDS = 3
_SHOWN_STRAYS = 3


def _read_csv(path: pathlib.Path, id_columns: list[str]) -> pa.Table:
    parse = pacsv.ParseOptions(newlines_in_values=True)
    try:
        return _integer_ids(pacsv.read_csv(path, parse_options=parse), id_columns, path)
    except (pa.ArrowInvalid, UnicodeDecodeError) as first_error:
        try:
            # pyarrow may infer types from the first block: ids that look numeric there but not later fail,
            # so retry with the id columns read as strings.
            convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in id_columns})
            return _integer_ids(pacsv.read_csv(path, parse_options=parse, convert_options=convert), id_columns,
                                path)
        except (pa.ArrowInvalid, UnicodeDecodeError):
            pass
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            header = fh.readline().rstrip("\r\n").split(",")
        check_rows(path, sep=",", names=header, kinds={h: "str" for h in header}, header=True, quoted=True)
        raise DataError(f"{path}: cannot parse as CSV ({first_error})") from None


def _integer_ids(table: pa.Table, id_columns: list[str], path: pathlib.Path) -> pa.Table:
    """Decides from its values, not from pyarrow's type inference, whether a CSV id column that was read as
    text holds integer or string ids.

    All integers: int64 ids. All but a few distinct values (at most max(3, 1% of the distinct ids), while
    integers are the majority): a `DataError` naming the stray values' lines, because reading the column as
    strings would silently change the type of every id. Otherwise the ids are strings.
    """
    for name in id_columns:
        if name not in table.column_names or not pa.types.is_string(table.column(name).type):
            continue
        col = table.column(name)
        is_int = pc.match_substring_regex(col, _INT_TEXT)
        ints = pc.sum(is_int).as_py() or 0
        if ints == len(col):
            try:
                table = table.set_column(table.column_names.index(name), name, pc.cast(col, pa.int64()))
            except pa.ArrowInvalid:
                pass  # digits beyond int64: the ids stay strings
        elif ints:  # mixed: only now pay for counting distinct values
            strays = pc.unique(col.filter(pc.invert(is_int)))
            integers = pc.count_distinct(col.filter(is_int)).as_py()
            if integers > len(strays) and len(strays) <= max(_MAX_STRAY_IDS, (integers + len(strays)) // 100):
                raise _stray_ids_error(path, name, col, strays)
    return table


def _stray_ids_error(path: pathlib.Path, name: str, col: pa.ChunkedArray, strays: pa.Array) -> DataError:
    """Names the lines of the first few stray ids; the file is re-read only up to them."""
    values = set(strays.to_pylist())
    shown = []
    for lineno, row in iter_csv(path, required=[name]):
        if row[name] in values:
            shown.append(f"line {lineno}: {row[name]!r}")
            if len(shown) == _SHOWN_STRAYS:
                break
    rows = pc.sum(pc.is_in(col, value_set=strays)).as_py()
    return DataError(f"{path} column {name!r}: {rows} row(s) hold {len(strays)} non-integer id(s) in a column of "
                     f"integer ids, e.g. {', '.join(shown)}; fix or remove those rows (string ids that are mostly "
                     "digits load from Parquet with a string column)")


def _read(path: pathlib.Path, id_columns: list[str]) -> pa.Table:
    csvs = path.suffix.lower() == ".csv" or (path.is_dir() and any(path.glob("*.csv"))
                                             and not any(path.rglob("*.parquet")))
    if not csvs:
        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: cannot read as Parquet ({e}); pass a .parquet file, a directory of them "
                            "or a .csv file with a header row") from None
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    tables = [_read_csv(f, id_columns) for f in files]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _column(table: pa.Table, name: str, path, what: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(f"{path}: no column {name!r} for {what}; columns are {table.column_names} (set "
                        f"data.{what} to the right name)")
    return table.column(name)


def _ids(col: pa.ChunkedArray, name: str, path) -> np.ndarray:
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{path}: column {name!r} has {col.null_count} null id(s), first in data row {first + 1}; "
                        "every interaction needs a user and an item id")
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    return as_id_array(col.to_numpy(zero_copy_only=False), f"{path} column {name!r}")


def _timestamps(col: pa.ChunkedArray, name: str, path) -> np.ndarray:
    t = col.type
    if col.null_count:
        raise DataError(f"{path}: time column {name!r} has {col.null_count} null value(s)")
    if pa.types.is_timestamp(t):
        return col.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
    if pa.types.is_date(t):
        return col.cast(pa.date32()).cast(pa.int32()).to_numpy().astype(np.int64) * 86_400
    if pa.types.is_integer(t):
        return col.cast(pa.int64()).to_numpy()
    raise DataError(f"{path}: time column {name!r} has type {t}; use integer seconds, a timestamp or a date")


def _categorical(col: pa.Array, name: str):
    enc = pc.dictionary_encode(col)
    codes = np.where(enc.is_null().to_numpy(zero_copy_only=False), 0,
                     enc.indices.fill_null(0).to_numpy(zero_copy_only=False) + 1).astype(np.int32)
    values = [str(v) for v in enc.dictionary.to_pylist()]
    return codes, Vocab(np.array([UNKNOWN, *values], dtype=str))


def _feature(col: pa.Array, rows: np.ndarray, name: str, cfg: DataConfig, stats: dict):
    """Encodes one feature column; returns (spec, values at `rows`, vocab or None, per-row codes or None)."""
    t = col.type
    if pa.types.is_floating(t):
        vals = col.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = ~np.isfinite(vals)
        stats[f"feature_{name}_missing"] = int(bad[rows].sum())
        return FeatureSpec(name, "dense", 1), np.where(bad, 0, vals)[rows][:, None], None, None
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        sub = col.take(pa.array(rows))
        lengths = pc.list_value_length(sub).fill_null(0).to_numpy().astype(np.int64)
        flat, vocab = _categorical(pc.list_flatten(sub), name)
        keep = flat > 0
        lengths = np.bincount(np.repeat(np.arange(lengths.size), lengths)[keep], minlength=lengths.size)
        out, cut = lists_to_multihot(lengths, flat[keep] - 1, cfg.multihot_max_len)
        stats[f"feature_{name}_values_cut"] = cut
        names = Vocab(vocab.raw_ids[1:]) if len(vocab) > 1 else Vocab(np.array(["<none>"]))
        return FeatureSpec(name, "multihot", len(names), cfg.multihot_max_len), out, names, None
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
    codes, vocab = _categorical(col, name)
    return FeatureSpec(name, "categorical", len(vocab)), codes[rows], vocab, codes


def _feature_table(table: pa.Table, ids: np.ndarray, ts: np.ndarray, columns: list[str], side: str,
                   cfg: DataConfig, path, stats: dict, vocabs: dict):
    if not columns:
        return None
    uniques, codes = factorize(ids)
    order = canonical_order(codes, ts, tie_seed=None)
    ends = np.cumsum(np.bincount(codes, minlength=len(uniques)))
    last = order[ends - 1]  # each id's latest row
    specs, feats = [], {}
    for name in columns:
        col = _column(table, name, path, f"{side}_feature_columns").combine_chunks()
        spec, values, vocab, per_row = _feature(col, last, name, cfg, stats)
        if per_row is not None:  # ids whose rows disagree with their latest value
            differs = per_row != per_row[last][codes]
            stats[f"{side}_feature_{name}_conflicts"] = int((np.bincount(codes[differs], minlength=len(uniques))
                                                             > 0).sum())
        specs.append(spec)
        feats[name] = values
        if vocab is not None:
            vocabs[name] = vocab
    return FeatureTable(uniques, feats, specs, path.name)


def read(cfg: DataConfig) -> RawLog:
    """Reads a Parquet/CSV interaction log (`cfg.path`) into a `RawLog`."""
    path = resolve_path(cfg.path)
    table = _read(path, [cfg.user_column, cfg.item_column])
    user = _ids(_column(table, cfg.user_column, path, "user_column"), cfg.user_column, path)
    item = _ids(_column(table, cfg.item_column, path, "item_column"), cfg.item_column, path)
    stats = {"rows_read": int(table.num_rows), "filtered": {}}
    ts = np.zeros(table.num_rows, dtype=np.int64)
    if cfg.timestamp_column and cfg.timestamp_column in table.column_names:
        ts = _timestamps(table.column(cfg.timestamp_column), cfg.timestamp_column, path)
    elif cfg.timestamp_column not in (None, "timestamp"):
        _column(table, cfg.timestamp_column, path, "timestamp_column")
    else:
        stats["timestamps"] = "absent (zeros); ties are broken by split_seed"
    if cfg.min_rating is not None:
        if not cfg.rating_column:
            raise DataError("data.min_rating is set but data.rating_column is not; name the rating column")
        rating = _column(table, cfg.rating_column, path, "rating_column").to_numpy(zero_copy_only=False)
        keep = np.asarray(rating, dtype=np.float64) >= cfg.min_rating
        stats["filtered"]["min_rating"] = int((~keep).sum())
        table, user, item, ts = table.filter(pa.array(keep)), user[keep], item[keep], ts[keep]
        row_id = np.flatnonzero(keep)
    else:
        row_id = None
    vocabs: dict = {}
    user_table = _feature_table(table, user, ts, list(cfg.user_feature_columns), "user", cfg, path, stats, vocabs)
    item_table = _feature_table(table, item, ts, list(cfg.item_feature_columns), "item", cfg, path, stats, vocabs)
    return RawLog(name=path.stem, user=user, item=item, timestamp=ts, stats=stats, user_table=user_table,
                  item_table=item_table, feature_vocabs=vocabs, row_id=row_id)
