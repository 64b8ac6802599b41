"""Turning raw side information into feature arrays: categorical codes, multi-hot lists, buckets, title tokens.

Conventions shared by all sources: a categorical feature built from raw values reserves code 0 for
"unknown/missing" (so a missing value never collides with a real one), and multi-hot rows hold distinct codes
followed by -1 padding. The raw values of each feature are returned as a `Vocab` (row = code) so serving can
featurise new users and items exactly as training did.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from data.types import Vocab

UNKNOWN = "<unk>"
OOV = "<oov>"
# MovieLens-1M age groups (users.dat codes): under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
AGE_GROUP_CODES = (1, 18, 25, 35, 45, 50, 56)
AGE_SIZE = len(AGE_EDGES) + 2            # + unknown
# Release decades: <1910, 1910s, ..., 2010s, >=2020.
YEAR_EDGES = np.arange(1910, 2030, 10)
YEAR_SIZE = len(YEAR_EDGES) + 2          # + unknown
_YEAR_IN_TITLE = re.compile(r"\((\d{4})(?:[-–]\d{0,4})?\)")
_TOKEN = re.compile(r"\w+")


def encode_categorical(values: Sequence[str], known: Sequence[str] | None = None) -> tuple[np.ndarray, Vocab]:
    """Codes for string values; code 0 is unknown ("" or None, or not in `known` when given).

    Args:
      values: [n] raw values.
      known: the value list in code order (codes 1..len(known)); default: sorted distinct `values`.

    Returns:
      (int32 [n] codes, Vocab of [UNKNOWN, *known]).
    """
    if known is None:
        known = sorted({v for v in values if v})
    table = {v: i + 1 for i, v in enumerate(known)}
    codes = np.fromiter((table.get(v, 0) if v else 0 for v in values), dtype=np.int32, count=len(values))
    return codes, Vocab(np.array([UNKNOWN, *known], dtype=str))


def bucketize(values: np.ndarray, edges: np.ndarray, known: np.ndarray) -> np.ndarray:
    """int32 bucket codes: 0 where `known` is False, else 1 + index of the interval of `edges`."""
    return np.where(known, np.digitize(values, edges) + 1, 0).astype(np.int32)


def age_bucket(ages: np.ndarray) -> np.ndarray:
    """int32 [n] codes 0..AGE_SIZE-1 for raw ages in years (<= 0 = unknown)."""
    ages = np.asarray(ages)
    return bucketize(ages, AGE_EDGES, ages > 0)


def year_bucket(years: np.ndarray) -> np.ndarray:
    """int32 [n] decade codes 0..YEAR_SIZE-1 for release years (0 = unknown)."""
    years = np.asarray(years)
    return bucketize(years, YEAR_EDGES, years > 0)


def title_year(title: str) -> int:
    """The year of the last '(1995)' (or '(2007-2013)') in a MovieLens title, else 0."""
    found = _YEAR_IN_TITLE.findall(title)
    return int(found[-1]) if found else 0


def lists_to_multihot(lengths: np.ndarray, flat: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    """Packs ragged code lists into a padded matrix.

    Args:
      lengths: int [n] list lengths.
      flat: int [sum(lengths)] the lists' codes, concatenated.
      max_len: slots per row; longer lists keep their first `max_len` codes.

    Returns:
      (int32 [n, max_len] with -1 padding at the end, number of codes cut off).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = lengths.shape[0]
    out = np.full((n, max_len), -1, dtype=np.int32)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(rows.shape[0]) - np.repeat(starts, lengths)
    keep = pos < max_len
    out[rows[keep], pos[keep]] = np.asarray(flat)[keep]
    return out, int((~keep).sum())


def encode_lists(lists: Sequence[Sequence[str]], known: Sequence[str], max_len: int
                 ) -> tuple[np.ndarray, int, int]:
    """Multi-hot codes 0..len(known)-1 for lists of names (duplicates removed, order kept).

    Returns:
      (int32 [n, max_len], codes cut off by max_len, names not in `known`).
    """
    table = {v: i for i, v in enumerate(known)}
    lengths, flat, unknown = [], [], 0
    for names in lists:
        codes = list(dict.fromkeys(table[v] for v in names if v in table))
        unknown += sum(v not in table for v in names)
        lengths.append(len(codes))
        flat.extend(codes)
    out, cut = lists_to_multihot(np.array(lengths, dtype=np.int64), np.array(flat, dtype=np.int64), max_len)
    return out, cut, unknown


def title_tokens(titles: Sequence[str], vocab_size: int, max_len: int) -> tuple[np.ndarray, Vocab, dict]:
    """Lower-cased word tokens of titles (year removed) as a capped multi-hot feature.

    The vocabulary keeps the `vocab_size - 1` most frequent tokens (ties alphabetical); row 0 is the OOV bucket,
    which every rarer token maps to.

    Args:
      titles: [n] titles.
      vocab_size: vocabulary cap, including the OOV row.
      max_len: tokens kept per title (distinct, in title order).

    Returns:
      (int32 [n, max_len], token Vocab, stats {"title_tokens_cut", "title_tokens_oov"}).
    """
    token_lists = [list(dict.fromkeys(_TOKEN.findall(_YEAR_IN_TITLE.sub("", t).lower()))) for t in titles]
    counts = Counter(tok for toks in token_lists for tok in toks)
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))[: vocab_size - 1]
    table = {tok: i + 1 for i, tok in enumerate(ranked)}
    lengths, flat, oov = [], [], 0
    for toks in token_lists:
        codes = list(dict.fromkeys(table.get(tok, 0) for tok in toks))
        oov += sum(tok not in table for tok in toks)
        lengths.append(len(codes))
        flat.extend(codes)
    out, cut = lists_to_multihot(np.array(lengths, dtype=np.int64), np.array(flat, dtype=np.int64), max_len)
    vocab = Vocab(np.array([OOV, *ranked], dtype=str))
    return out, vocab, {"title_tokens_cut": cut, "title_tokens_oov": oov}
