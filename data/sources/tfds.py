"""MovieLens through TensorFlow Datasets, mapped to exactly the columns and features of `source: movielens`.

Only prepared data is read (`data_dir`); TFDS downloads only with `download: true`, never in tests. Without
TensorFlow, TFDS reads datasets prepared in the ArrayRecord format (`tfds.data_source`). When the dataset is
not there, the error says to use `source: movielens` with the unzipped GroupLens directory, the offline
equivalent that yields the same Dataset.

Mapping: user_id / movie_id strings -> int ids, timestamp, user_rating (for min_rating), movie_title,
movie_genres (TFDS labels -> names, the same genre list as the raw reader), user_gender (True = "M"),
bucketized_user_age (1M age groups), user_occupation_text. For the item catalogue the matching
"<version>-movies" dataset is used when it is prepared too; otherwise items are the rated movies.
"""
from __future__ import annotations

import numpy as np

from data.assemble import RawLog
from data.config import DataConfig
from data.errors import DataError
from data.ids import as_id_array
from data.sources import movielens_meta as meta

TFDS_GENRES = (*meta.GENRES, meta.NO_GENRES)  # the ClassLabel names of movie_genres, in label order


def _offline_hint(name: str, why: str) -> DataError:
    return DataError(f"TFDS dataset {name!r} is not available: {why}. Offline, use `source: movielens` with the "
                     "raw GroupLens directory instead, which gives the same Dataset (data=movielens "
                     "data.path=<unzipped ml-100k, ml-1m, ... directory>); or point data.data_dir at prepared TFDS "
                     "data (data.download=true lets TFDS download it where a network is available)")


def _text(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _ids(values) -> np.ndarray:
    text = _text(values)
    if all(t.isdigit() for t in text):
        return np.array([int(t) for t in text], dtype=np.int64)
    return as_id_array(np.array(text, dtype=str))


def _first_per_id(ids: np.ndarray) -> np.ndarray:
    """Index of the first row of each distinct id, in order of first appearance."""
    _, first = np.unique(ids, return_index=True)
    return np.sort(first)


def from_tfds_columns(ratings: dict, cfg: DataConfig, name: str, movies: dict | None = None) -> RawLog:
    """Builds the `RawLog` from TFDS MovieLens feature columns.

    Args:
      ratings: {feature: sequence [n]} of a "*-ratings" dataset (strings may be bytes; movie_genres is a list
        of label ints per row).
      cfg: the data config (min_rating, title_vocab_size, title_max_len).
      name: dataset name for messages.
      movies: optional columns of the matching "*-movies" dataset, used as the item catalogue.
    """
    user, item = _ids(ratings["user_id"]), _ids(ratings["movie_id"])
    ts = np.asarray(ratings["timestamp"], dtype=np.int64)
    stats = {"rows_read": int(user.size), "filtered": {}, "tfds_name": name}
    if cfg.min_rating is not None:
        keep = np.asarray(ratings["user_rating"], dtype=np.float64) >= cfg.min_rating
        stats["filtered"]["min_rating"] = int((~keep).sum())
    else:
        keep = np.ones(user.size, dtype=bool)
    cat = movies if movies is not None else ratings
    cat_ids = _ids(cat["movie_id"])
    rows = _first_per_id(cat_ids)
    all_titles = _text(cat["movie_title"])
    titles = [all_titles[r] for r in rows]
    genres = [[TFDS_GENRES[int(g)] for g in cat["movie_genres"][r]] for r in rows]
    item_table, vocabs, item_stats = meta.movie_table(cat_ids[rows], titles, genres, cfg, "tfds")
    stats.update(item_stats)
    user_table = None
    if "user_gender" in ratings:
        first = _first_per_id(user)
        genders = ["M" if bool(ratings["user_gender"][r]) else "F" for r in first]
        ages = np.asarray(ratings["bucketized_user_age"], dtype=np.float64)[first].astype(np.int64)
        all_occupations = _text(ratings["user_occupation_text"])
        occupations = [all_occupations[r] for r in first]
        user_table, user_vocabs = meta.user_table(user[first], ages, genders, occupations, "tfds")
        vocabs.update(user_vocabs)
    return RawLog(name=name.replace("/", "-"), user=user[keep], item=item[keep], timestamp=ts[keep], stats=stats,
                  user_table=user_table, item_table=item_table, item_catalog=True, feature_vocabs=vocabs)


def _columns(tfds, name: str, cfg: DataConfig) -> dict:
    """All records of a prepared TFDS dataset's train split as {feature: list}."""
    try:
        builder = tfds.builder(name, data_dir=cfg.data_dir)
    except Exception as e:  # TFDS raises several types here (DatasetNotFoundError, ImportError of TF, ...)
        raise _offline_hint(name, f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not builder.is_prepared():
        if not cfg.download:
            raise _offline_hint(name, f"not prepared under {builder.data_dir} and data.download is false")
        builder.download_and_prepare(file_format="array_record")
    try:
        source = builder.as_data_source(split="train")
        records = [source[i] for i in range(len(source))]
    except Exception as e:
        raise _offline_hint(name, f"cannot read it without TensorFlow ({type(e).__name__}: {e}); prepare it "
                                  "with file_format='array_record'") from None
    return {k: [r[k] for r in records] for k in (records[0] if records else {})}


def read(cfg: DataConfig) -> RawLog:
    """Reads `cfg.name` (e.g. movielens/100k-ratings) from TFDS into a `RawLog`."""
    name = cfg.name or ""
    if not (name.startswith("movielens/") and name.endswith("-ratings")):
        raise DataError(f"data.name {name!r}: the tfds source maps MovieLens rating datasets "
                        "('movielens/<version>-ratings', e.g. movielens/100k-ratings)")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise _offline_hint(name, "tensorflow_datasets is not installed") from None
    ratings = _columns(tfds, name, cfg)
    try:
        movies = _columns(tfds, name.replace("-ratings", "-movies"), cfg)
    except DataError:
        movies = None
    return from_tfds_columns(ratings, cfg, name, movies)
