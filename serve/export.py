"""`python -m serve.export run_dir=RUN [step=N] [out=DIR] [index.KEY=VALUE ...]`: item embeddings -> index.

Restores the towers of a training run, embeds every item, builds the index (`configs/index/`), measures its
ANN recall@k against exact search on a sample of real user queries, and writes the index directory with its
manifest (`serve.manifest`). The export fails (exit 1, nothing written) when the recall stays below
`min_recall` after tuning; a bad config exits 2 with a one-line message. `export(cfg)` is the library entry.
A conditional run (`model.user.condition`) stores the items' codes of that feature in the index, for filtered
searches (`TopK.search(..., conditions=)`), and names the feature in the manifest ("condition").
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

import configs
from data.cli import command, one_line_errors
from data.schema import ConfigError, described as _help, to_typed  # noqa: F401

log = logging.getLogger("twotower.export")




class ExportError(RuntimeError):
    """The export cannot produce a trustworthy index (data mismatch, recall below target)."""


@dataclass
class IndexConfig:
    type: str = _help("scann", "scann | brute_force")
    num_leaves: int | None = _help(None, "ScaNN tree leaves; null = round(sqrt(num_items))")
    num_leaves_to_search: int | None = _help(None, "leaves scanned per query; null = ceil(num_leaves / 10), "
                                                   "raised by tuning until min_recall is met")
    dimensions_per_block: int = _help(2, "asymmetric-hashing dimensions per block")
    anisotropic_quantization_threshold: float = _help(0.2, "AH anisotropic threshold (0.2 for unit vectors)")
    reorder: int = _help(100, "candidates rescored exactly per query")
    training_sample_size: int = _help(100_000, "points sampled to train the tree and codebooks")
    brute_force_below: int = _help(20_000, "corpora with fewer items are searched exactly")
    training_threads: int = _help(0, "threads used to train ScaNN; 0 = all cores")


@dataclass
class ExportConfig:
    run_dir: str | None = _help(None, "run directory of `python -m train` (required)")
    step: int | None = _help(None, "checkpoint step; null = the latest")
    out: str | None = _help(None, "index directory; null = <run_dir>/export/<model_version>")
    min_recall: float = _help(0.95, "fail when ANN recall@recall_k against exact search stays below this")
    recall_k: int = _help(10, "k of the measured ANN recall")
    num_queries: int = _help(1000, "users sampled (seeded) as queries for the recall measurement")
    tune: bool = _help(True, "double index.num_leaves_to_search until min_recall is met")
    batch_size: int = _help(8192, "items or users per tower call")
    seed: int = _help(0, "seed of the query sample")
    index: IndexConfig = field(default_factory=IndexConfig, metadata={"help": "the index (configs/index/)"})


def validate(cfg: DictConfig | dict) -> ExportConfig:
    """Schema and value checks, before any JAX work. Raises `ConfigError` (one line)."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    c = to_typed(ExportConfig, raw)
    checks = [("run_dir", c.run_dir, c.run_dir is not None, "is required: python -m serve.export run_dir=PATH"),
              ("run_dir", c.run_dir, c.run_dir is None or os.path.isdir(c.run_dir), "no such directory"),
              ("index.type", c.index.type, c.index.type in ("scann", "brute_force"), "must be scann or brute_force"),
              ("min_recall", c.min_recall, c.min_recall >= 0, "must be >= 0"),
              ("recall_k", c.recall_k, c.recall_k > 0, "must be > 0"),
              ("num_queries", c.num_queries, c.num_queries > 0, "must be > 0"),
              ("batch_size", c.batch_size, c.batch_size > 0, "must be > 0"),
              ("index.num_leaves", c.index.num_leaves, (c.index.num_leaves or 1) > 0, "must be > 0 or null"),
              ("index.num_leaves_to_search", c.index.num_leaves_to_search,
               (c.index.num_leaves_to_search or 1) > 0, "must be > 0 or null"),
              ("index.reorder", c.index.reorder, c.index.reorder > 0, "must be > 0")]
    for key, value, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r}: {why}")
    return c


def _load_model_and_data(c: ExportConfig):
    """The restored towers and the dataset they were trained on (`check_vocabularies`: same raw ids, same rows)."""
    from data.load import load
    from towers.inference.vocab import VocabularyMismatch, check_vocabularies
    from towers.restore import load_trained

    trained = load_trained(c.run_dir, c.step)
    ds = load(trained.config["data"])
    try:
        check_vocabularies(trained, ds)
    except VocabularyMismatch as e:
        raise ExportError(f"{e}; export from the data the model was trained on") from None
    return trained, ds


def item_embeddings(trained, ds, batch_size: int) -> np.ndarray:
    """float32[N, D]: every item through the item tower (`towers.inference.embed`), in chunks of full batches
    (one compiled shape), with progress lines."""
    from towers.inference.embed import embed_items

    n = ds.num_items
    chunk, out, t0 = batch_size * 16, [], time.perf_counter()
    for a in range(0, n, chunk):
        rows = np.arange(a, min(a + chunk, n), dtype=np.int32)
        out.append(embed_items(trained, ds, rows, buckets=(min(batch_size, n),)))
        done = a + len(rows)
        log.info("embedded %d/%d items (%.0f items/s)", done, n, done / max(time.perf_counter() - t0, 1e-9))
    return np.concatenate(out).astype(np.float32)


def query_embeddings(trained, ds, num_queries: int, seed: int, batch_size: int) -> np.ndarray:
    """float32[Q, D]: a seeded sample of users with their train histories through the user tower. For users
    with several embeddings, every one searched at serving (K' per user) is a query: [sum of K', D]."""
    from towers.inference.embed import embed_users

    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(ds.num_users, min(num_queries, ds.num_users), replace=False)).astype(np.int32)
    emb = embed_users(trained, ds, users, batch_size=batch_size)
    if emb.ndim == 3:
        from towers.inference.multi import interest_queries
        emb = interest_queries(emb)[0]
    return emb


def set_condition(index, trained, ds) -> dict | None:
    """Stores in `index` the item codes of the run's `model.user.condition` feature (with its raw values when the
    dataset has them). Returns `index.condition`, or None for an unconditioned run."""
    name = (trained.config or {}).get("model", {}).get("user", {}).get("condition")
    if not name:
        return None
    spec = next((s for s in ds.item_feature_specs if s.name == name), None)
    if spec is None or spec.kind not in ("categorical", "multihot"):
        raise ExportError(f"model.user.condition={name!r} is not a categorical or multihot item feature of the "
                          f"dataset (item features: {[(s.name, s.kind) for s in ds.item_feature_specs]})")
    vocab = ds.feature_vocabs.get(name)
    values = vocab.raw_ids if vocab is not None and len(vocab) == spec.size else None
    index.set_condition(name, ds.item_features[name], spec.size, values=values)   # item rows = index slots
    return index.condition


def ann_recall(index, exact_ids: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Mean over queries of |ANN top-k ∩ exact top-k| / k. exact_ids: [Q, k]; queries: float[Q, D]."""
    _, got = index.search(queries, k)
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(got, exact_ids)]))


def tune_recall(index, reference, queries: np.ndarray, k: int, target: float, tune: bool) -> dict:
    """Measures ANN recall@k against `reference` (exact) and, if `tune`, doubles the leaves searched until
    `target` is met or every leaf is searched. Returns {"k", "value", "num_queries", "tried"}."""
    _, exact_ids = reference.search(queries, k)
    tried = []
    while True:
        value = ann_recall(index, exact_ids, queries, k)
        tried.append({"num_leaves_to_search": getattr(index, "num_leaves_to_search", None),
                      "recall": round(value, 4)})
        log.info("ANN recall@%d = %.4f (%s)", k, value, tried[-1])
        if value >= target or not tune or index.is_exact or index.num_leaves_to_search >= index.num_leaves:
            return {"k": k, "value": value, "num_queries": int(len(queries)), "tried": tried}
        index.num_leaves_to_search = min(index.num_leaves, 2 * index.num_leaves_to_search)


def export(cfg) -> dict:
    """Runs the export. Returns a summary {"out", "num_items", "dim", "index", "recall", "seconds"}.

    Raises:
      ConfigError: invalid config. ExportError: data mismatch or recall below `min_recall`.
      towers.restore.RestoreError: an unreadable run directory.
    """
    from serve.index import BruteForce
    from serve.indexes import make_index
    from serve.manifest import write_index

    c = cfg if isinstance(cfg, ExportConfig) else validate(cfg)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every restore step at INFO
    times, t = {}, time.perf_counter()
    trained, ds = _load_model_and_data(c)
    log.info("restored %s (step %d) from %s; %d items, %d users", trained.model_version, trained.step, c.run_dir,
             ds.num_items, ds.num_users)
    emb = item_embeddings(trained, ds, c.batch_size)
    queries = query_embeddings(trained, ds, c.num_queries, c.seed, c.batch_size)
    times["embed"], t = time.perf_counter() - t, time.perf_counter()
    index = make_index(asdict(c.index)).index(emb, ds.item_vocab.raw_ids)
    condition = set_condition(index, trained, ds)
    times["build"], t = time.perf_counter() - t, time.perf_counter()
    log.info("built %s index over %d x %d in %.1fs: %s", index.kind, len(index), index.dim, times["build"],
             {k: v for k, v in index.params().items() if k != "config"})
    k = min(c.recall_k, len(index))
    recall = tune_recall(index, BruteForce().index(emb, ds.item_vocab.raw_ids), queries, k, c.min_recall, c.tune)
    times["recall"], t = time.perf_counter() - t, time.perf_counter()
    if recall["value"] < c.min_recall:
        tried = ("an exact index" if index.is_exact else
                 f"num_leaves_to_search in {[r['num_leaves_to_search'] for r in recall['tried']]}")
        raise ExportError(f"ANN recall@{k} = {recall['value']:.4f} is below min_recall={c.min_recall} with "
                          f"{tried}; no index was written. Raise index.reorder or index.num_leaves_to_search, "
                          "or lower min_recall")
    out = pathlib.Path(c.out) if c.out else pathlib.Path(c.run_dir) / "export" / trained.model_version
    extra = {"run_dir": str(pathlib.Path(c.run_dir).absolute()), "step": trained.step,
             "recall": {**recall, "metric": f"ann_recall@{k}", "against": "exact dot-product top-k"},
             f"ann_recall@{k}": recall["value"], "build_seconds": round(times["build"], 3),
             **({"condition": condition} if condition else {})}
    out = write_index(index, out, model_version=trained.model_version, extra=extra)
    times["write"] = time.perf_counter() - t
    log.info("wrote %s (recall@%d %.4f; embed %.1fs, build %.1fs, recall %.1fs, write %.1fs)", out, k,
             recall["value"], times["embed"], times["build"], times["recall"], times["write"])
    return {"out": out, "num_items": len(index), "dim": index.dim, "index": index.params(), "recall": recall,
            "seconds": {k: round(v, 3) for k, v in times.items()}}


def known_keys() -> set[str]:
    """Every key `python -m serve.export` accepts on its command line."""
    return {f.name for f in fields(ExportConfig)} | {f"index.{f.name}" for f in fields(IndexConfig)}


@command(known_keys)
@hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        c = validate(cfg)
        from towers.restore import RestoreError
        try:
            export(c)
        except (ExportError, RestoreError) as e:
            print(f"export failed: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
