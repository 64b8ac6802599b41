"""MovieLens from its raw directory, format detected from the files present.

* ml-100k: `u.data` (tab-separated), `u.item` (pipe-separated, latin-1), `u.user`.
* ml-1m / ml-10m: `ratings.dat` (`::`-separated), `movies.dat`, `users.dat` (1M only).
* ml-latest(-small) / ml-20m / ml-25m: `ratings.csv`, `movies.csv` (RFC-4180 quoting, CRLF).

Every rating is an interaction (`min_rating` drops lower ratings and counts them). The item vocabulary is every
movie of the movie file plus any rated movie missing from it, so unrated movies exist as items with features
(ml-latest-small: 9,742 items, 9,724 of them rated). Side features: see `movielens_meta`.
"""
from __future__ import annotations

import pathlib

import numpy as np

from data.assemble import RawLog
from data.config import DataConfig
from data.errors import DataError, line_error
from data.paths import int_field, resolve_path
from data.sources import movielens_meta as meta
from data.textio import detect_encoding, iter_csv, iter_fields, read_table

_RATING_KINDS = ("int", "int", "float", "int")


def detect_format(root: pathlib.Path) -> str:
    """'100k', 'dat' (1M/10M) or 'csv' (latest, 20M, 25M) from the ratings file present in `root`."""
    for fmt, name in (("100k", "u.data"), ("dat", "ratings.dat"), ("csv", "ratings.csv")):
        if (root / name).is_file():
            return fmt
    raise DataError(f"{root} is not a MovieLens directory: expected u.data (ml-100k), ratings.dat (ml-1m, "
                    "ml-10m) or ratings.csv (ml-latest, ml-20m, ml-25m); point data.path at the unzipped folder")


def _ratings(root: pathlib.Path, fmt: str) -> dict[str, np.ndarray]:
    if fmt == "csv":
        names = ["userId", "movieId", "rating", "timestamp"]
        cols = read_table(root / "ratings.csv", sep=",", names=names, kinds=dict(zip(names, _RATING_KINDS)),
                          header=True, quoted=True)
        return dict(zip(("user", "item", "rating", "timestamp"), (cols[n] for n in names)))
    names = ["user", "item", "rating", "timestamp"]
    path, sep = (root / "u.data", "\t") if fmt == "100k" else (root / "ratings.dat", "::")
    return read_table(path, sep=sep, names=names, kinds=dict(zip(names, _RATING_KINDS)))


def _movies_100k(path: pathlib.Path):
    ids, titles, genres = [], [], []
    for lineno, f in iter_fields(path, sep="|", width=24, encoding="latin-1"):
        line = "|".join(f)
        ids.append(int_field(path, lineno, f[0], "movie id", line))
        titles.append(f[1])
        if any(x not in ("0", "1") for x in f[5:]):
            raise line_error(path, lineno, "genre flags (fields 6-24) must be 0 or 1", line)
        genres.append([meta.GENRES_100K[i] for i, x in enumerate(f[5:]) if x == "1"])
    return ids, titles, genres


def _movies_dat(path: pathlib.Path):
    ids, titles, genres = [], [], []
    for lineno, f in iter_fields(path, sep="::", width=3, encoding=detect_encoding(path)):
        ids.append(int_field(path, lineno, f[0], "movie id", "::".join(f)))
        titles.append(f[1])
        genres.append(f[2].split("|"))
    return ids, titles, genres


def _movies_csv(path: pathlib.Path):
    ids, titles, genres = [], [], []
    for lineno, row in iter_csv(path, required=["movieId", "title", "genres"]):
        ids.append(int_field(path, lineno, row["movieId"], "movieId", ",".join(row.values())))
        titles.append(row["title"])
        genres.append(row["genres"].split("|"))
    return ids, titles, genres


def _users(root: pathlib.Path, fmt: str):
    """(ids, ages, genders, occupations, file name) of u.user / users.dat, or None where the format has none."""
    ids, ages, genders, occupations = [], [], [], []
    if fmt == "100k" and (root / "u.user").is_file():
        path = root / "u.user"
        for lineno, f in iter_fields(path, sep="|", width=5):
            ids.append(int_field(path, lineno, f[0], "user id", "|".join(f)))
            ages.append(int_field(path, lineno, f[1], "age", "|".join(f)))
            genders.append(f[2])
            occupations.append(f[3])
    elif fmt == "dat" and (root / "users.dat").is_file():
        path = root / "users.dat"
        for lineno, f in iter_fields(path, sep="::", width=5):
            line = "::".join(f)
            ids.append(int_field(path, lineno, f[0], "user id", line))
            genders.append(f[1])
            ages.append(int_field(path, lineno, f[2], "age group", line))
            code = int_field(path, lineno, f[3], "occupation", line)
            if not 0 <= code < len(meta.OCCUPATIONS_1M):
                raise line_error(path, lineno, f"occupation code {code} is not in 0..20", line)
            occupations.append(meta.OCCUPATIONS_1M[code])
    else:
        return None
    return np.array(ids, dtype=np.int64), np.array(ages), genders, occupations, path.name


def read(cfg: DataConfig) -> RawLog:
    """Reads a MovieLens directory (`cfg.path`) into a `RawLog`."""
    root = resolve_path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} must be the MovieLens directory, not a file")
    fmt = detect_format(root)
    cols = _ratings(root, fmt)
    stats = {"rows_read": int(cols["user"].shape[0]), "filtered": {}, "movielens_format": fmt}
    if cfg.min_rating is not None:
        keep = cols["rating"] >= cfg.min_rating
        stats["filtered"]["min_rating"] = int((~keep).sum())
        cols = {k: v[keep] for k, v in cols.items()}
    movie_file = {"100k": "u.item", "dat": "movies.dat", "csv": "movies.csv"}[fmt]
    item_table, vocabs = None, {}
    if (root / movie_file).is_file():
        reader = {"100k": _movies_100k, "dat": _movies_dat, "csv": _movies_csv}[fmt]
        ids, titles, genres = reader(root / movie_file)
        item_table, vocabs, item_stats = meta.movie_table(np.array(ids, dtype=np.int64), titles, genres, cfg,
                                                          movie_file)
        stats.update(item_stats)
    else:
        stats["missing_movie_file"] = movie_file
    user_table, users = None, _users(root, fmt)
    if users is not None:
        user_table, user_vocabs = meta.user_table(*users)
        vocabs.update(user_vocabs)
    return RawLog(name=root.name, user=cols["user"], item=cols["item"], timestamp=cols["timestamp"],
                  stats=stats, user_table=user_table, item_table=item_table, item_catalog=True,
                  feature_vocabs=vocabs)
