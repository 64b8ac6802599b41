"""Raw-id arrays: normalising their dtype, and fast sorted-unique / factorize for millions of ids.

Raw ids (user and item ids as they appear in a log) are either integers (stored as int64) or strings (stored as
a fixed-width unicode array, so they save with `allow_pickle=False`). Dense integer ranges, the common case
(MovieLens, LightGCN, synthetic ids), take an O(N) table path instead of sorting.
"""
from __future__ import annotations

import numpy as np

from data.errors import DataError

# An integer id range at most this many times the number of ids is handled with a lookup table, not a sort.
_DENSE_SPAN_FACTOR = 4
_DENSE_SPAN_MIN = 1 << 20


def as_id_array(values, what: str = "ids") -> np.ndarray:
    """Returns `values` as an int64 array or a unicode (`<U`) array; anything else is a `DataError`.

    Args:
      values: array-like of integer or string ids, shape [n].
      what: name used in error messages.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise DataError(f"{what} has unsigned values above int64 range")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8")
    if arr.dtype.kind == "O":
        if all(isinstance(v, str) for v in arr.tolist()):
            return arr.astype(str) if arr.size else np.zeros(0, dtype="<U1")
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.tolist()):
            return arr.astype(np.int64)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    raise DataError(
        f"{what} must be integers or strings, got dtype {arr.dtype}; convert float or mixed id columns "
        "to int64 or str before loading")


def _dense_span_ok(lo: int, hi: int, n: int) -> bool:
    return hi - lo + 1 <= max(_DENSE_SPAN_FACTOR * n, _DENSE_SPAN_MIN)


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an id array (faster than `np.unique` for large int arrays)."""
    if values.size == 0:
        return values.copy()
    if values.dtype.kind == "i":
        lo, hi = int(values.min()), int(values.max())
        if _dense_span_ok(lo, hi, values.size):
            present = np.zeros(hi - lo + 1, dtype=bool)
            present[values - lo] = True
            return (np.flatnonzero(present) + lo).astype(np.int64)
    s = np.sort(values)
    keep = np.ones(s.size, dtype=bool)
    keep[1:] = s[1:] != s[:-1]
    return s[keep]


def factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps ids to codes 0..K-1 in sorted-id order.

    Args:
      values: int64 or unicode ids, shape [n].

    Returns:
      (uniques [K] sorted, codes int32 [n]) with `uniques[codes] == values`.
    """
    if values.dtype.kind == "i" and values.size:
        lo, hi = int(values.min()), int(values.max())
        if _dense_span_ok(lo, hi, values.size):
            present = np.zeros(hi - lo + 1, dtype=bool)
            present[values - lo] = True
            table = np.cumsum(present, dtype=np.int64) - 1
            uniques = (np.flatnonzero(present) + lo).astype(np.int64)
            return uniques, table[values - lo].astype(np.int32)
    uniques = sorted_unique(values)
    return uniques, np.searchsorted(uniques, values).astype(np.int32)


# splitmix64's finaliser constants: a bijective mix of 64 bits in which every input bit affects every output bit.
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def hash_ids(values, seed: int = 0) -> np.ndarray:
    """A stable 64-bit hash of raw ids: the same on every machine, process and run (unlike Python's `hash`).

    Integer ids are mixed directly; string ids are first folded code point by code point (FNV-1a), ignoring
    the NUL padding of fixed-width arrays, so "ab" hashes the same in a `<U2` and a `<U40` array.

    Args:
      values: int or str raw ids, shape [n] (see `as_id_array`).
      seed: selects an independent hash function.
    Returns:
      uint64 [n].
    """
    arr = as_id_array(values, "hashed ids")
    if arr.dtype.kind == "i":
        h = arr.view(np.uint64)
    else:
        codes = arr.view(np.uint32).reshape(arr.shape[0], -1) if arr.size else np.zeros((0, 1), np.uint32)
        h = np.full(arr.shape[0], _FNV_OFFSET, np.uint64)
        for j in range(codes.shape[1]):
            c = codes[:, j].astype(np.uint64)
            h = np.where(c != 0, (h ^ c) * _FNV_PRIME, h)
    salt = _mix64(np.asarray([seed % (1 << 64)], np.uint64) + _GOLDEN)
    return _mix64(h ^ salt)
