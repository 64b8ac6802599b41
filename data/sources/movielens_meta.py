"""MovieLens side features, built from plain columns so the raw-directory and TFDS sources agree exactly.

Items: `genres` (multi-hot over the TFDS MovieLens genre list, so every MovieLens version and both sources use
the same codes; "Children's" is "Children", 100K's "unknown" is "Unknown", "(no genres listed)" is no genre;
names outside the list are appended in sorted order), `year` (release decade from the title, code 0 = unknown)
and `title` (lower-cased title tokens, see `data.features.title_tokens`).
Users (100K and 1M only): `age` (1M age groups; 100K raw ages are bucketed the same way), `gender` (0 unknown,
1 M, 2 F) and `occupation` (the occupation text, sorted vocabulary, 0 unknown).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.assemble import FeatureTable
from data.config import DataConfig
from data.features import (AGE_SIZE, YEAR_SIZE, age_bucket, encode_categorical, encode_lists, title_tokens,
                           title_year, year_bucket)
from data.types import FeatureSpec, Vocab

GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "Unknown", "War",
          "Western")
NO_GENRES = "(no genres listed)"
_GENRE_ALIASES = {"Children's": "Children", "unknown": "Unknown"}
# 100K's u.genre order: the 19 flag columns of u.item.
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
# users.dat occupation codes of MovieLens 1M (its README).
OCCUPATIONS_1M = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                  "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
                  "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
                  "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
GENDERS = ("M", "F")


def _normalise_genres(genre_lists: Sequence[Sequence[str]]) -> tuple[list[list[str]], list[str]]:
    lists = [[_GENRE_ALIASES.get(g, g) for g in names if g and g != NO_GENRES] for names in genre_lists]
    extra = sorted({g for names in lists for g in names} - set(GENRES))
    return lists, [*GENRES, *extra]


def movie_table(ids: np.ndarray, titles: Sequence[str], genre_lists: Sequence[Sequence[str]], cfg: DataConfig,
                source: str) -> tuple[FeatureTable, dict[str, Vocab], dict]:
    """Item features of MovieLens movies.

    Args:
      ids: int64 [n] movie ids.
      titles: [n] titles with the year in parentheses.
      genre_lists: [n] lists of genre names as the files spell them.
      cfg: data config (title_vocab_size, title_max_len).
      source: file name for stats and messages.

    Returns:
      (FeatureTable with genres/year/title, feature vocabularies, stats).
    """
    lists, names = _normalise_genres(genre_lists)
    genre_len = max([len(set(g)) for g in lists] + [1])
    genres, _, _ = encode_lists(lists, names, genre_len)
    years = np.array([title_year(t) for t in titles], dtype=np.int64)
    title, token_vocab, stats = title_tokens(titles, cfg.title_vocab_size, cfg.title_max_len)
    specs = [FeatureSpec("genres", "multihot", len(names), genre_len),
             FeatureSpec("year", "categorical", YEAR_SIZE),
             FeatureSpec("title", "multihot", len(token_vocab), cfg.title_max_len)]
    feats = {"genres": genres, "year": year_bucket(years), "title": title}
    stats["movies_without_year"] = int((years == 0).sum())
    vocabs = {"genres": Vocab(np.array(names, dtype=str)), "title": token_vocab}
    return FeatureTable(np.asarray(ids, dtype=np.int64), feats, specs, source), vocabs, stats


def user_table(ids: np.ndarray, ages: np.ndarray, genders: Sequence[str], occupations: Sequence[str],
               source: str) -> tuple[FeatureTable, dict[str, Vocab]]:
    """User features of MovieLens 100K/1M.

    Args:
      ids: int64 [n] user ids.
      ages: int [n] raw ages (100K) or 1M age-group codes (1, 18, 25, ...); <= 0 unknown.
      genders: [n] "M" / "F" ("" unknown).
      occupations: [n] occupation text ("" unknown).
      source: file name for stats and messages.
    """
    gender, gender_vocab = encode_categorical(list(genders), GENDERS)
    occupation, occupation_vocab = encode_categorical(list(occupations))
    specs = [FeatureSpec("age", "categorical", AGE_SIZE), FeatureSpec("gender", "categorical", len(gender_vocab)),
             FeatureSpec("occupation", "categorical", len(occupation_vocab))]
    feats = {"age": age_bucket(np.asarray(ages)), "gender": gender, "occupation": occupation}
    vocabs = {"gender": gender_vocab, "occupation": occupation_vocab}
    return FeatureTable(np.asarray(ids, dtype=np.int64), feats, specs, source), vocabs
