"""Does a dataset map raw ids to the rows a trained run learned? The check every reader of a run's data makes.

A run's embeddings, histories, audiences and exclusions are all indexed by vocabulary row. Reloading the data
from `config.yaml` rebuilds the vocabularies from whatever the files hold now: the same number of ids is not
enough (a changed file can keep the counts and reorder or replace ids, and every row would then mean another
user, item or feature value), so the raw ids themselves are compared, row by row.
"""
from __future__ import annotations

import numpy as np


class VocabularyMismatch(ValueError):
    """The dataset's vocabularies are not the run's: its rows would mean other ids."""


def vocabulary_difference(run_ids: np.ndarray, data_ids: np.ndarray) -> str | None:
    """None when two vocabularies hold the same raw ids in the same order, else what differs (one line)."""
    run_ids, data_ids = np.asarray(run_ids), np.asarray(data_ids)
    if run_ids.dtype.kind == data_ids.dtype.kind and np.array_equal(run_ids, data_ids):
        return None
    what = f"run: {run_ids.size} {run_ids.dtype} ids, data: {data_ids.size} {data_ids.dtype} ids"
    if run_ids.dtype.kind == data_ids.dtype.kind:
        common = min(run_ids.size, data_ids.size)
        diff = np.flatnonzero(run_ids[:common] != data_ids[:common])
        if diff.size:
            i = int(diff[0])
            what += f"; first difference at row {i}: run {run_ids[i].item()!r} vs data {data_ids[i].item()!r}"
    return what


def check_vocabularies(run, dataset) -> None:
    """Raises `VocabularyMismatch` (one line, without a remedy: callers add theirs) unless `dataset` maps every
    raw id to the row `run` was trained with.

    Args:
      run: a `towers.restore.TrainedModel` (its `user_vocab`, `item_vocab`, `feature_vocabs` and `run_dir`).
      dataset: a `data.types.Dataset`, e.g. reloaded from the run's config.
    Compares the user and item vocabularies and every feature-value vocabulary the run saved (the codes of the
    dataset's stored features must mean the values the towers learned).
    """
    sides = [("user", run.user_vocab, dataset.user_vocab), ("item", run.item_vocab, dataset.item_vocab)]
    for name, vocab in sorted(run.feature_vocabs.items()):
        other = dataset.feature_vocabs.get(name)
        if other is None:
            raise VocabularyMismatch(f"the dataset has no value vocabulary of feature {name!r} but "
                                     f"{run.run_dir}/vocab/feature.{name}.npy does: the data changed since training")
        sides.append((f"feature.{name}", vocab, other))
    for name, saved, loaded in sides:
        diff = vocabulary_difference(saved.raw_ids, loaded.raw_ids)
        if diff is not None:
            raise VocabularyMismatch(f"the dataset's {name} vocabulary does not match {run.run_dir}/vocab/{name}.npy "
                                     f"({diff}): the data changed since training")
