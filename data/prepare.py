"""`python -m data.prepare data=<group> data.path=LOG out=DIR [num_shards=N] [engine=auto|local|memory|beam]`.

Turns an interaction log into a prepared dataset (`data.prepared.format`): user records in ArrayRecord shards,
vocabularies, counts, features and a manifest with every file's sha256. Training, evaluation and batch candidates
then read it with `data=prepared data.path=DIR`, each process only the records of its own examples.

Engines (the same per-user rules, `data.peruser`, and the same writer; the same files come out of each):

* `local` (Parquet logs): out of core on this machine; DuckDB sorts the log by user, spilling to disk beyond
  `memory_limit`, and Python applies the rules one chunk of users at a time.
* `memory` (every source): reads the log whole with the in-memory loader and writes it out; for the sources
  that are small by nature (MovieLens, LightGCN files, synthetic, TFDS) and Parquet logs with feature columns.
* `beam`: the Apache Beam pipeline (`data.prepared.beam`) on `runner` (DirectRunner here; DataflowRunner,
  FlinkRunner, SparkRunner at scale, with `beam_options`); needs `pip install -e ".[beam]"`.
* `auto` (default): `local` for Parquet logs without feature columns, else `memory`.

A bad key or value prints one `config error:` line, bad data one `data error:` line, and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

import configs  # noqa: E402
from data.cli import command, one_line_errors  # noqa: E402
from data.config import DataConfig, resolve_config  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.schema import ConfigError, described, schema_keys  # noqa: E402

log = logging.getLogger("data.prepare")
ENGINES = ("auto", "local", "memory", "beam")


@dataclass
class PrepareConfig:
    """Keys of `python -m data.prepare` besides the `data:` group (see configs/prepare.yaml)."""

    out: str = described("???", "output directory of the prepared dataset (created; a re-run of the same "
                                "preparation keeps the shards already finished)")
    num_shards: int = described(8, "shard files of user records (at least one per reading process is useful)",
                                ge=1, le=100_000)
    engine: str = described("auto", "auto | local (out of core, Parquet) | memory (reads the log whole) | beam",
                            choices=ENGINES)
    runner: str = described("DirectRunner", "engine=beam: the Beam runner (DirectRunner, PrismRunner, "
                                            "DataflowRunner, FlinkRunner, SparkRunner)")
    beam_options: list = described([], "engine=beam: extra pipeline options, e.g. ['--project=p', '--region=r']")
    memory_limit: str = described("2GB", "engine=local: DuckDB's memory cap before its sort spills to disk")
    chunk_rows: int = described(2_000_000, "engine=local: rows of complete users handled at once in Python "
                                           "(about 100 bytes each)", ge=1000)
    threads: int = described(0, "engine=local: DuckDB threads (0 = all cores)", ge=0)
    data: DataConfig = field(default_factory=DataConfig)


def known_keys() -> set[str]:
    return schema_keys(PrepareConfig)


def validate(cfg) -> PrepareConfig:
    raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if isinstance(cfg, DictConfig) \
        else dict(cfg)
    raw.pop("hydra", None)
    data = raw.pop("data", {}) or {}
    from data.schema import to_typed
    c = to_typed(PrepareConfig, {k: v for k, v in raw.items()})
    if c.out in ("???", "", None):
        raise ConfigError("out=???: set the output directory, e.g. out=/data/prepared/clicks")
    try:
        c.data = resolve_config(data)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if c.data.source == "prepared":
        raise ConfigError("data.source=prepared: the input of data.prepare is a log, not a prepared dataset")
    return c


def engine_for(c: PrepareConfig) -> str:
    if c.engine != "auto":
        return c.engine
    d = c.data
    return "local" if d.source == "parquet" and not (d.user_feature_columns or d.item_feature_columns) \
        and not str(d.path).lower().endswith(".csv") else "memory"


def run(c: PrepareConfig) -> dict:
    """Prepares `c.data`'s log into `c.out`; returns the manifest."""
    config = {"data": dataclasses.asdict(c.data)}
    engine = engine_for(c)
    if c.data.cold_item_fraction > 0:
        raise DataError("data.cold_item_fraction > 0 is not supported for prepared datasets yet; prepare "
                        "without it")
    log.info("preparing %s (%s) into %s with engine=%s", c.data.path or c.data.source, c.data.source, c.out, engine)
    if engine == "local":
        if c.data.source != "parquet":
            raise DataError(f"engine=local reads Parquet logs; data.source={c.data.source} needs engine=memory")
        from data.prepared.local import prepare_parquet
        manifest = prepare_parquet(c.data, c.out, num_shards=c.num_shards, config=config, chunk_rows=c.chunk_rows,
                                   memory_limit=c.memory_limit, threads=c.threads or None)
    elif engine == "beam":
        from data.prepared.beam import prepare_beam
        manifest = prepare_beam(c.data, c.out, num_shards=c.num_shards, config=config, runner=c.runner,
                                options=list(c.beam_options))
    else:
        from data.load import load
        from data.prepared.write import write_dataset
        manifest = write_dataset(load(c.data), c.out, num_shards=c.num_shards, config=config)
    rows = manifest["rows"]
    log.info("prepared %s: %d users, %d items, %d train / %d valid / %d test rows in %d shards; filtered %s",
             c.out, manifest["num_users"], manifest["num_items"], rows["train"], rows["valid"], rows["test"],
             len(manifest["shards"]), manifest["stats"].get("filtered"))
    return manifest


@command(known_keys)
@hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        c = validate(cfg)
        run(c)


if __name__ == "__main__":
    main()
