"""The preparation of a Parquet log as an Apache Beam pipeline: the same files as `engine=local`, byte for byte.

    python -m data.prepare engine=beam data.path=LOG out=DIR [num_shards=N] [runner=...] [beam_options=[...]]

The stages share their per-record logic with the local engine (`data.prepared.local`):

1. The driver lists the log's files in the loader's order (`local.parquet_files`), checks their columns and
   computes every row group's first global row from the Parquet metadata. A DoFn reads one row group with
   pyarrow, gives each row its position in the whole log (`row_id`, before the `min_rating` filter: equal
   timestamps are ordered by a hash of it), filters by rating and emits each user's rows of that row group.
2. GroupByKey(raw user id); each user's rows go through `data.peruser.split_rows` (the rules every engine
   shares) and come out as train/valid/test items and timestamps in canonical order, with the stats.
3. Combines of size O(users + items): the user vocabulary (sorted raw ids of the users with kept rows) and their
   per-split counts, the item vocabulary (sorted kept items) and train counts, the train time window and the
   stats. They reach the workers as side inputs (item codes, user rows, `write.shard_bounds`) and the driver as
   a small summary written under `out`/work.
4. Each user's record (`format.encode_user`) is keyed by its shard; GroupByKey(shard), a sort by user row and
   one `write.ShardFile` per shard write the shards (temporary name, then renamed; a worker holds one shard's
   records, so use enough shards). The driver then writes the side files and the manifest with `write.finish`,
   as the local engine does.

Runners: the DirectRunner (default) runs it in this process. On Dataflow, with a worker image that has this
package installed (as for `serve.candidates.beam`, see the README):

    python -m data.prepare engine=beam data.path=/mnt/shared/log out=/mnt/shared/prepared/clicks num_shards=256 \\
        runner=DataflowRunner "beam_options=['--project=PROJECT','--region=REGION','--temp_location=gs://BUCKET/tmp',
        '--sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/twotower-beam:TAG']"

The workers read the log and write the shards; the driver lists the log and writes the side files and the
manifest. So `data.path` and `out` must be POSIX paths that the driver and every worker can read and write at
the same place (NFS, Filestore, a FUSE mount whose rename is atomic); `gs://` paths are not read directly.
Flink and Spark take their own `beam_options` the same way. Needs the `beam` extra (`pip install -e ".[beam]"`,
in its own environment: Beam pins protobuf and pyarrow below this project's versions).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import time
import uuid

import numpy as np
import pyarrow.parquet as pq

from data import peruser
from data.errors import DataError
from data.paths import resolve_path
from data.prepared import format as fmt
from data.prepared import local, write
from data.sources import tabular
from data.types import Vocab

log = logging.getLogger(__name__)
_SUMMARY, _SUMMARY_STATS = "summary.npz", "summary.json"


def _beam():
    try:
        import apache_beam as beam
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise DataError("engine=beam needs Apache Beam: pip install -e \".[beam]\" (in its own environment: it "
                        "pins protobuf and pyarrow below this project's versions)") from e
    return beam


# ---- per-record logic (plain functions, called by the DoFns) ----------------------------------------------------

def read_units(files: list[str], rows: dict) -> list[tuple[str, int, int, int]]:
    """(file, row group, global row of its first row, its first row in the file) of every row group of the log,
    in log order.

    Args:
      files: the log's files in the loader's order (`local.parquet_files`).
      rows: {file: rows} from the Parquet metadata.
    """
    units, offset = [], 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        start = 0
        for g in range(meta.num_row_groups):
            units.append((f, g, offset + start, start))
            start += meta.row_group(g).num_rows
        offset += rows[f]
    return units


def read_unit(unit: tuple[str, int, int, int], cfg, has_ts: bool):
    """Reads one row group: (stats of the read, [(raw user, (raw items, timestamps, row ids)) per user]).

    Ids and timestamps are converted as the in-memory loader converts them (`data.sources.tabular`); rows
    below `min_rating` are counted and dropped; `row_id` is the row's position in the whole log.
    """
    path, group, first, in_file = unit
    cols = [cfg.user_column, cfg.item_column] + ([cfg.timestamp_column] if has_ts else []) \
        + ([cfg.rating_column] if cfg.min_rating is not None else [])
    table = pq.ParquetFile(path).read_row_group(group, columns=list(dict.fromkeys(cols)))
    for col in (cfg.user_column, cfg.item_column):
        if table.column(col).null_count:
            row = int(np.flatnonzero(table.column(col).is_null().to_numpy(zero_copy_only=False))[0]) + in_file
            raise DataError(f"{path}: column {col!r} has a null id in data row {row + 1}; every interaction "
                            "needs a user and an item id")
    user = tabular._ids(table.column(cfg.user_column), cfg.user_column, path)
    item = tabular._ids(table.column(cfg.item_column), cfg.item_column, path)
    n = table.num_rows
    ts = tabular._timestamps(table.column(cfg.timestamp_column), cfg.timestamp_column, path) if has_ts \
        else np.zeros(n, np.int64)
    row_id = first + np.arange(n, dtype=np.int64)
    stats: dict = {"rows_read": int(n), "filtered": {}}
    if cfg.min_rating is not None:
        rating = table.column(cfg.rating_column).to_numpy(zero_copy_only=False)
        keep = np.asarray(rating, dtype=np.float64) >= cfg.min_rating
        stats["filtered"]["min_rating"] = int((~keep).sum())
        user, item, ts, row_id = user[keep], item[keep], ts[keep], row_id[keep]
    order = np.argsort(user, kind="stable")
    ids, starts = np.unique(user[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return stats, [(u, (item[order[a:b]], ts[order[a:b]], row_id[order[a:b]]))
                   for u, a, b in zip(ids.tolist(), starts, ends)]


def split_user(fragments, cfg):
    """One user's rows (fragments from any row groups, in any order) through `peruser.split_rows`.

    Returns:
      (stats of the rules, ([train, valid, test] raw items, [train, valid, test] timestamps) or None when every
      row was filtered).
    """
    fragments = list(fragments)
    item = np.concatenate([f[0] for f in fragments])
    ts = np.concatenate([f[1] for f in fragments]).astype(np.int64)
    row_id = np.concatenate([f[2] for f in fragments]).astype(np.int64)
    order = np.lexsort((row_id, ts))               # the local engine's input order: (time, position in the log)
    item, ts, row_id = item[order], ts[order], row_id[order]
    item_ids, item_codes = np.unique(item, return_inverse=True)
    stats: dict = {"filtered": {}}
    parts = peruser.split_rows(np.zeros(len(item), np.int64), item_codes.reshape(-1), ts, row_id, None, cfg, 1,
                               len(item_ids), stats)
    idx = [np.zeros(0, np.int64) if p is None else p for p in (parts.train, parts.valid, parts.test)]
    if not sum(len(p) for p in idx):
        return stats, None
    return stats, ([item[p] for p in idx], [ts[p] for p in idx])


def merge_stats(a: dict, b: dict) -> dict:
    """Stats added up: numbers add, nested dicts merge, other values (the split mode) must agree."""
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = dict(v) if isinstance(v, dict) else v
        elif isinstance(v, dict):
            out[k] = merge_stats(out[k], v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = out[k] + v
        elif out[k] != v:
            raise AssertionError(f"stats {k!r} differ between users: {out[k]!r} and {v!r}")
    return out


def _tight(ids: np.ndarray) -> np.ndarray:
    """Raw ids as the local engine's vocabularies hold them: int64, or unicode exactly as wide as the longest id
    (arrays concatenated from several files may be wider)."""
    if ids.dtype.kind != "U":
        return ids.astype(np.int64, copy=False)
    width = int(np.char.str_len(ids).max()) if ids.size else 1
    return ids.astype(f"<U{max(1, width)}")


def _sum_by_id(parts: list) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct ids, int64 [n, k] sums of their values) of [(ids [m], values [m, k])]."""
    ids = _tight(np.concatenate([p[0] for p in parts]))
    values = np.concatenate([p[1] for p in parts]).astype(np.int64)
    uniq, inv = np.unique(ids, return_inverse=True)
    sums = np.zeros((len(uniq), values.shape[1]), np.int64)
    np.add.at(sums, inv.reshape(-1), values)
    return uniq, sums


def _summary_of_user(raw_user, record) -> tuple:
    """What one user adds to the combines: (user ids, [1, 3] counts), (item ids, [n, 1] train counts), window."""
    items, ts = record
    counts = np.array([[len(x) for x in items]], np.int64)
    kept_ids, inv = np.unique(np.concatenate(items), return_inverse=True)
    train = np.bincount(inv.reshape(-1)[:len(items[0])], minlength=len(kept_ids)).reshape(-1, 1)
    window = (int(ts[0].min()), int(ts[0].max())) if len(ts[0]) else None
    return (np.array([raw_user]), counts), (kept_ids, train), window


def encode_record(raw_user, record, users: np.ndarray, item_ids: np.ndarray, bounds: np.ndarray):
    """(shard, (user row, `format.encode_user` bytes)) of one user, given the sorted user and item vocabularies
    and the shard bounds."""
    items, ts = record
    row = int(np.searchsorted(users, raw_user))
    codes = [np.searchsorted(item_ids, x).astype(np.int32) for x in items]
    shard = int(np.searchsorted(bounds, row, side="right") - 1)
    return shard, (row, fmt.encode_user(row, codes, ts))


def write_shard(root: str, k: int, records, num_shards: int) -> int:
    """Writes shard `k` from its (user row, record) pairs in any order; returns the users written (0 when an
    earlier run finished the shard)."""
    records = sorted(records, key=lambda r: r[0])
    shard = write.ShardFile(pathlib.Path(root), k, num_shards, tmp_suffix=f".{uuid.uuid4().hex}.tmp")
    if shard.done:
        return 0
    for _, rec in records:
        shard.write(rec)
    shard.close()
    return len(records)


def write_summary(work: str, users, items, window, stats: dict) -> None:
    """The combines' results for the driver: vocabularies and counts (.npz without pickle) and stats (JSON)."""
    work = pathlib.Path(work)
    tmp = work / (_SUMMARY + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, user_ids=users[0], user_counts=users[1], item_ids=items[0], item_counts=items[1][:, 0])
    os.replace(tmp, work / _SUMMARY)
    tmp = work / (_SUMMARY_STATS + ".tmp")
    tmp.write_text(json.dumps({"stats": stats, "window": window}))
    os.replace(tmp, work / _SUMMARY_STATS)


# ---- the pipeline ----------------------------------------------------------------------------------------------

def _combine_fns(beam):
    class SumById(beam.CombineFn):
        """(sorted ids, [n, k] summed values) of (ids, values) inputs; pending inputs are summed in bulk once
        they hold `compact_rows` rows, so memory grows with distinct ids, not with inputs."""

        compact_rows = 1 << 20

        def create_accumulator(self):
            return [], 0

        def add_input(self, acc, part):
            parts, n = acc
            parts.append(part)
            n += len(part[0])
            if n >= self.compact_rows and len(parts) > 1:
                parts = [_sum_by_id(parts)]
                n = len(parts[0][0])
            return parts, n

        def merge_accumulators(self, accs):
            parts = [p for acc in accs for p in acc[0]]
            if len(parts) > 1:
                parts = [_sum_by_id(parts)]
            return parts, sum(len(p[0]) for p in parts)

        def extract_output(self, acc):
            if not acc[0]:
                return np.zeros(0, np.int64), np.zeros((0, 1), np.int64)
            return _sum_by_id(acc[0])

    class MergeStats(beam.CombineFn):
        def create_accumulator(self):
            return {}

        def add_input(self, acc, stats):
            return merge_stats(acc, stats)

        def merge_accumulators(self, accs):
            out: dict = {}
            for a in accs:
                out = merge_stats(out, a)
            return out

        def extract_output(self, acc):
            return acc

    def window(pairs):
        pairs = [p for p in pairs if p is not None]
        return None if not pairs else (min(p[0] for p in pairs), max(p[1] for p in pairs))

    return SumById, MergeStats, window


def build(pipeline, units: list, cfg, has_ts: bool, root: pathlib.Path, num_shards: int):
    """Adds the preparation to `pipeline`: reading `units`, the per-user rules, the combines, the shards under
    `root` and the summary under `root`/work. Returns the PCollection of (shard, users written)."""
    beam = _beam()
    from apache_beam.metrics import Metrics
    SumById, MergeStats, window_fn = _combine_fns(beam)
    rows_read = Metrics.counter("data.prepare", "rows_read")
    rows_min_rating = Metrics.counter("data.prepare", "rows_filtered_min_rating")

    class ReadUnit(beam.DoFn):
        def process(self, unit):
            stats, users = read_unit(unit, cfg, has_ts)
            rows_read.inc(stats["rows_read"])
            rows_min_rating.inc(stats["filtered"].get("min_rating", 0))
            yield beam.pvalue.TaggedOutput("stats", stats)
            yield from users

    class SplitUser(beam.DoFn):
        def process(self, element):
            raw_user, fragments = element
            stats, record = split_user(fragments, cfg)
            yield beam.pvalue.TaggedOutput("stats", stats)
            if record is not None:
                yield raw_user, record

    read = (pipeline
            | "RowGroups" >> beam.Create(units)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadUnit()).with_outputs("stats", main="rows"))
    split = (read.rows
             | "ByUser" >> beam.GroupByKey()
             | "PerUserRules" >> beam.ParDo(SplitUser()).with_outputs("stats", main="users"))
    users = split.users
    summaries = users | "UserSummary" >> beam.MapTuple(_summary_of_user)
    user_vocab = (summaries | "UserCounts" >> beam.Map(lambda s: s[0])
                  | "UserVocab" >> beam.CombineGlobally(SumById()))
    item_vocab = (summaries | "ItemCounts" >> beam.Map(lambda s: s[1])
                  | "ItemVocab" >> beam.CombineGlobally(SumById()))
    window = (summaries | "Windows" >> beam.Map(lambda s: s[2])
              | "TrainWindow" >> beam.CombineGlobally(window_fn))
    stats = ((read.stats, split.stats) | "AllStats" >> beam.Flatten()
             | "Stats" >> beam.CombineGlobally(MergeStats()))
    bounds = user_vocab | "ShardBounds" >> beam.Map(lambda u: write.shard_bounds(u[1].sum(axis=1), num_shards)
                                                    if len(u[0]) else np.zeros(1, np.int64))
    as_one = beam.pvalue.AsSingleton
    written = (users
               | "Encode" >> beam.Map(lambda ur, uv, iv, b: encode_record(*ur, uv[0], iv[0], b),
                                      as_one(user_vocab), as_one(item_vocab), as_one(bounds))
               | "ByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.Map(lambda kr, b: (kr[0], write_shard(str(root), *kr, len(b) - 1)),
                                          as_one(bounds)))
    _ = (pipeline
         | "One" >> beam.Create([None])
         | "Summary" >> beam.Map(lambda _, uv, iv, w, s: write_summary(str(root / "work"), uv, iv, w, s),
                                 as_one(user_vocab), as_one(item_vocab), as_one(window), as_one(stats)))
    return written


def prepare_beam(cfg, out: os.PathLike, *, num_shards: int, config: dict, runner: str = "DirectRunner",
                 options: list[str] | None = None) -> dict:
    """Prepares the Parquet log `cfg.path` into `out` with a Beam pipeline; returns the manifest.

    Args:
      cfg: the resolved `DataConfig` (source parquet).
      out: the output directory (created; a re-run of the same preparation keeps finished shards). Workers
        write the shards into it: on a distributed runner it must be shared by the driver and the workers.
      num_shards: shard files to write.
      config: the config recorded in the manifest (and compared on a re-run).
      runner: the Beam runner.
      options: extra pipeline options (`--project=...`, ...).
    """
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions
    t0 = time.perf_counter()
    if cfg.source != "parquet" or str(cfg.path).lower().endswith(".csv"):
        raise DataError(f"engine=beam reads Parquet logs; data.source={cfg.source} ({cfg.path}) needs "
                        "engine=memory")
    path = resolve_path(cfg.path)
    files = local.parquet_files(path)
    rows = local._check_columns(files, cfg)
    root = write.start(out, {"source": "parquet", "files": [os.path.basename(f) for f in files],
                             "rows": sum(rows.values()), "config": config, "num_shards": num_shards})
    work = root / "work"
    work.mkdir(exist_ok=True)
    for f in work.glob("summary*"):
        f.unlink()
    has_ts = bool(cfg.timestamp_column) and cfg.timestamp_column in pq.ParquetFile(files[0]).schema_arrow.names
    units = read_units(files, rows)
    log.info("prepare (beam, %s): %d files, %d row groups, %d rows", runner, len(files), len(units),
             sum(rows.values()))
    with beam.Pipeline(options=PipelineOptions([f"--runner={runner}", *(options or [])])) as pipeline:
        build(pipeline, units, cfg, has_ts, root, num_shards)
    # ---- the driver: summary -> side files and manifest, as the local engine writes them ----------------------
    if not (work / _SUMMARY).is_file():
        raise RuntimeError(f"the pipeline finished without its summary {work / _SUMMARY}")
    with np.load(work / _SUMMARY, allow_pickle=False) as z:
        user_ids, counts = z["user_ids"], z["user_counts"]
        item_ids, item_counts = z["item_ids"], z["item_counts"]
    summary = json.loads((work / _SUMMARY_STATS).read_text())
    stats: dict = {"source": "parquet", "name": path.stem, "rows_read": int(sum(rows.values())), "filtered": {}}
    if not has_ts:
        stats["timestamps"] = "absent (zeros); ties are broken by split_seed"
    piped = summary["stats"]
    if piped.get("rows_read", 0) != stats["rows_read"]:
        raise RuntimeError(f"the pipeline read {piped.get('rows_read', 0)} rows, the Parquet metadata says "
                           f"{stats['rows_read']}")
    stats = merge_stats({**stats, "rows_read": 0}, piped)
    if not len(user_ids):
        raise DataError(f"{path}: every interaction was filtered ({stats['filtered']}); relax the filters")
    bounds = write.shard_bounds(counts.sum(axis=1), num_shards)
    n_shards = len(bounds) - 1
    for k in range(n_shards):                       # a shard without users got no group: its (empty) file
        if bounds[k] == bounds[k + 1]:
            write.ShardFile(root, k, n_shards).close()
    missing = [fmt.shard_name(k, n_shards) for k in range(n_shards)
               if not (root / fmt.shard_name(k, n_shards)).is_file()]
    if missing:
        raise RuntimeError(f"the pipeline finished but {len(missing)} shard(s) are missing, e.g. {missing[:3]}")
    shard_rows = np.stack([counts[bounds[k]:bounds[k + 1]].sum(axis=0) for k in range(n_shards)])
    local._finish_stats(stats, counts, item_counts)
    window = summary["window"]
    manifest = write.finish(root, name=cfg.name or path.stem, shards=write.shard_list(bounds, shard_rows),
                            user_counts=counts, item_counts=item_counts, user_vocab=Vocab(user_ids),
                            item_vocab=Vocab(item_ids), feature_vocabs={}, user_features={}, item_features={},
                            user_specs=[], item_specs=[], stats=stats, config=config,
                            window=None if window is None else tuple(window))
    for f in work.glob("*"):
        f.unlink()
    work.rmdir()
    manifest["seconds"] = time.perf_counter() - t0
    return manifest
