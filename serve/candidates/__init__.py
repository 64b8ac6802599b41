"""Batch candidate generation: every user of a trained run (or a list of users) -> top-k unseen items ->
Parquet shards. `python -m serve.candidates` (`__main__.py`) and the Beam pipeline (`beam.py`) both run
`load_job` once per process and `run_shard` once per shard; `run` is the single-process driver.

Output: `<out>/part-SSSSS-of-NNNNN.parquet`, one file per shard, with the columns

    user_id    string               the user's raw id as in the run's vocabulary
    item_ids   list<int64|string>   raw item ids (the index's id kind), best first
    scores     list<float32>        dot-product scores, descending; ties by item slot ascending

For a model with K embeddings per user (`model.user.num_embeddings`), each of a user's first K' embeddings
(K' from its history length, `towers.inference.multi.active_interests`) is searched, and the lists are merged
round-robin without duplicates: then each item carries the score of the embedding it came from, and the
scores of a user need not descend.

and the job's identity in the file's key-value metadata (`twotower.model_version`, `twotower.index_version`,
`twotower.k`, ...). A user gets min(k, unseen items) items. Users are split into `num_shards` contiguous ranges
of their sorted vocabulary rows, so the split depends only on the user set. A shard is written under a
temporary name and renamed into place, so a shard file is either absent or complete; a re-run skips complete
shards (after checking that they belong to the same job) and redoes the others, which yields the same bytes
as an uninterrupted run.

A run trained on a prepared dataset (`data.source: prepared`) keeps its log on disk here too: the dataset is
opened (`data.load.open_data`), and each chunk of `chunk_users` users reads only those users' records
(`PreparedData.load_users`) for their histories and the items to exclude, so memory grows with the chunk, not
with the interactions. The output is the same as from the same data in memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import re
import time
import uuid

import numpy as np

from serve.candidates.config import CandidatesConfig, validate
from serve.candidates.search import Corpus, seen_csr, topk_unseen
from towers.inference.search import SearchStats, default_overfetch

log = logging.getLogger("twotower.candidates")
FORMAT_VERSION = "1"
_SHARD_NAME = re.compile(r"part-(\d{5})-of-(\d{5})\.parquet")


class CandidatesError(RuntimeError):
    """The job cannot run as asked: missing or mismatched index, unknown users, foreign shards in out."""


@dataclasses.dataclass
class Job:
    """Everything a worker needs to write any shard; built once per process by `load_job`."""
    config: CandidatesConfig
    trained: object                  # towers.restore.TrainedModel
    ds: object                       # data.types.Dataset the run was trained on, or its opened PreparedData
    corpus: Corpus
    users: np.ndarray                # int32[U] user rows of the job, sorted, distinct
    slot_of_row: np.ndarray          # int64[num item rows]: corpus slot of each vocabulary item, -1 if absent
    overfetch: int
    metadata: dict                   # str -> str: the job's identity, written into every shard
    conditions: np.ndarray | None = None   # int32[U] condition code of each row of `users` (pairs=), or None

    @property
    def out(self) -> pathlib.Path:
        return pathlib.Path(self.config.out)


# ------------------------------------------------------------------------------------------------ loading
def _load_index(c: CandidatesConfig, trained):
    from serve.manifest import IndexLoadError, load_index

    index_dir = pathlib.Path(c.index_dir or pathlib.Path(c.run_dir) / "export" / trained.model_version)
    try:
        index, _ = load_index(index_dir, model_version=trained.model_version)
    except IndexLoadError as e:
        raise CandidatesError(f"index_dir={index_dir}: {e}. Export this checkpoint first (python -m serve.export "
                              f"run_dir={c.run_dir}) or pass index_dir= of its export") from None
    version = hashlib.sha256((index_dir / "manifest.json").read_bytes()).hexdigest()[:16]
    return index, version


def _text_lines(path, key: str, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a UTF-8 file. Raises `CandidatesError` naming the
    file and line of bytes that are not UTF-8; `key` is the config key naming the file, `what` what a line holds."""
    data = pathlib.Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise CandidatesError(f"{key}={path} line {lineno}: cannot decode as UTF-8 ({e.reason}); the file must "
                              f"hold {what} per line, in UTF-8") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _user_rows(ids: list[str], vocab, key: str, path, *, skip_unknown: bool) -> np.ndarray:
    """int64 vocabulary rows of raw user ids read from a file, -1 for ids the vocabulary lacks (skipped with a
    warning when `skip_unknown`, else a `CandidatesError` with their count and the first examples)."""
    from serve.model import as_id_kind

    kind = "str" if vocab.raw_ids.dtype.kind == "U" else "int"
    keys = [as_id_kind(u, kind) for u in ids]
    rows = np.full(len(ids), -1, np.int64)
    known = [j for j, k in enumerate(keys) if k is not None]
    if known:
        rows[known] = vocab.lookup(np.asarray([keys[j] for j in known]), missing="minus_one")
    if (rows < 0).any():   # ids that are not even of the vocabulary's kind first, then the unknown ones
        bad = [ids[j] for j, k in enumerate(keys) if k is None] + [str(keys[j]) for j in known if rows[j] < 0]
        msg = (f"{key}={path}: {len(bad)} of {len(rows)} ids are not users of the run's vocabulary, e.g. "
               f"{bad[:5]}")
        if not skip_unknown:
            raise CandidatesError(f"{msg}; fix the file or pass skip_unknown_users=true to skip them")
        log.warning("%s; skipped (skip_unknown_users=true)", msg)
    return rows


def read_users(path, vocab, *, skip_unknown: bool) -> np.ndarray:
    """User rows of a file of raw ids (one per line in UTF-8; blank lines ignored), sorted and distinct.

    Raises:
      CandidatesError: bytes that are not UTF-8 (file and line), or ids the vocabulary lacks (their count and
        the first examples) unless `skip_unknown`.
    """
    ids = [line for _, line in _text_lines(path, "users", "one raw user id")]
    rows = _user_rows(ids, vocab, "users", path, skip_unknown=skip_unknown)
    return np.unique(rows[rows >= 0]).astype(np.int32)


def read_pairs(path, vocab, index, *, skip_unknown: bool) -> tuple[np.ndarray, np.ndarray]:
    """(user rows int32[P], condition codes int32[P]) of a file of `user_id<TAB>value` lines (UTF-8, blank lines
    ignored), sorted by user then code, distinct. Values are raw values of the index's condition feature (its
    integer codes when the feature has no value vocabulary).

    Raises:
      CandidatesError: bytes that are not UTF-8 or a line without a tab (file and line), an index without
        condition codes, unknown values, or unknown users unless `skip_unknown`.
    """
    from serve.model import as_id_kind
    from towers.inference.filtered import ConditionValueError

    held = index.condition
    if held is None:
        raise CandidatesError(f"pairs={path}: the index holds no condition codes; export it from a conditional run "
                              "(model.user.condition)")
    users, values = [], []
    for lineno, line in _text_lines(path, "pairs", "one user_id<TAB>value pair"):
        if "\t" not in line:
            raise CandidatesError(f"pairs={path} line {lineno}: expected user_id<TAB>value, got {line[:80]!r}")
        user, value = (x.strip() for x in line.split("\t", 1))
        users.append(user), values.append(value)
    raw_values = index.condition_values()   # None: the feature's values are its integer codes
    kind = "str" if raw_values is not None and raw_values.dtype.kind == "U" else "int"
    keys = [as_id_kind(v, kind) for v in values]
    try:
        codes = index.condition_codes([v if key is None else key for v, key in zip(values, keys)]) if keys \
            else np.zeros(0, np.int64)
    except ConditionValueError as e:
        raise CandidatesError(f"pairs={path}: {e}") from None
    rows = _user_rows(users, vocab, "pairs", path, skip_unknown=skip_unknown)
    keep = rows >= 0
    key = np.unique(rows[keep] * int(held["size"]) + codes[keep])
    return (key // held["size"]).astype(np.int32), (key % held["size"]).astype(np.int32)


def _seen_sources(c: CandidatesConfig, ds) -> list:
    """The per-user item CSRs of `exclude_splits`. A split the dataset lacks (valid, without a validation
    slice) holds no items, so it excludes nothing."""
    return [ds.split_csr(s) for s in c.exclude_splits if getattr(ds, s) is not None]


def _seen_counts(c: CandidatesConfig, ds) -> np.ndarray:
    """int64[num_users]: each user's rows in `exclude_splits` (from a prepared dataset's counts, no records)."""
    splits = [s for s in c.exclude_splits if getattr(ds, s) is not None]
    if hasattr(ds, "split_rows"):
        return sum((ds.split_rows(s) for s in splits), np.zeros(ds.num_users, np.int64))
    return sum((np.diff(ds.split_csr(s)[0]) for s in splits), np.zeros(ds.num_users, np.int64))


def chunk_dataset(job: Job, rows: np.ndarray):
    """The dataset a chunk of users `rows` reads its histories and seen items from: the job's own, or for a
    prepared dataset a `Dataset` of those users' records only (`PreparedData.load_users`)."""
    return job.ds.load_users(rows) if hasattr(job.ds, "load_users") else job.ds


def load_job(c: CandidatesConfig) -> Job:
    """Restores the towers, reloads their data, loads the index (its model version must be the run's) and
    resolves the users. Raises `CandidatesError` or `towers.restore.RestoreError`."""
    from data.load import open_data
    from towers.inference.vocab import VocabularyMismatch, check_vocabularies
    from towers.restore import load_trained

    trained = load_trained(c.run_dir, c.step)
    ds = open_data(trained.config["data"])   # a prepared dataset stays on disk; chunks read their users
    try:
        check_vocabularies(trained, ds)
    except VocabularyMismatch as e:
        raise CandidatesError(f"{e}; generate candidates from the data the model saw") from None
    index, index_version = _load_index(c, trained)
    corpus = Corpus(index, c.search, user_block=c.user_block, item_block=c.item_block)
    try:
        tuned = corpus.tune(c.leaves_to_search, c.reorder)
    except ValueError as e:
        raise CandidatesError(f"leaves_to_search={c.leaves_to_search}, reorder={c.reorder}: {e}") from None
    vocab_kind, index_kind = trained.item_vocab.raw_ids.dtype.kind == "U", index.id_kind == "str"
    if vocab_kind != index_kind:
        raise CandidatesError(f"the index holds {index.id_kind} item ids but the run's items are "
                              f"{trained.item_vocab.raw_ids.dtype} ids; export the index from this run")
    if c.k > corpus.num_items:
        raise CandidatesError(f"k={c.k} is larger than the index ({corpus.num_items} items)")
    conditions = None
    if c.pairs is not None:
        users, conditions = read_pairs(c.pairs, trained.user_vocab, index, skip_unknown=c.skip_unknown_users)
    else:
        users = (np.arange(ds.num_users, dtype=np.int32) if c.users is None
                 else read_users(c.users, trained.user_vocab, skip_unknown=c.skip_unknown_users))
    counts = _seen_counts(c, ds)
    overfetch = c.overfetch if c.overfetch is not None else default_overfetch(counts)
    identity = {"model_version": trained.model_version, "index_version": index_version, "overfetch": overfetch,
                "search": "exact" if corpus.exact else "index",
                "scann": ",".join(f"{k}={v}" for k, v in tuned.items()) or "-"}
    if conditions is not None:
        identity["pairs"] = hashlib.sha256(users.tobytes() + conditions.tobytes()).hexdigest()[:16]
    return Job(c, trained, ds, corpus, users, corpus.slots_of(trained.item_vocab.raw_ids), overfetch,
               _metadata(c, users, identity), conditions)


def _metadata(c: CandidatesConfig, users: np.ndarray, identity: dict) -> dict:
    """The job's identity as Parquet key-value metadata: what a shard's rows depend on, nothing that varies
    between runs of the same job (no times, no paths), so a resumed job writes the same bytes."""
    fields = {"format_version": FORMAT_VERSION, **identity, "k": c.k, "num_shards": c.num_shards,
              "exclude_splits": ",".join(c.exclude_splits), "max_fetch": c.max_fetch,
              "users": "all" if c.users is None else hashlib.sha256(users.tobytes()).hexdigest()[:16],
              "num_users": len(users)}
    return {f"twotower.{k}": str(v) for k, v in fields.items()}


# ----------------------------------------------------------------------------------------------- one chunk
def shard_users(users: np.ndarray, num_shards: int, shard_index: int) -> np.ndarray:
    """Shard `shard_index` of `num_shards` contiguous, near-equal ranges of `users` (int[U]) -> int[~U/S]."""
    n = len(users)
    return users[n * shard_index // num_shards: n * (shard_index + 1) // num_shards]


def embed_user_rows(job: Job, rows: np.ndarray, ds=None) -> np.ndarray:
    """float32[Q, D] (or [Q, K, D] for users with K embeddings) user embeddings (`towers.inference.embed`), in tower calls of exactly `batch_size` users
    (one compiled shape). `ds`: the dataset holding those users' records (default `chunk_dataset(job, rows)`)."""
    from towers.inference.embed import embed_users

    ds = chunk_dataset(job, rows) if ds is None else ds
    return embed_users(job.trained, ds, rows, buckets=(job.config.batch_size,))


def candidates_for(job: Job, rows: np.ndarray, conditions: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """Top-k unseen items of the users `rows` (int[Q]): (scores float32[Q, k], slots int64[Q, k], stats).
    With `conditions` (int[Q] codes, pairs=), row q is embedded with its value and searched among the items
    holding it (the index's filtered search: exact for small values, ANN with an exact fallback for large)."""
    ds = chunk_dataset(job, rows)
    ex_indptr, ex_slots = seen_csr(_seen_sources(job.config, ds), rows, job.slot_of_row)
    if conditions is not None:
        from towers.inference.embed import embed_users
        emb = embed_users(job.trained, ds, rows, buckets=(job.config.batch_size,), condition=conditions)
        ids = job.corpus.ids
        exclude = [ids[ex_slots[ex_indptr[q]:ex_indptr[q + 1]]].tolist() for q in range(len(rows))]
        scores, found = job.corpus.index.search(emb, job.config.k, exclude=exclude, conditions=conditions)
        slots = np.where(np.isfinite(scores), job.corpus.slots_of(found), -1)
        stats = SearchStats(users=len(rows), short=int((slots < 0).any(axis=1).sum()))
        return scores, slots, stats
    emb = embed_user_rows(job, rows, ds)
    if emb.ndim == 3:
        return multi_interest_unseen(job, emb, ex_indptr, ex_slots)
    return topk_unseen(job.corpus, emb, job.config.k, ex_indptr, ex_slots, overfetch=job.overfetch,
                       max_fetch=job.config.max_fetch)


def multi_interest_unseen(job: Job, emb: np.ndarray, ex_indptr: np.ndarray,
                          ex_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """`candidates_for` of users with K embeddings (float32[Q, K, D], those past each user's K' zero): the
    chunk's active embeddings searched in one `topk_unseen` call, each with its user's seen items excluded, and
    each user's lists merged round-robin without duplicates (`towers.inference.multi`). Every list holds
    min(k, unseen) items, so the merged one does too. An item's score is the one of the embedding it was taken
    from, so a user's scores need not descend. Stats count users; widened / exact_fallback count searches (one
    per active embedding); short counts users whose first embedding found fewer than k unseen items."""
    from data.types import sub_csr
    from towers.inference.multi import interest_queries, merge_searched

    queries, owner, interest = interest_queries(emb)
    q_indptr, q_slots = sub_csr(ex_indptr, ex_slots, owner)
    scores, slots, stats = topk_unseen(job.corpus, queries, job.config.k, q_indptr, q_slots,
                                       overfetch=job.overfetch, max_fetch=job.config.max_fetch)
    merged, pos = merge_searched(owner, interest, scores, slots, len(emb), emb.shape[1], job.config.k)
    stats.users, stats.short = len(emb), int((slots[interest == 0] < 0).any(axis=1).sum())
    return merged, np.where(pos >= 0, slots.reshape(-1)[np.maximum(pos, 0)], -1), stats


def _arrow_schema(job: Job, shard_index: int, num_users: int):
    import pyarrow as pa

    item_type = pa.string() if job.corpus.index.id_kind == "str" else pa.int64()
    meta = {**job.metadata, "twotower.shard_index": str(shard_index), "twotower.shard_users": str(num_users)}
    fields = [("user_id", pa.string())] + ([("condition", pa.string())] if job.conditions is not None else [])
    return pa.schema(fields + [("item_ids", pa.list_(item_type)), ("scores", pa.list_(pa.float32()))],
                     metadata=meta)


def chunk_table(job: Job, rows: np.ndarray, schema, conditions: np.ndarray | None = None):
    """The Arrow table of the users `rows` (with `conditions`: of the (user, value) pairs), and the search
    stats."""
    import pyarrow as pa

    scores, slots, stats = candidates_for(job, rows, conditions)
    keep = slots >= 0                        # only the tail past a user's eligible items is -1
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=offsets[1:])
    user_ids = job.trained.user_vocab.raw_ids[rows].astype(str)
    item_ids = job.corpus.ids[slots[keep]]
    columns = [pa.array(user_ids, pa.string())]
    if conditions is not None:
        values = job.corpus.index.condition_values()
        columns.append(pa.array((conditions if values is None else values[conditions]).astype(str), pa.string()))
    columns += [pa.ListArray.from_arrays(pa.array(offsets), pa.array(item_ids, schema.field("item_ids").type.value_type)),
               pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[keep], pa.float32()))]
    return pa.Table.from_arrays(columns, schema=schema), stats


# ---------------------------------------------------------------------------------------------- one shard
def shard_path(out, shard_index: int, num_shards: int) -> pathlib.Path:
    """`<out>/part-SSSSS-of-NNNNN.parquet`."""
    return pathlib.Path(out) / f"part-{shard_index:05d}-of-{num_shards:05d}.parquet"


def _check_complete(job: Job, path: pathlib.Path) -> None:
    """A shard already in place must be this job's; anything else would mix two jobs in one output."""
    import pyarrow.parquet as pq

    try:
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise CandidatesError(f"{path} exists but cannot be read ({e}); delete it and re-run") from None
    diff = {k: (meta.get(k), v) for k, v in job.metadata.items() if meta.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in sorted(diff.items())[:4])
        raise CandidatesError(f"{path} was written by another job ({shown}); use another out= or delete {job.out}")


def _fsync(path: pathlib.Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_shard(job: Job, shard_index: int, progress=None) -> dict:
    """Writes shard `shard_index`, unless a complete shard of this job is already there.

    Stale temporary files of the shard (from a killed run) are removed first: do not run one shard in two
    processes at once. Returns {"shard", "path", "users", "skipped", "stats": SearchStats}.
    """
    import pyarrow.parquet as pq

    c = job.config
    path = shard_path(c.out, shard_index, c.num_shards)
    at = shard_users(np.arange(len(job.users)), c.num_shards, shard_index)   # positions: pairs share a user
    users = job.users[at]
    conditions = None if job.conditions is None else job.conditions[at]
    result = {"shard": shard_index, "path": path, "users": len(users), "skipped": path.exists(),
              "stats": SearchStats()}
    if path.exists():
        _check_complete(job, path)
        return result
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    schema = _arrow_schema(job, shard_index, len(users))
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for a in range(0, len(users), c.chunk_users):
                rows = users[a:a + c.chunk_users]
                table, stats = chunk_table(job, rows, schema,
                                           None if conditions is None else conditions[a:a + c.chunk_users])
                writer.write_table(table)
                result["stats"].add(stats)
                if progress is not None:
                    progress.update(len(rows))
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        tmp.unlink(missing_ok=True)
    return result


# ------------------------------------------------------------------------------------------- whole job
def check_out_dir(c: CandidatesConfig) -> None:
    """Refuses an out directory holding shards of a different shard count (two jobs would mix); runs before
    anything is loaded. Shards of the same count are checked against the job when they are reached."""
    out = pathlib.Path(c.out)
    for p in out.glob("part-*-of-*.parquet") if out.is_dir() else []:
        m = _SHARD_NAME.fullmatch(p.name)
        if m and int(m.group(2)) != c.num_shards:
            raise CandidatesError(f"out={out} holds {p.name}, a shard of a {int(m.group(2))}-shard job, but "
                                  f"num_shards={c.num_shards}; use another out= or delete it")


def run(cfg) -> dict:
    """Runs the job's shards (`shard_index`, or all) in this process, with a tqdm bar of users/s.

    Returns {"out", "shards", "written", "skipped", "users", "seconds", "users_per_s", "stats"}.
    Raises:
      ConfigError: invalid config. CandidatesError / towers.restore.RestoreError: the job cannot run.
    """
    from tqdm import tqdm

    c = cfg if isinstance(cfg, CandidatesConfig) else validate(cfg)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every restore step at INFO
    t0 = time.perf_counter()
    check_out_dir(c)
    job = load_job(c)
    shards = [c.shard_index] if c.shard_index is not None else list(range(c.num_shards))
    todo = sum(len(shard_users(job.users, c.num_shards, s)) for s in shards
               if not shard_path(c.out, s, c.num_shards).exists())
    log.info("%d users in %d shard(s) of %d, %d to search (%s search, k=%d, overfetch %d) -> %s", len(job.users),
             len(shards), c.num_shards, todo, job.metadata["twotower.search"], c.k, job.overfetch, c.out)
    t1, stats = time.perf_counter(), SearchStats()
    with tqdm(total=todo, unit="users", dynamic_ncols=True, disable=not c.progress) as bar:
        results = [run_shard(job, s, bar) for s in shards]
    for r in results:
        stats.add(r["stats"])
    seconds = time.perf_counter() - t1
    summary = {"out": pathlib.Path(c.out), "shards": [str(r["path"]) for r in results],
               "written": sum(not r["skipped"] for r in results), "skipped": sum(r["skipped"] for r in results),
               "users": stats.users, "seconds": round(time.perf_counter() - t0, 3),
               "users_per_s": round(stats.users / max(seconds, 1e-9), 1), "stats": dataclasses.asdict(stats)}
    log.info("wrote %d shard(s), skipped %d complete; %d users at %.0f users/s (widened %d, exact fallback %d, "
             "fewer than k unseen items %d)", summary["written"], summary["skipped"], stats.users,
             summary["users_per_s"], stats.widened, stats.exact_fallback, stats.short)
    return summary


__all__ = ["CandidatesConfig", "CandidatesError", "Corpus", "Job", "SearchStats", "candidates_for", "chunk_table",
           "check_out_dir", "chunk_dataset", "embed_user_rows", "load_job", "read_pairs", "read_users", "run", "run_shard", "shard_path",
           "shard_users", "topk_unseen", "validate"]
