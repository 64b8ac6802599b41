"""LightGCN / NGCF text splits: `train.txt` and `test.txt` with one `user item item ...` line per user.

Ids are used as given (0-based in the published files; any non-negative integers up to int64's maximum work).
The split is the files' split (`split: given`); there are no timestamps, so each user's items keep their file
order. A line may list a user without items; such lines are counted in the stats
(`given_train_lines_without_items`, `given_test_lines_without_items`), as are the users that only such lines
name (`given_users_without_items`: they have no interaction, so they are not users of the dataset).
Parsing is vectorised over the raw bytes (about 1M ids in well under a second); a file with anything but
digits, single spaces and newlines goes through a line-by-line reader that either accepts it (tabs, CRLF,
repeated spaces) or names the first bad line.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np

from data.assemble import RawLog
from data.config import DataConfig
from data.errors import DataError, line_error
from data.paths import resolve_path

_ID = re.compile(r"\d+")
_MAX_DIGITS = 18  # int64 holds any 18-digit number
_INT64_MAX = int(np.iinfo(np.int64).max)
_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[list(b"0123456789 \n")] = True


def _parse_fast(data: bytes):
    """(user per line, items per line, flat items) or None when the bytes need the careful reader."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    if not _ALLOWED[buf].all() or b"  " in data or b" \n" in data or b"\n " in data or data[:1] == b" ":
        return None
    is_digit = buf != ord(" ")
    is_digit &= buf != ord("\n")
    start = is_digit.copy()
    start[1:] &= ~is_digit[:-1]
    pos = np.flatnonzero(is_digit)
    if pos.size == 0:  # blank lines only
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    run = np.cumsum(start)[pos] - 1
    run_len = np.bincount(run)
    if run_len.max() > _MAX_DIGITS:
        return None
    first = np.cumsum(run_len) - run_len
    exp = (first + run_len - 1)[run] - np.arange(pos.size)
    values = np.add.reduceat((buf[pos] - ord("0")).astype(np.int64) * 10 ** exp, first)
    line_of_token = np.cumsum(buf == ord("\n"))[pos[first]]
    line_ids, tokens = np.unique(line_of_token, return_counts=True)  # a few 10k lines: np.unique is fine here
    line_start = np.cumsum(tokens) - tokens
    users = values[line_start]
    is_item = np.ones(values.size, dtype=bool)
    is_item[line_start] = False
    return users, tokens - 1, values[is_item]


def _parse_careful(path: pathlib.Path):
    users, lengths, items = [], [], []
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            bad = next((p for p in parts if not _ID.fullmatch(p)), None)
            if bad is not None:
                raise line_error(path, lineno, f"expected non-negative integer ids 'user item item ...', "
                                               f"found {bad!r}", line)
            big = next((p for p in parts if len(p) > _MAX_DIGITS and int(p) > _INT64_MAX), None)
            if big is not None:
                raise line_error(path, lineno, f"id {big!r} is too large for int64 (at most {_INT64_MAX}); renumber "
                                               "the ids, or load them as string ids from a Parquet log with a "
                                               "string column (source: parquet)", line)
            users.append(int(parts[0]))
            lengths.append(len(parts) - 1)
            items.extend(int(p) for p in parts[1:])
    return (np.array(users, dtype=np.int64), np.array(lengths, dtype=np.int64), np.array(items, dtype=np.int64))


def _read_lines(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user int64 [lines], item count int64 [lines], items int64 [n]) of one file's non-blank lines."""
    with open(path, "rb") as f:
        data = f.read()
    parsed = _parse_fast(data)
    return _parse_careful(path) if parsed is None else parsed


def _pairs(lines: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    users, lengths, items = lines
    return np.repeat(users, lengths), items


def read_lists(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one `user item item ...` file.

    Returns:
      (user int64 [n], item int64 [n]) pairs in file order.
    """
    return _pairs(_read_lines(path))


def read(cfg: DataConfig) -> RawLog:
    """Reads `train.txt` and `test.txt` of `cfg.path` into a `RawLog` with the given split."""
    root = resolve_path(cfg.path)
    files = [root / "train.txt", root / "test.txt"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"LightGCN data needs train.txt and test.txt in {root}; missing: {', '.join(missing)}")
    train, test = _read_lines(files[0]), _read_lines(files[1])
    if train[2].size == 0:
        raise DataError(f"{files[0]}: no interactions (no 'user item item ...' line lists an item); LightGCN data "
                        "needs training interactions")
    (tr_u, tr_i), (te_u, te_i) = _pairs(train), _pairs(test)
    user = np.concatenate([tr_u, te_u])
    is_test = np.concatenate([np.zeros(tr_u.size, bool), np.ones(te_u.size, bool)])
    stats = {"rows_read": int(user.size), "filtered": {}, "given_train_rows": int(tr_u.size),
             "given_test_rows": int(te_u.size), **_itemless_stats(train, test, user)}
    return RawLog(name=root.name, user=user, item=np.concatenate([tr_i, te_i]), timestamp=None,
                  is_test=is_test, stats=stats)


def _itemless_stats(train, test, user: np.ndarray) -> dict:
    """Counts the lines that list a user without items, and the users named only on such lines (who have no
    interaction and so are not in the dataset)."""
    empty = [users[lengths == 0] for users, lengths, _ in (train, test)]
    only_empty = np.setdiff1d(np.concatenate(empty), user) if empty[0].size or empty[1].size else empty[0]
    return {"given_train_lines_without_items": int(empty[0].size),
            "given_test_lines_without_items": int(empty[1].size),
            "given_users_without_items": int(only_empty.size)}
