"""Batch candidates on Apache Beam: the shard indices fan out to parallel workers, each of which runs the same
`serve.candidates.run_shard` as the single-process command and writes its Parquet shard into out.

    python -m serve.candidates.beam run_dir=RUN out=DIR num_shards=64 [KEY=VALUE ...] [--runner=... beam flags]

`KEY=VALUE` arguments are the keys of `configs/candidates.yaml`; arguments starting with `--` are Beam pipeline
options (default: the DirectRunner). Each worker loads the job (towers, data, index) once in `DoFn.setup` and
then writes whole shards, so the output equals the command's, shard for shard. Every worker must see run_dir,
the run's data, the index and out at the same paths (a shared filesystem), as the README's "Batch candidates"
section describes. Needs the `beam` extra (`pip install -e ".[beam]"`).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys

try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("serve.candidates.beam needs Apache Beam: pip install -e \".[beam]\" (in its own "
                      "environment: it pins protobuf and pyarrow below this project's versions)") from e
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs
from serve.candidates.config import CandidatesConfig, known_keys, validate
from data.cli import one_line_errors
from data.schema import ConfigError, unknown_override

CONFIG = configs.DIR / "candidates.yaml"
log = logging.getLogger("twotower.candidates.beam")


class RunShard(beam.DoFn):
    """Writes one shard per input element (a shard index); yields a summary dict of it."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self._job = None

    def setup(self):
        from serve.candidates import load_job
        self._job = load_job(validate(self.config))

    def process(self, shard_index: int):
        from serve.candidates import run_shard
        result = run_shard(self._job, int(shard_index))
        log.info("shard %d: %d users, %s", shard_index, result["users"],
                 "already complete" if result["skipped"] else f"written to {result['path']}")
        yield {"shard": result["shard"], "path": str(result["path"]), "users": result["users"],
               "skipped": result["skipped"], **dataclasses.asdict(result["stats"])}


def build(pipeline, c: CandidatesConfig):
    """Adds Create(shard indices) -> Reshuffle -> ParDo(RunShard) to `pipeline`; returns the summaries.

    The reshuffle keeps a runner from fusing the tiny Create with the heavy ParDo onto one worker.
    """
    shards = [c.shard_index] if c.shard_index is not None else list(range(c.num_shards))
    return (pipeline
            | "ShardIndices" >> beam.Create(shards)
            | "Spread" >> beam.Reshuffle()
            | "RunShard" >> beam.ParDo(RunShard(dataclasses.asdict(c))))


def parse(argv: list[str]) -> tuple[CandidatesConfig, list[str]]:
    """(the checked candidates config, the Beam pipeline flags) from `KEY=VALUE` and `--flag` arguments.

    Raises:
      ConfigError: an unknown key, a bad value, or an argument that is neither.
    """
    beam_args = [a for a in argv if a.startswith("--")]
    overrides = [a for a in argv if not a.startswith("--")]
    bad = [a for a in overrides if "=" not in a]
    if bad:
        raise ConfigError(f"{bad[0]}: expected KEY=VALUE (candidates keys) or --flag (Beam options)")
    if (problem := unknown_override(overrides, known_keys())) is not None:
        raise ConfigError(problem)
    base = OmegaConf.load(CONFIG)
    base.pop("defaults", None)
    base.pop("hydra", None)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    return validate(merged), beam_args


def run(c: CandidatesConfig, beam_args: list[str] | None = None) -> list[pathlib.Path]:
    """Checks the job on the driver (index, users, out), runs the pipeline to completion, and returns the
    shard paths. Raises `serve.candidates.CandidatesError` before launching when the job cannot run."""
    from serve.candidates import check_out_dir, load_job, shard_path

    check_out_dir(c)             # fail fast on the driver, not once per worker
    load_job(c)
    options = PipelineOptions(beam_args or [])
    with beam.Pipeline(options=options) as pipeline:
        build(pipeline, c)
    shards = [c.shard_index] if c.shard_index is not None else range(c.num_shards)
    paths = [shard_path(c.out, s, c.num_shards) for s in shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"the pipeline finished but {len(missing)} shard(s) are missing, e.g. {missing[:3]}")
    return paths


def main(argv: list[str]) -> int:
    with one_line_errors():
        c, beam_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serve.candidates import CandidatesError
    from towers.restore import RestoreError
    try:
        paths = run(c, beam_args)
    except (CandidatesError, RestoreError) as e:
        print(f"candidates failed: {e}", file=sys.stderr)
        return 1
    log.info("%d shard(s) in %s", len(paths), c.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
