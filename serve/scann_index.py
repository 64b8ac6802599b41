"""The ScaNN backend of `serve.index.TopK`: `ScaNNIndex`, configured and built by the inference layer's rule
(`towers.inference.search.scann_settings` / `build_scann_searcher`, which the evaluation's ANN metrics use too).

ScaNN's datapoints are the index's slots (see `serve.index`), so its own docid pickle is never used: never
written, and never read (`load_scann_searcher`), since unpickling a file from an index directory would run
whatever code that file names.
"""
from __future__ import annotations

import logging
import math
import pathlib

import numpy as np

from serve.index import TopK
from towers.inference.search import build_scann_searcher, import_scann, scann_settings, widened_leaves

log = logging.getLogger("twotower.serve")


# Every file ScaNN's `serialize` may write besides its docids pickle (scann 1.4: the assets that
# `scann_ops_pybind_backcompat` knows, the assets list and the config).
SCANN_FILES = ("scann_assets.pbtxt", "scann_config.pb", "ah_codebook.pb", "serialized_partitioner.pb",
               "datapoint_to_token.npy", "hashed_dataset.npy", "int8_dataset.npy", "int8_multipliers.npy",
               "dp_norms.npy", "dataset.npy")


def load_scann_searcher(artifacts: pathlib.Path):
    """The searcher `ScannSearcher.serialize` wrote into `artifacts`, built without its docids pickle.

    `scann_ops_pybind.load_searcher` unpickles `scann_docids.pkl` whenever the file exists (and writes a
    `scann_assets.pbtxt` where one is missing), so it would run code named by a file of an index directory.
    This builds the same searcher from the assets list alone, after checking that the list names only ScaNN's
    own files inside `artifacts` (ScaNN's C++ loader opens whatever paths it names).

    Raises:
      ValueError: the assets list names another file. OSError, google.protobuf ParseError: an unreadable list.
    """
    from google.protobuf import text_format
    from scann.scann_ops import scann_assets_pb2

    ops = import_scann()
    text = (artifacts / "scann_assets.pbtxt").read_text()
    paths = [a.asset_path for a in text_format.Parse(text, scann_assets_pb2.ScannAssets()).assets]
    bad = [p for p in paths if p not in SCANN_FILES or not (artifacts / p).is_file()]
    if bad:
        raise ValueError(f"{artifacts}/scann_assets.pbtxt names {bad}: only ScaNN's own files of that directory "
                         f"({', '.join(SCANN_FILES[2:])}) may be listed")
    return ops.ScannSearcher(ops.scann_pybind.ScannNumpy(str(artifacts), text), docids=None)


class ScaNNIndex(TopK):
    """ScaNN: k-means tree (about sqrt(N) leaves), anisotropic asymmetric hashing, exact reordering.

    Corpora below `brute_force_below` items are searched exactly (numpy), where that is as fast; an index
    built exact stays exact as upserts grow it, until `rebuild()`. Upserts go
    into ScaNN's incremental mode (new points join their nearest leaf; the partitions are not retrained):
    after many changes, `rebuild()` (or a fresh export) restores the partition quality.

    Args:
      num_leaves: tree leaves; None = round(sqrt(N)).
      num_leaves_to_search: leaves scanned per query; None = ceil(num_leaves / 10). Export tunes it up until
        the measured recall target is met.
      dimensions_per_block: AH block size (2 is ScaNN's recommendation for dot product).
      anisotropic_quantization_threshold: AH noise-shaping threshold (0.2 suits normalised embeddings).
      reorder: candidates rescored exactly per query for k=10; a search fetching f = k + exclusions
        candidates rescores f * reorder / 10.
      training_sample_size: points sampled to train the tree and the AH codebooks.
      brute_force_below: corpora smaller than this are searched exactly.
      training_threads: threads for training; 0 = all cores.
    """
    kind = "scann"
    files = TopK.files + tuple(f"scann/{name}" for name in SCANN_FILES)
    # Filtered searches probe num_leaves_to_search * share ** -leaf_exponent leaves for a value holding that
    # share of the corpus: with the unfiltered probe, rare values' best items were missed without the search
    # coming back short (head recall@20 0.76-0.98 on 200k items); 0.5 gave >= 0.99 (scripts/bench_serve.py --filtered).
    filter_settings = {**TopK.filter_settings, "leaf_exponent": 0.5}
    _CONFIG_KEYS = ("num_leaves", "num_leaves_to_search", "dimensions_per_block",
                    "anisotropic_quantization_threshold", "reorder", "training_sample_size", "brute_force_below",
                    "training_threads")

    def __init__(self, num_leaves: int | None = None, num_leaves_to_search: int | None = None,
                 dimensions_per_block: int = 2, anisotropic_quantization_threshold: float = 0.2,
                 reorder: int = 100, training_sample_size: int = 100_000, brute_force_below: int = 20_000,
                 training_threads: int = 0):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k in self._CONFIG_KEYS}
        self.num_leaves, self.num_leaves_to_search = num_leaves, num_leaves_to_search
        self._searcher = None

    @property
    def is_exact(self) -> bool:
        return self._searcher is None

    def params(self) -> dict:
        return {**super().params(), "config": self.config, "num_leaves": self.num_leaves,
                "num_leaves_to_search": self.num_leaves_to_search,
                "mode": "brute_force" if self.is_exact else "tree_ah", "scann_version": _scann_version()}

    def rebuild(self) -> None:
        """Retrains the partitions and codebooks on the current corpus (seconds to minutes: off the hot path)."""
        with self._lock.write():
            self._backend_build(leaves_to_search=self.num_leaves_to_search)

    @classmethod
    def _from_params(cls, params: dict) -> "ScaNNIndex":
        index = cls(**params["config"])
        index.num_leaves, index.num_leaves_to_search = params["num_leaves"], params["num_leaves_to_search"]
        return index

    def _backend_build(self, leaves_to_search: int | None = None) -> None:
        self._searcher, self.num_leaves, self.num_leaves_to_search = None, None, None
        config = {**self.config, "num_leaves_to_search": leaves_to_search or self.config["num_leaves_to_search"]}
        settings = scann_settings(self._n, **config)
        if settings["mode"] == "brute_force":
            return
        self.num_leaves, self.num_leaves_to_search = settings["num_leaves"], settings["num_leaves_to_search"]
        self._searcher = build_scann_searcher(self._emb[:self._n], settings)

    def _backend_filtered_ann(self, q, fetch, attempt, share):
        """A filtered search's ANN: the leaves probed grow as share ** -leaf_exponent (a rare value's best items
        lie in more leaves around the query), then 4x per retry."""
        boost = share ** -self.filter_settings["leaf_exponent"]
        return self._backend_ann(q, fetch, attempt, base=min(self.num_leaves, math.ceil(self.num_leaves_to_search
                                                                                       * boost)))

    def _backend_ann(self, q, fetch, attempt, base=None):
        leaves = widened_leaves(base or self.num_leaves_to_search, self.num_leaves, attempt)
        # `reorder` is sized for k=10: deeper fetches (large k, many exclusions) rescore proportionally more.
        pre = max(self.config["reorder"], math.ceil(fetch * self.config["reorder"] / 10))
        idx, dist = self._searcher.searcher.search_batched(q, fetch, pre, leaves, len(q) >= 256, 256)
        return dist, idx.astype(np.int64)

    def _backend_upsert(self, replaced, replaced_emb, first_new, new_emb) -> None:
        if self._searcher is None:
            return
        if replaced.size:
            self._searcher.searcher.upsert(replaced.tolist(), list(replaced_emb), 1)
        if new_emb.shape[0]:
            got = self._searcher.searcher.upsert([None] * new_emb.shape[0], list(new_emb), 1)
            if list(got) != list(range(first_new, first_new + new_emb.shape[0])):
                raise RuntimeError(f"ScaNN put new items at slots {list(got)[:5]}..., expected {first_new}...: "
                                   "the index's id mapping is out of step; rebuild the index")

    def _backend_delete(self, slots: list[int]) -> None:
        if self._searcher is None:
            return
        self._searcher.searcher.delete(slots)
        if self._searcher.searcher.size() != self._n:
            raise RuntimeError(f"ScaNN holds {self._searcher.searcher.size()} items after delete, the index "
                               f"{self._n}: the id mapping is out of step; rebuild the index")

    def _backend_restore(self, touched: np.ndarray) -> None:
        """Undoes what a failed upsert or delete did to the searcher: items it appended are deleted from the
        end (plain removals), slots it deleted are appended again, and the touched slots get their stored
        vectors back; the searcher then holds what it held before the call. If that fails too, the searcher
        is rebuilt from the stored vectors (slow, but it matches them); if even that fails, searches stay
        exact (correct, slower) until `rebuild()`."""
        if self._searcher is None:
            return
        searcher = self._searcher.searcher
        try:
            size = searcher.size()
            if size > self._n:
                searcher.delete(list(range(size - 1, self._n - 1, -1)))
            elif size < self._n:
                searcher.upsert([None] * (self._n - size), list(self._emb[size:self._n]), 1)
            if touched.size:
                searcher.upsert(touched.tolist(), list(self._emb[touched]), 1)
            if searcher.size() != self._n:
                raise RuntimeError(f"ScaNN holds {searcher.size()} items after the undo, the index {self._n}")
        except Exception:  # noqa: BLE001 - the stored vectors are the truth: rebuild the searcher from them
            log.exception("could not undo a failed change in ScaNN; rebuilding its searcher (%d items)", self._n)
            try:
                self._backend_build(leaves_to_search=self.num_leaves_to_search)
            except Exception:  # noqa: BLE001 - exact search over the stored vectors is still correct
                log.exception("rebuilding ScaNN failed; searching exactly until rebuild()")

    def _backend_save(self, directory: pathlib.Path) -> None:
        if self._searcher is not None:
            (directory / "scann").mkdir(exist_ok=True)
            # Relative asset paths, so the directory can be renamed into place after writing.
            self._searcher.serialize(str(directory / "scann"), relative_path=True)

    def _backend_load(self, directory: pathlib.Path, params: dict) -> None:
        if params.get("mode") != "tree_ah":
            return
        self._searcher = load_scann_searcher(directory / "scann")
        if self._searcher.searcher.size() != self._n:
            raise ValueError(f"{directory}/scann holds {self._searcher.searcher.size()} items but ids.npy "
                             f"{self._n}; the directory is inconsistent")


def _scann_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("scann")
    except Exception:  # noqa: BLE001 - not installed: the manifest records null
        return None
