"""Corpus freshness: `python -m serve.trending run_dir=RUN [log=PATH|run] [out=DIR | server=URL] ...`.

Owns the trending-items refresh: time-decayed engagement scores from an interaction log
(`trending_scores`, `select_trending`), the item-tower embeddings of the trending items, and their upsert
into either a new verified export directory (`serve.manifest.write_index`) or a running server
(`POST /v1/items`, loopback only).

Log format (`log=PATH`, Parquet file/directory or CSV with a header row), one row per interaction:

    item_id      int or string raw item id (`item_column`)
    timestamp    integer seconds, a timestamp or a date (`timestamp_column`)
    weight       optional engagement weight per row (`weight_column`; default 1 per row)
    <feature>    one column per item feature the run's item tower reads, named as in the run's
                 features.json: raw values as in training (strings for features with a value vocabulary,
                 integer codes for those without, numbers for dense features, lists for multi-hot ones).

Items are embedded as export and the server embed them (`towers.inference.embed`): items in the run's
vocabulary with their training features (the log's feature values are ignored for them) and their ID row if
they trained; items not in the vocabulary are new and are embedded from their features (and, with a hashed
item table, their id's hashed rows), taken from their latest row in the log, each raw value encoded with the
run's `feature_vocabs` (an unknown value becomes code 0, or is dropped from a multi-hot list). `log=run`
scores the run's own train/valid/test interactions (no new items).
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import pathlib
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, fields

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import configs
from data.cli import command, one_line_errors
from data.schema import ConfigError, described as _help, to_typed

log = logging.getLogger("twotower.trending")
DAY = 86_400
_LOOPBACK_NAMES = ("localhost",)
_POST_CHUNK = 1000          # items per POST /v1/items (the server accepts up to 10,000)


class TrendingError(RuntimeError):
    """The refresh cannot run as asked (unreadable log, missing feature columns, server mismatch)."""


# ------------------------------------------------------------------------------------------------ scoring
def trending_scores(item_rows, timestamps, *, now: float, half_life_days: float = 7.0,
                    window_days: float | None = 90.0, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Time-decayed engagement per item: score(i) = sum over i's interactions t in [now - window, now] of
    w * 0.5 ** ((now - t) / half_life). Interactions after `now` or before the window count nothing.

    Args:
      item_rows: int[N] item codes (any non-negative integers, e.g. vocabulary rows).
      timestamps: int or float[N] seconds.
      now: the reference time in seconds.
      half_life_days: days after which an interaction's weight halves (> 0).
      window_days: only the last `window_days` days count; None = all history up to `now`.
      weights: optional float[N] per-interaction weights (default 1).
    Returns:
      (items int64[M] distinct codes with at least one interaction in the window, ascending;
       scores float64[M] aligned with items).
    """
    rows = np.asarray(item_rows, np.int64).reshape(-1)
    ts = np.asarray(timestamps, np.float64).reshape(-1)
    if rows.shape != ts.shape:
        raise ValueError(f"item_rows {rows.shape} and timestamps {ts.shape} must have one length")
    if rows.size and rows.min() < 0:
        raise ValueError(f"item_rows must be >= 0, got {rows.min()}")
    if not half_life_days > 0:
        raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
    age = now - ts
    keep = age >= 0
    if window_days is not None:
        keep &= age <= window_days * DAY
    w = np.ones(rows.shape) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape != rows.shape:
        raise ValueError(f"weights {w.shape} must match item_rows {rows.shape}")
    decayed = w[keep] * np.exp2(-age[keep] / (half_life_days * DAY))
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    totals = np.bincount(rows[keep], weights=decayed)
    items = np.flatnonzero(np.bincount(rows[keep]) > 0).astype(np.int64)
    return items, totals[items]


def select_trending(scores, top_n: int, min_score: float = 0.0) -> np.ndarray:
    """Positions of the `top_n` highest scores that exceed `min_score`, best first (ties: lower position first).

    Args:
      scores: float[M].
    Returns:
      int64[K], K <= top_n.
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    eligible = np.flatnonzero(s > min_score)
    order = eligible[np.lexsort((eligible, -s[eligible]))]
    return order[:max(0, int(top_n))].astype(np.int64)


# ------------------------------------------------------------------------------------------------- config
@dataclass
class TrendingConfig:
    run_dir: str | None = _help(None, "run directory of `python -m train` (required)")
    step: int | None = _help(None, "checkpoint step; null = the latest")
    index_dir: str | None = _help(None, "export to refresh; null = <run_dir>/export/<model_version>")
    log: str = _help("run", "interaction log (.parquet, directory, .csv), or `run` = the run's own data")
    item_column: str = _help("item_id", "log column of raw item ids")
    timestamp_column: str = _help("timestamp", "log column of times (seconds, timestamp or date)")
    weight_column: str | None = _help(None, "optional log column of per-interaction weights")
    half_life_days: float = _help(7.0, "days after which an interaction counts half")
    window_days: float | None = _help(90.0, "only the last window_days count; null = all history")
    top_n: int = _help(1000, "trending items upserted")
    min_score: float = _help(0.0, "items scoring at most this are not trending")
    now: float | None = _help(None, "reference time in seconds; null = the latest timestamp in the log")
    out: str | None = _help(None, "new export directory; null = <index_dir>-trending-<now>")
    server: str | None = _help(None, "POST to this server's /v1/items (loopback only) instead of writing")
    batch_size: int = _help(1024, "items per item-tower call")


def _loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: DictConfig | dict) -> TrendingConfig:
    """Schema and value checks, before any JAX work. Raises `ConfigError` (one line)."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    c = to_typed(TrendingConfig, raw)
    exists = lambda p: p is None or pathlib.Path(p).exists()  # noqa: E731
    checks = [("run_dir", c.run_dir, c.run_dir is not None, "is required: python -m serve.trending run_dir=PATH"),
              ("run_dir", c.run_dir, c.run_dir is None or pathlib.Path(c.run_dir).is_dir(), "no such directory"),
              ("index_dir", c.index_dir, exists(c.index_dir), "no such directory"),
              ("log", c.log, c.log == "run" or exists(c.log), "no such file; give a .parquet/.csv path or `run`"),
              ("half_life_days", c.half_life_days, c.half_life_days > 0, "must be > 0"),
              ("window_days", c.window_days, c.window_days is None or c.window_days > 0, "must be > 0 or null"),
              ("top_n", c.top_n, c.top_n > 0, "must be > 0"),
              ("batch_size", c.batch_size, c.batch_size > 0, "must be > 0"),
              ("server", c.server, c.server is None or (c.server.startswith(("http://", "https://"))
                                                        and _loopback(c.server)),
               "must be an http URL on 127.0.0.1 / localhost (e.g. http://127.0.0.1:8000)"),
              ("out", c.out, c.out is None or c.server is None, "give out= or server=, not both"),
              ("out", c.out, c.out is None or c.index_dir is None
               or pathlib.Path(c.out).absolute() != pathlib.Path(c.index_dir).absolute(),
               "must differ from index_dir: the refresh writes a new export")]
    for key, value, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {why}")
    return c


# -------------------------------------------------------------------------------------------------- log
@dataclass
class Log:
    """An interaction log: raw item ids, times, weights, and (for file logs) the table for features."""
    ids: np.ndarray
    timestamps: np.ndarray
    weights: np.ndarray | None
    table: object = None            # pyarrow.Table, or None for `log=run`


def run_log(ds) -> Log:
    """The run's own train/valid/test interactions as a `Log` of raw item ids."""
    parts = [p for p in (ds.train, ds.valid, ds.test) if p is not None]
    rows = np.concatenate([p.item for p in parts])
    return Log(ds.item_vocab.raw_ids[rows], np.concatenate([p.timestamp for p in parts]), None)


def read_log(path, item_column: str = "item_id", timestamp_column: str = "timestamp",
             weight_column: str | None = None) -> Log:
    """Reads a Parquet/CSV log (same parsing as the `parquet` data source). Raises `data.errors.DataError`."""
    from data.sources.tabular import _column, _ids, _read, _timestamps

    path = pathlib.Path(path)
    table = _read(path, [item_column])
    ids = _ids(_column(table, item_column, path, "item_column"), item_column, path)
    ts = _timestamps(_column(table, timestamp_column, path, "timestamp_column"), timestamp_column, path)
    weights = None
    if weight_column:
        weights = np.asarray(_column(table, weight_column, path, "weight_column").to_numpy(zero_copy_only=False),
                             np.float64)
    return Log(ids, ts, weights, table)


def _as_vocab_kind(ids: np.ndarray, vocab_ids: np.ndarray) -> np.ndarray:
    """Log ids converted to the vocabulary's id kind (a CSV may read numeric ids as strings or vice versa)."""
    if vocab_ids.dtype.kind == "U":
        return ids.astype(str)
    if ids.dtype.kind == "U":
        try:
            return ids.astype(np.int64)
        except ValueError:
            raise TrendingError(f"the run's item ids are integers but the log holds ids like {ids[:3].tolist()}; "
                                "give the log the run's item ids") from None
    return ids.astype(np.int64)


# --------------------------------------------------------------------------------------------- features
def encode_value(spec, vocab, value):
    """One raw log value of an item feature -> its tower input row (unknown -> code 0 / dropped / zeros)."""
    if spec.kind == "dense":
        values = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        out = np.zeros(spec.size, np.float32)
        good = [float(v) for v in values if v is not None and np.isfinite(float(v))][:spec.size]
        out[:len(good)] = good
        return out
    values = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    codes = []
    for v in values:
        if vocab is not None:
            from serve.model import as_id_kind
            key = as_id_kind(v, "str" if vocab.raw_ids.dtype.kind == "U" else "int")
            code = -1 if key is None else int(vocab.lookup(np.asarray([key]), missing="minus_one")[0])
        else:  # no value vocabulary: the log holds integer codes
            code = int(v) if isinstance(v, (int, np.integer)) and 0 <= v < spec.size else -1
        codes.append(code)
    if spec.kind == "categorical":
        return np.asarray(max(codes[0], 0) if codes else 0, np.int32)
    kept = list(dict.fromkeys(c for c in codes if c >= 0))[:spec.max_len]
    out = np.full(spec.max_len, -1, np.int32)
    out[:len(kept)] = kept
    return out


def new_item_features(log_: Log, ids: np.ndarray, specs: list, feature_vocabs: dict) -> dict[str, np.ndarray]:
    """{name: array[M, ...]}: each new item's features from its latest log row, encoded for the tower."""
    if log_.table is None or not len(ids):
        return {s.name: np.zeros((0,), np.int32) for s in specs}
    missing = [s.name for s in specs if s.name not in log_.table.column_names]
    if missing:
        raise TrendingError(f"the log has {len(ids)} trending item(s) not in the run's vocabulary (e.g. "
                            f"{ids[:3].tolist()}) but no column(s) {missing} for the item features the tower "
                            "reads; add them (raw values as in training)")
    order = np.lexsort((log_.timestamps, log_.ids))         # latest row of each id is the last of its run
    last = order[np.searchsorted(log_.ids[order], ids, side="right") - 1]
    out = {}
    for s in specs:
        column = log_.table.column(s.name).take(last).to_pylist()
        out[s.name] = np.stack([encode_value(s, feature_vocabs.get(s.name), v) for v in column])
    return out


# ------------------------------------------------------------------------------------------------ refresh
def trending_items(c: TrendingConfig, log_: Log, item_vocab) -> dict:
    """Scores the log and picks the trending items: {"ids", "scores", "rows" (-1 = new), "now"}."""
    from data.ids import factorize

    if not len(log_.ids):
        raise TrendingError("the log holds no interactions")
    ids = _as_vocab_kind(log_.ids, item_vocab.raw_ids)
    log_.ids = ids
    now = float(c.now) if c.now is not None else float(log_.timestamps.max())
    uniques, codes = factorize(ids)
    items, scores = trending_scores(codes, log_.timestamps, now=now, half_life_days=c.half_life_days,
                                    window_days=c.window_days, weights=log_.weights)
    pick = select_trending(scores, c.top_n, c.min_score)
    chosen = uniques[items[pick]]
    return {"ids": chosen, "scores": scores[pick], "now": now,
            "rows": item_vocab.lookup(chosen, missing="minus_one").astype(np.int32)}


def embed_trending(trained, ds, log_: Log, picked: dict, batch_size: int) -> np.ndarray:
    """float32[K, D] by the inference layer's recipe (`towers.inference.embed.embed_items`, as export and the
    server embed items): known items with their training features, new items with their log features."""
    from towers.inference.embed import embed_items
    from towers.two_tower import feature_names

    rows, names = picked["rows"], feature_names(trained.model)[1]
    known, new = rows >= 0, rows < 0
    specs = [s for s in trained.item_specs if s.name in names]
    fresh = new_item_features(log_, picked["ids"][new], specs, trained.feature_vocabs)
    feats = {}
    for s in specs:
        values = np.zeros((len(rows), *ds.item_features[s.name].shape[1:]), ds.item_features[s.name].dtype)
        values[known] = ds.item_features[s.name][rows[known]]
        if new.any():
            values[new] = fresh[s.name]
        feats[s.name] = values
    return embed_items(trained, ds, rows, features=feats, raw_ids=picked["ids"], batch_size=batch_size)


def _post_items(server: str, model_version: str, ids: np.ndarray, emb: np.ndarray) -> dict:
    """Upserts embeddings into a running server, after checking it serves the same model. The bearer token
    of a server with an `auth_token` is read from TWOTOWER_AUTH_TOKEN, as the server reads it."""
    token = os.environ.get("TWOTOWER_AUTH_TOKEN")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    base = server.rstrip("/")
    with urllib.request.urlopen(f"{base}/healthz", timeout=30) as r:
        health = json.loads(r.read())
    if health.get("model_version") != model_version:
        raise TrendingError(f"{base} serves model {health.get('model_version')!r}, not {model_version!r}: "
                            "refresh the server of this run")
    reply = {}
    for a in range(0, len(ids), _POST_CHUNK):
        items = [{"id": i, "embedding": e} for i, e in zip(ids[a:a + _POST_CHUNK].tolist(),
                                                          emb[a:a + _POST_CHUNK].tolist())]
        req = urllib.request.Request(f"{base}/v1/items", data=json.dumps({"items": items}).encode(),
                                     headers={"Content-Type": "application/json", **auth}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        log.info("posted %d/%d items to %s", min(a + _POST_CHUNK, len(ids)), len(ids), base)
    return reply


def refresh(cfg) -> dict:
    """Runs the refresh. Returns {"trending", "new", "now", "ids", "scores", "out" | "server"}.

    Raises:
      ConfigError, TrendingError, data.errors.DataError (unreadable log), serve.manifest.IndexLoadError,
      towers.restore.RestoreError.
    """
    from serve.export import _load_model_and_data
    from serve.manifest import load_index, write_index

    c = cfg if isinstance(cfg, TrendingConfig) else validate(cfg)
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    trained, ds = _load_model_and_data(c)
    log.info("restored %s from %s", trained.model_version, c.run_dir)
    log_ = run_log(ds) if c.log == "run" else read_log(c.log, c.item_column, c.timestamp_column, c.weight_column)
    picked = trending_items(c, log_, trained.item_vocab)
    num_new = int((picked["rows"] < 0).sum())
    log.info("%d interactions read; %d trending items (%d new) at now=%d", len(log_.ids), len(picked["ids"]),
             num_new, picked["now"])
    summary = {"trending": len(picked["ids"]), "new": num_new, "now": picked["now"],
               "ids": picked["ids"], "scores": picked["scores"]}
    if not len(picked["ids"]):
        log.warning("no item scores above min_score=%s in the window; nothing to upsert", c.min_score)
        return summary
    emb = embed_trending(trained, ds, log_, picked, c.batch_size)
    if c.server:
        summary["server"] = _post_items(c.server, trained.model_version, picked["ids"], emb)
        log.info("server now holds %s items", summary["server"].get("index_size"))
        return summary
    index_dir = pathlib.Path(c.index_dir or pathlib.Path(c.run_dir) / "export" / trained.model_version)
    index, manifest = load_index(index_dir, model_version=trained.model_version)
    before = len(index)
    index.upsert(emb, picked["ids"])
    stamp = datetime.datetime.fromtimestamp(picked["now"], datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    out = pathlib.Path(c.out) if c.out else index_dir.parent / f"{index_dir.name}-trending-{stamp}"
    note = {"time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "now": picked["now"], "count": len(picked["ids"]), "new": num_new, "source": str(index_dir.absolute()),
            "log": c.log, "params": {k: v for k, v in asdict(c).items() if k not in ("run_dir", "out", "server")}}
    carried = {k: v for k, v in manifest.items() if k in ("run_dir", "step", "recall", "trending_refreshes")
               or k.startswith("ann_recall@")}
    extra = {**carried, "trending_refreshes": [*manifest.get("trending_refreshes", []), note]}
    summary["out"] = write_index(index, out, model_version=trained.model_version, extra=extra)
    log.info("upserted %d items into %s (%d -> %d items); wrote %s in %.1fs", len(picked["ids"]), index_dir,
             before, len(index), summary["out"], time.perf_counter() - t0)
    return summary


@command(lambda: {f.name for f in fields(TrendingConfig)})
@hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="trending")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        c = validate(cfg)
        from data.errors import DataError
        from serve.manifest import IndexLoadError
        from towers.restore import RestoreError
        try:
            s = refresh(c)
        except (TrendingError, DataError, IndexLoadError, RestoreError, OSError) as e:
            print(f"trending refresh failed: {e}", file=sys.stderr)
            sys.exit(1)
    top = ", ".join(f"{i}={v:.3g}" for i, v in zip(s["ids"][:5].tolist(), s["scores"][:5].tolist()))
    where = s.get("out") or c.server or "nothing written"
    print(f"trending: {s['trending']} items ({s['new']} new) at now={s['now']:.0f}; top: {top}; -> {where}")


if __name__ == "__main__":
    main()
