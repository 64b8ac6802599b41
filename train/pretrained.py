"""Starting ID tables from pre-trained embeddings: another run's checkpoint, or a .npy with its id list.

`model.<tower>.table.pretrained` names the source: a run directory (its latest checkpoint and `vocab/`) or a
.npy of [n, id_dim] embeddings with `pretrained_ids`, a .npy of the n raw ids. Rows are matched by raw id,
never by row number, since two runs (or a run and an export) number their vocabularies differently. Ids of
this run missing from the source keep their normal random initialisation; source ids this run does not have
are ignored. Both are counted, with examples, in the log and in `pretrained.json` in the run directory.

`model.<tower>.table.freeze` then keeps the table fixed (`train.sparse.FrozenTable`); id dropout
(`model.<tower>.id_dropout`, `id_dropout_elementwise`) still applies to it during training.

Every run records the time window of its training interactions in `data_window.json`. A run-directory source
whose window overlaps this run's is refused (its table has already seen the interactions this run learns from,
which Pinterest found costs quality) unless `model.<tower>.table.allow_window_overlap` is set; then it is
logged and recorded in `pretrained.json`. Sources without timestamps, older runs without the file and .npy
sources have an unknown window: reported as such, never refused.
"""
from __future__ import annotations

import datetime
import json
import logging
import pathlib

import numpy as np

from data.errors import DataError
from data.types import Vocab
from data.schema import ConfigError
from towers.id_tables import TABLE_TOWERS

log = logging.getLogger("twotower.train")
EXAMPLES = 5


def load_source(path: str, ids_path: str | None, table: str) -> tuple[np.ndarray, np.ndarray]:
    """The source's raw ids [n] and embeddings [n, dim].

    Args:
      path: a run directory of `python -m train`, or a .npy of embeddings.
      ids_path: for a .npy, the .npy of its raw ids (one per row).
      table: "user" or "item".
    Raises:
      ConfigError: the source is missing, unreadable or inconsistent.
    """
    key = f"model.{TABLE_TOWERS[table]}.table.pretrained"
    src = pathlib.Path(path)
    if src.is_dir():
        from towers.restore import RestoreError, load_trained
        try:
            trained = load_trained(src)
        except RestoreError as e:
            raise ConfigError(f"{key}={path!r}: {e}") from None
        if table not in trained.tables:
            raise ConfigError(f"{key}={path!r}: that run has no {table} ID table")
        vocab = trained.user_vocab if table == "user" else trained.item_vocab
        return vocab.raw_ids, np.asarray(trained.tables[table])[:len(vocab)]
    if src.suffix != ".npy" or not src.is_file():
        raise ConfigError(f"{key}={path!r}: expected a run directory or an existing .npy file")
    emb = np.load(src, allow_pickle=False)
    ids = np.load(ids_path, allow_pickle=False) if ids_path else None
    if emb.ndim != 2 or ids is None or ids.shape != (emb.shape[0],):
        raise ConfigError(f"{key}={path!r}: need embeddings [n, dim] and pretrained_ids [n], got "
                          f"{list(emb.shape)} and {None if ids is None else list(ids.shape)}")
    return ids, emb.astype(np.float32)


def align(vocab: Vocab, source_ids: np.ndarray, source_emb: np.ndarray, dim: int, *,
          where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Matches a source table to this run's vocabulary by raw id.

    Args:
      vocab: this run's vocabulary of the table.
      source_ids: [n] raw ids of the source rows; source_emb: [n, dim].
      where: config key for error messages.
    Returns:
      (rows int64[m] of this run's table, values float32[m, dim], report dict).
    Raises:
      ConfigError: a different width, duplicate source ids, or ids of another kind (int vs str).
    """
    if source_emb.shape[1] != dim:
        raise ConfigError(f"{where}: the source rows have width {source_emb.shape[1]} but model.id_dim={dim}")
    try:
        source_rows = Vocab(source_ids).lookup(vocab.raw_ids, missing="minus_one")
        unused = vocab.lookup(source_ids, missing="minus_one") < 0
    except DataError as e:
        raise ConfigError(f"{where}: cannot match the source's ids to this run's: {e}") from None
    found = source_rows >= 0
    rows = np.flatnonzero(found)
    missing_ids, unused_ids = vocab.raw_ids[~found], np.asarray(source_ids)[unused]
    report = {"source_rows": int(len(source_ids)), "table_ids": len(vocab), "matched": int(found.sum()),
              "missing_in_source": int(missing_ids.size),
              "missing_examples": missing_ids[:EXAMPLES].tolist(),
              "unused_source_ids": int(unused_ids.size), "unused_examples": unused_ids[:EXAMPLES].tolist(),
              "same_row_order": bool(np.array_equal(source_rows[found], rows))}
    return rows.astype(np.int64), source_emb[source_rows[found]], report


WINDOW_FILE = "data_window.json"
UNKNOWN = {"start": None, "end": None}


def train_window(train_timestamps: np.ndarray) -> dict:
    """{"start", "end"}: the first and last timestamp of the training interactions, both None when the source
    has no time (all zeros, see `data.types.Interactions`)."""
    ts = np.asarray(train_timestamps)
    if ts.size == 0 or not ts.any():
        return dict(UNKNOWN)
    return {"start": int(ts.min()), "end": int(ts.max())}


def save_window(run_dir: pathlib.Path, train_timestamps: np.ndarray) -> None:
    """Records the run's training window, which a later run starting from its tables checks against its own."""
    (pathlib.Path(run_dir) / WINDOW_FILE).write_text(json.dumps({"train": train_window(train_timestamps)}))


def _shown(ts: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(ts)


def check_window(source: str, window: dict, *, allow: bool, key: str) -> dict:
    """Compares a pre-trained source's training window with this run's.

    Args:
      source: the `pretrained` value (a run directory records its window; a .npy does not).
      window: this run's `train_window`.
      allow: `allow_window_overlap`.
      key: the config key, for messages.
    Returns:
      {"source_window", "train_window", "overlap": True, False or "unknown"} for `pretrained.json`.
    Raises:
      ConfigError: the windows overlap and `allow` is false.
    """
    path = pathlib.Path(source) / WINDOW_FILE
    theirs = json.loads(path.read_text())["train"] if path.is_file() else dict(UNKNOWN)
    report = {"source_window": theirs, "train_window": window, "overlap": "unknown"}
    if None in (theirs["start"], window["start"]):
        why = ("this run's data has no timestamps" if window["start"] is None else
               "that run's data has no timestamps" if path.is_file() else
               "it records no training window: a .npy, or a run written before runs recorded theirs")
        log.warning("%s=%s: whether its training window overlaps this run's is unknown (%s)", key, source, why)
        return report
    report["overlap"] = theirs["start"] <= window["end"] and window["start"] <= theirs["end"]
    if report["overlap"]:
        what = (f"{key}={source!r}: that run trained on interactions from {_shown(theirs['start'])} to "
                f"{_shown(theirs['end'])}, overlapping this run's training window {_shown(window['start'])} to "
                f"{_shown(window['end'])}")
        if not allow:
            raise ConfigError(f"{what}; pre-train on earlier interactions, or set "
                              f"{key.removesuffix('pretrained')}allow_window_overlap=true")
        log.warning("%s (allowed by allow_window_overlap)", what)
    return report


def pretrained_overrides(c, vocabs: dict[str, Vocab], tables: set[str], run_dir: pathlib.Path | None,
                         window: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Rows to copy into each table that has a `pretrained` source, matched by raw id and reported.

    Args:
      c: the validated `train.config.Config`.
      vocabs: {"user": Vocab, "item": Vocab} of this run.
      tables: the tables the model has.
      run_dir: where `pretrained.json` goes (None: do not write it, e.g. on processes other than 0).
      window: this run's `train_window`, checked against each source's (None: unknown).
    Returns:
      {table: (rows int64[m], values float32[m, id_dim])} for `train.state.init_state(overrides=...)`.
    Raises:
      ConfigError: a bad source, or one whose training window overlaps this run's (see `check_window`).
    """
    out, reports = {}, {}
    for table, tower in TABLE_TOWERS.items():
        t = getattr(c.model, tower).table
        if not t.pretrained:
            continue
        key = f"model.{tower}.table.pretrained"
        if table not in tables:
            raise ConfigError(f"{key}={t.pretrained!r}: this model has no {table} ID table")
        overlap = check_window(t.pretrained, window or dict(UNKNOWN), allow=t.allow_window_overlap, key=key)
        ids, emb = load_source(t.pretrained, t.pretrained_ids, table)
        rows, values, report = align(vocabs[table], ids, emb, c.model.id_dim, where=f"{key}={t.pretrained!r}")
        report.update(source=t.pretrained, frozen=bool(t.freeze), **overlap)
        out[table], reports[table] = (rows, values), report
        log.info("%s table: %d of %d ids start from %s%s", table, report["matched"], report["table_ids"],
                 t.pretrained, " (frozen)" if t.freeze else "")
        if report["missing_in_source"]:
            log.warning("%s table: %d ids are not in %s and start from the normal initialisation, e.g. %s",
                        table, report["missing_in_source"], t.pretrained, report["missing_examples"])
        if report["unused_source_ids"]:
            log.info("%s table: %d ids of %s are not in this run's vocabulary (unused), e.g. %s", table,
                     report["unused_source_ids"], t.pretrained, report["unused_examples"])
    if reports and run_dir is not None:
        (pathlib.Path(run_dir) / "pretrained.json").write_text(json.dumps(reports, indent=2, default=str))
    return out
