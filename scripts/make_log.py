"""Large synthetic interaction logs as Parquet, for the out-of-core preparation benchmark.

Writes `--files` Parquet files `part-00000.parquet`, ... with columns `user_id`, `item_id`, `timestamp`
(all int64) and `_make_log.json` (underscore: Parquet readers skip it; the settings and per-file row counts). Memory stays bounded whatever
`--rows` is: rows are generated and written `--chunk-rows` at a time, one ParquetWriter per file, files in
parallel over `--workers` processes. Each file is written under a temporary name and renamed when complete.
The output depends only on the settings and `--seed`, not on `--workers`.

Generative story:

* Rows per user: every user gets min(3, rows // users) rows (3 whenever rows >= 3 * users; a smaller log
  scales the floor down, and rows < users is refused), and the remaining rows are shared in proportion to
  log-normal weights (sigma `--user-sigma`), so activity is heavy-tailed.
* Time: the log covers `--days` days from 2020-01-01. Each user is active over a window of random length
  (2% to 100% of the span, clipped at the ends so the rate of the whole log is flat in expectation); the
  user's rows have uniform times in the window, in whole seconds. A fraction `--tie-rate` of a user's rows
  repeats the time of the user's previous row, so equal timestamps of one user occur (ties to break).
* Items: item k has global weight (k + 1) ** -zipf and a random cluster (`--clusters`). Each user prefers 3
  clusters (drawn by cluster mass, Dirichlet(1) weights); a row picks one of them with probability
  `--affinity` and then an item of that cluster by weight, otherwise an item by global weight. Item
  popularity is then a power law and a model can learn which items go together.
* Ids: user and item ids are fixed bijections of the generator index, (k * odd constant) mod 2**40 plus an
  offset (users from 1e12, items from 5e12), so they are neither consecutive nor ordered by popularity and a
  vocabulary must really be built.
* Order: the timeline is cut into one time slice per file and each file into chunks; a user's rows are split
  over the slices by exact conditional binomial draws, so a user's rows spread over several files. Rows are
  written in order of time plus an exponential logging delay (mean 10 minutes): files and chunks are in time
  order, rows inside a chunk only roughly.

  python scripts/make_log.py --rows 200_000_000 --users 500_000 --items 200_000 --out /work/biglog/log200m
  python scripts/make_log.py --check /work/biglog/log200m
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ID_BITS = 40
ID_MASK = (1 << ID_BITS) - 1
USER_MULT = 0x9E3779B97F4A7C15  # odd: multiplication mod 2**40 is a bijection of [0, 2**40)
ITEM_MULT = 0xC2B2AE3D27D4EB4F  # odd
USER_OFFSET = 1_000_000_000_000
ITEM_OFFSET = 5_000_000_000_000
T0 = 1_577_836_800              # 2020-01-01 00:00:00 UTC
PREFERRED = 3                   # clusters a user prefers
MIN_WINDOW = 0.02               # shortest activity window, as a fraction of the span
DELAY_MEAN_S = 600.0            # mean logging delay that makes the written order only roughly by time
COLUMNS = ("user_id", "item_id", "timestamp")
SCHEMA = pa.schema([(c, pa.int64()) for c in COLUMNS])


@dataclass(frozen=True)
class LogSpec:
    """Everything the log depends on (the output is a function of this alone)."""

    rows: int
    users: int
    items: int
    files: int = 16
    seed: int = 0
    zipf: float = 1.0
    user_sigma: float = 1.2
    clusters: int = 0           # 0: items // 1000, within [1, 200]
    affinity: float = 0.8
    tie_rate: float = 0.02
    days: int = 1095
    chunk_rows: int = 1_000_000
    row_group_size: int = 1_000_000
    compression: str = "zstd"

    def validate(self) -> None:
        """Raise ValueError naming the offending setting."""
        for name in ("rows", "users", "items", "files", "chunk_rows", "row_group_size", "days"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rows < self.users:
            raise ValueError(f"--rows {self.rows} < --users {self.users}: every user needs at least one row")
        if max(self.users, self.items) > ID_MASK:
            raise ValueError(f"--users and --items must be <= 2**{ID_BITS} - 1")
        if self.zipf < 0 or self.user_sigma < 0:
            raise ValueError(f"--zipf ({self.zipf}) and --user-sigma ({self.user_sigma}) must be >= 0")
        if not (0 <= self.affinity <= 1 and 0 <= self.tie_rate < 1):
            raise ValueError(f"--affinity ({self.affinity}) must be in [0, 1], --tie-rate ({self.tie_rate}) in [0, 1)")
        if self.days > 40_000:
            raise ValueError(f"--days must be <= 40000, got {self.days}")
        if self.clusters < 0:
            raise ValueError(f"--clusters must be >= 0, got {self.clusters}")

    @property
    def num_clusters(self) -> int:
        return self.clusters or int(np.clip(self.items // 1000, 1, 200))

    def rng(self, *key: int) -> np.random.Generator:
        """An independent stream per purpose/file/chunk, so the output does not depend on the work split."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=key)))


def user_ids(index: np.ndarray) -> np.ndarray:
    """Raw user ids int64 of generator indices (a bijection, not consecutive)."""
    return ((index.astype(np.uint64) * np.uint64(USER_MULT)) & np.uint64(ID_MASK)).astype(np.int64) + USER_OFFSET


def item_ids(index: np.ndarray) -> np.ndarray:
    """Raw item ids int64 of generator indices (a bijection, not consecutive)."""
    return ((index.astype(np.uint64) * np.uint64(ITEM_MULT)) & np.uint64(ID_MASK)).astype(np.int64) + ITEM_OFFSET


def rows_per_user(rows: int, users: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """int64[users] summing to `rows`: min(3, rows // users) each, the rest by log-normal weights.

    Args:
        rows: total rows (>= users).
        users: number of users.
        sigma: log-normal sigma of the activity weights (0: as even as possible).
        rng: random stream.
    Returns:
        Row count of each user.
    """
    floor = min(3, rows // users)
    extra = rows - floor * users
    share = rng.lognormal(0.0, sigma, users)
    share *= extra / share.sum()
    counts = np.floor(share).astype(np.int64)
    left = extra - int(counts.sum())
    if left < 0 or left > users:
        raise AssertionError(f"rounding left {left} rows to share among {users} users")
    if left:
        counts[np.argpartition(counts - share, left - 1)[:left]] += 1   # largest fractional parts
    return counts + floor


def split_rows(remaining: np.ndarray, start: np.ndarray, end: np.ndarray, lo: float, hi: float,
               rng: np.random.Generator) -> np.ndarray:
    """Rows of each user that fall in the time slice [lo, hi), given that the user's `remaining` rows are uniform
    over [max(start, lo), end) (slices are taken in time order). Exact: a user's rows are all placed by the
    slice that contains its `end`.

    Args:
        remaining: int64[U] rows not yet placed in earlier slices.
        start, end: float64[U] activity windows (fractions of the span).
        lo, hi: the slice.
        rng: random stream.
    Returns:
        int64[U] rows of each user in this slice (<= remaining).
    """
    take = np.zeros_like(remaining)
    live = np.flatnonzero((remaining > 0) & (start < hi) & (end > lo))
    if live.size:
        s = np.maximum(start[live], lo)
        e = end[live]
        p = np.where(e <= hi, 1.0, (hi - s) / (e - s))
        take[live] = rng.binomial(remaining[live], np.clip(p, 0.0, 1.0))
    return take


@dataclass
class Model:
    """The latent structure, indexed by generator indices."""

    counts: np.ndarray          # int64 [U] rows per user
    start: np.ndarray           # float64 [U] activity window, fractions of the span
    end: np.ndarray             # float64 [U]
    pref: np.ndarray            # int64 [U, 3] preferred clusters
    pref_cum: np.ndarray        # float64 [U, 2] cumulative preference weights of the first two slots
    item_cdf: np.ndarray        # float64 [I] global popularity CDF
    by_cluster: np.ndarray      # int64 [I] items ordered by cluster
    cluster_key: np.ndarray     # float64 [I] cluster + CDF inside the cluster, in by_cluster order
    cluster_last: np.ndarray    # int64 [C] position of each cluster's last item in by_cluster (-1 if empty)
    per_file: np.ndarray        # int64 [F, U] rows of each user in each file


def build_model(spec: LogSpec) -> Model:
    """Draw the latent structure and split every user's rows over the files."""
    rng = spec.rng(0)
    u, n_items, c = spec.users, spec.items, spec.num_clusters
    counts = rows_per_user(spec.rows, u, spec.user_sigma, rng)
    length = rng.uniform(MIN_WINDOW, 1.0, u)
    start = rng.uniform(-length, 1.0)
    end = np.minimum(start + length, 1.0)
    start = np.clip(start, 0.0, 1.0 - MIN_WINDOW)
    end = np.maximum(end, start + MIN_WINDOW)

    weight = np.arange(1, n_items + 1, dtype=np.float64) ** -spec.zipf
    item_cdf = np.cumsum(weight)
    item_cdf /= item_cdf[-1]
    cluster = rng.integers(0, c, n_items)
    by_cluster = np.argsort(cluster, kind="stable")
    sorted_cluster = cluster[by_cluster]
    mass = np.bincount(cluster, weights=weight, minlength=c)
    cum = np.cumsum(weight[by_cluster])
    before = np.concatenate([[0.0], np.cumsum(mass)[:-1]])
    inside = (cum - before[sorted_cluster]) / mass[sorted_cluster]
    cluster_key = sorted_cluster + np.minimum(inside, 1.0)
    size = np.bincount(cluster, minlength=c)
    cluster_last = np.cumsum(size) - 1

    mass_cdf = np.cumsum(mass) / mass.sum()
    pref = np.minimum(np.searchsorted(mass_cdf, rng.random((u, PREFERRED)), side="right"), c - 1)
    pref_cum = np.cumsum(rng.dirichlet(np.ones(PREFERRED), u), axis=1)[:, :-1]

    alloc = spec.rng(1)
    edges = np.linspace(0.0, 1.0, spec.files + 1)
    remaining = counts.copy()
    per_file = np.empty((spec.files, u), np.int64)
    for f in range(spec.files):
        per_file[f] = split_rows(remaining, start, end, edges[f], edges[f + 1], alloc)
        remaining -= per_file[f]
    if remaining.any():
        raise AssertionError(f"{int(remaining.sum())} rows left unplaced after the last file")
    return Model(counts, start, end, pref.astype(np.int64), pref_cum, item_cdf, by_cluster, cluster_key,
                 cluster_last, per_file)


def make_chunk(spec: LogSpec, model: Model, users: np.ndarray, take: np.ndarray, lo: float, hi: float,
               rng: np.random.Generator) -> pa.Table:
    """The rows of one chunk: `take[k]` rows of user `users[k]` in the time slice [lo, hi).

    Returns:
        Table of COLUMNS, in order of time plus logging delay.
    """
    n = int(take.sum())
    grp = np.repeat(np.arange(users.size), take)
    user = users[grp]
    s = np.maximum(model.start[users], lo)[grp]
    e = np.minimum(model.end[users], hi)[grp]
    span_s = spec.days * 86_400
    sec = np.floor((s + rng.random(n) * (e - s)) * span_s).astype(np.int64)
    base = int(np.floor(lo * span_s))
    sec = np.sort(sec - base + (grp.astype(np.int64) << 32))          # by user, then time
    sec = (sec & 0xFFFFFFFF) + base
    tie = rng.random(n) < spec.tie_rate
    tie[np.flatnonzero(np.diff(grp, prepend=-1))] = False            # a user's first row in the chunk
    src = np.maximum.accumulate(np.where(tie, 0, np.arange(n)))
    sec = sec[src]                                                   # ties repeat the previous row's time

    item = np.empty(n, np.int64)
    draw = rng.random(n)
    mine = rng.random(n) < spec.affinity
    own, rest = np.flatnonzero(mine), np.flatnonzero(~mine)
    item[rest] = np.minimum(np.searchsorted(model.item_cdf, draw[rest], side="right"), spec.items - 1)
    slot_u = rng.random(own.size)
    cum = model.pref_cum[user[own]]
    slot = (slot_u >= cum[:, 0]).astype(np.int64) + (slot_u >= cum[:, 1])
    c = model.pref[user[own], slot]
    pos = np.searchsorted(model.cluster_key, c + draw[own], side="right")
    item[own] = model.by_cluster[np.minimum(pos, model.cluster_last[c])]

    order = np.argsort(sec + rng.exponential(DELAY_MEAN_S, n), kind="stable")
    return pa.Table.from_arrays(
        [pa.array(user_ids(user[order])), pa.array(item_ids(item[order])), pa.array(sec[order] + T0)],
        schema=SCHEMA)


_MODEL: tuple[LogSpec, Model] | None = None
_COUNTER = None


def _model(spec: LogSpec) -> Model:
    global _MODEL
    if _MODEL is None or _MODEL[0] != spec:
        _MODEL = (spec, build_model(spec))
    return _MODEL[1]


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def file_name(f: int) -> str:
    return f"part-{f:05d}.parquet"


def write_file(spec: LogSpec, f: int, out: str) -> dict:
    """Generate and write file `f` (its time slice) chunk by chunk, to a temporary name renamed at the end.

    Returns:
        {"file", "rows", "row_groups", "bytes"}.
    """
    model = _model(spec)
    remaining = model.per_file[f].copy()
    total = int(remaining.sum())
    chunks = max(1, -(-total // spec.chunk_rows))
    lo_f, hi_f = np.linspace(0.0, 1.0, spec.files + 1)[f:f + 2]   # the slices build_model split by
    edges = np.linspace(lo_f, hi_f, chunks + 1)
    end = np.minimum(model.end, hi_f)
    path = os.path.join(out, file_name(f))
    tmp = path + ".tmp"
    written, pending, row_groups = 0, [], 0
    with pq.ParquetWriter(tmp, SCHEMA, compression=spec.compression) as writer:
        def flush(final: bool) -> None:
            nonlocal pending, row_groups
            if not pending:
                return
            table = pa.concat_tables(pending)
            full = table.num_rows if final else table.num_rows - table.num_rows % spec.row_group_size
            if full:
                writer.write_table(table.slice(0, full), row_group_size=spec.row_group_size)
                row_groups += -(-full // spec.row_group_size)
            pending = [table.slice(full)] if full < table.num_rows else []

        for k in range(chunks):
            rng = spec.rng(2, f, k)
            take = split_rows(remaining, model.start, end, edges[k], edges[k + 1], rng)
            remaining -= take
            users = np.flatnonzero(take)
            if users.size:
                pending.append(make_chunk(spec, model, users, take[users], edges[k], edges[k + 1], rng))
                rows = pending[-1].num_rows
                written += rows
                if sum(t.num_rows for t in pending) >= spec.row_group_size:
                    flush(final=False)
                if _COUNTER is not None:
                    with _COUNTER.get_lock():
                        _COUNTER.value += rows
        flush(final=True)
    if remaining.any() or written != total:
        raise AssertionError(f"{file_name(f)}: wrote {written} of {total} rows")
    os.replace(tmp, path)
    return {"file": file_name(f), "rows": written, "row_groups": row_groups, "bytes": os.path.getsize(path)}


def generate(spec: LogSpec, out: str, workers: int = 1, overwrite: bool = False,
             progress_s: float = 5.0) -> dict:
    """Write the log to directory `out` (created if missing).

    Args:
        spec: the log settings.
        out: output directory; must hold no .parquet file unless `overwrite` (which deletes them first).
        workers: processes writing files in parallel (1: in this process).
        overwrite: replace an existing log in `out`.
        progress_s: seconds between progress lines on stderr.
    Returns:
        Summary dict (rows, files, seconds, rows_per_s, bytes, per-file info).
    """
    spec.validate()
    os.makedirs(out, exist_ok=True)
    old = sorted(n for n in os.listdir(out) if n.endswith(".parquet") or n.endswith(".parquet.tmp"))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} Parquet files (e.g. {old[0]}); pass --overwrite")
    for name in old:
        os.remove(os.path.join(out, name))
    t0 = time.perf_counter()

    def report(done: int, final: bool = False) -> None:
        dt = time.perf_counter() - t0
        print(f"{'done' if final else 'rows'} {done:,} / {spec.rows:,} ({100 * done / spec.rows:.1f}%)  "
              f"{done / max(dt, 1e-9) / 1e6:.2f}M rows/s  {dt:.0f}s", file=sys.stderr, flush=True)

    if workers <= 1:
        global _COUNTER
        _COUNTER = None
        files = []
        for f in range(spec.files):
            files.append(write_file(spec, f, out))
            report(sum(i["rows"] for i in files))
    else:
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(workers, spec.files), initializer=_init_worker, initargs=(counter,)) as pool:
            jobs = [pool.apply_async(write_file, (spec, f, out)) for f in range(spec.files)]
            while not all(j.ready() for j in jobs):
                jobs[next(i for i, j in enumerate(jobs) if not j.ready())].wait(progress_s)
                report(counter.value)
            files = [j.get() for j in jobs]
    seconds = time.perf_counter() - t0
    rows = sum(i["rows"] for i in files)
    if rows != spec.rows:
        raise AssertionError(f"wrote {rows} rows, expected {spec.rows}")
    summary = {"rows": rows, "files": len(files), "seconds": round(seconds, 2),
               "rows_per_s": round(rows / seconds), "bytes": sum(i["bytes"] for i in files),
               "spec": dataclasses.asdict(spec), "file_info": files}
    with open(os.path.join(out, "_make_log.json.tmp"), "w") as fh:
        json.dump(summary, fh, indent=1)
    os.replace(os.path.join(out, "_make_log.json.tmp"), os.path.join(out, "_make_log.json"))
    report(rows, final=True)
    return summary


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts])
    uniq, inv = np.unique(ids, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts, minlength=uniq.size).astype(np.int64)


def check_log(path: str) -> dict:
    """Exact statistics of the log in directory `path`, one row group at a time (memory ~ distinct ids).

    Returns:
        {"files", "rows", "row_groups", "columns", "distinct_users", "distinct_items", "rows_per_user"
         (min/median/max), "top_item_share", "timestamp_min", "timestamp_max"}.
    """
    names = sorted(n for n in os.listdir(path) if n.endswith(".parquet"))
    if not names:
        raise FileNotFoundError(f"no .parquet files in {path}")
    acc = {"user_id": [], "item_id": []}
    pending_rows = 0
    rows = groups = 0
    t_min, t_max = None, None
    schema = None
    for name in names:
        pf = pq.ParquetFile(os.path.join(path, name))
        if schema is None:
            schema = pf.schema_arrow
        elif not pf.schema_arrow.equals(schema):
            raise ValueError(f"{name}: schema {pf.schema_arrow} differs from {names[0]}: {schema}")
        missing = set(COLUMNS) - set(pf.schema_arrow.names)
        if missing:
            raise ValueError(f"{name}: missing columns {sorted(missing)}")
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=list(COLUMNS))
            rows += t.num_rows
            groups += 1
            ts = t.column("timestamp").to_numpy()
            if ts.size:
                t_min = int(ts.min()) if t_min is None else min(t_min, int(ts.min()))
                t_max = int(ts.max()) if t_max is None else max(t_max, int(ts.max()))
            for col in acc:
                acc[col].append(np.unique(t.column(col).to_numpy(), return_counts=True))
            pending_rows += t.num_rows
            if pending_rows > 8_000_000:
                acc = {col: [_merge_counts(p)] for col, p in acc.items()}
                pending_rows = 0
    users = _merge_counts(acc["user_id"])[1]
    items = _merge_counts(acc["item_id"])[1]
    return {"files": len(names), "rows": rows, "row_groups": groups,
            "columns": {f.name: str(f.type) for f in schema},
            "distinct_users": int(users.size), "distinct_items": int(items.size),
            "rows_per_user": {"min": int(users.min()), "median": float(np.median(users)), "max": int(users.max())},
            "top_item_share": round(float(items.max() / rows), 5),
            "timestamp_min": t_min, "timestamp_max": t_max}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, help="rows in the log, e.g. 200_000_000")
    ap.add_argument("--users", type=int, default=500_000, help="distinct users (<= rows)")
    ap.add_argument("--items", type=int, default=200_000, help="item catalogue size (not all need to occur)")
    ap.add_argument("--files", type=int, default=16, help="Parquet files, one time slice each")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zipf", type=float, default=1.0, help="item popularity exponent, weight (k + 1) ** -zipf")
    ap.add_argument("--user-sigma", type=float, default=1.2, help="log-normal sigma of per-user activity")
    ap.add_argument("--clusters", type=int, default=0, help="item clusters (0: items // 1000, within [1, 200])")
    ap.add_argument("--affinity", type=float, default=0.8, help="share of rows from the user's preferred clusters")
    ap.add_argument("--tie-rate", type=float, default=0.02, help="share of a user's rows repeating its previous time")
    ap.add_argument("--days", type=int, default=1095, help="time span of the log from 2020-01-01")
    ap.add_argument("--row-group-size", type=int, default=1_000_000)
    ap.add_argument("--chunk-rows", type=int, default=1_000_000, help="rows generated at a time per worker")
    ap.add_argument("--compression", default="zstd", help="Parquet codec (zstd, snappy, lz4, none)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel file writers")
    ap.add_argument("--overwrite", action="store_true", help="replace the .parquet files already in --out")
    ap.add_argument("--check", metavar="DIR", help="print exact row / distinct-id statistics of a log and exit")
    args = ap.parse_args(argv)
    if args.check:
        print(json.dumps(check_log(args.check)))
        return
    if args.rows is None or args.out is None:
        ap.error("--rows and --out are required (or --check DIR)")
    spec = LogSpec(rows=args.rows, users=args.users, items=args.items, files=args.files, seed=args.seed,
                   zipf=args.zipf, user_sigma=args.user_sigma, clusters=args.clusters, affinity=args.affinity,
                   tie_rate=args.tie_rate, days=args.days, chunk_rows=args.chunk_rows,
                   row_group_size=args.row_group_size, compression=args.compression)
    try:
        summary = generate(spec, args.out, workers=args.workers, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as err:
        sys.exit(f"make_log: {err}")
    print(f"wrote {summary['rows']:,} rows in {summary['files']} files to {args.out}: {summary['seconds']:.1f}s, "
          f"{summary['rows_per_s'] / 1e6:.2f}M rows/s, {summary['bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
