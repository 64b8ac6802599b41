"""`python -m serve.candidates run_dir=RUN out=DIR [k=100] [num_shards=N] [shard_index=I] [users=FILE] [KEY=VALUE ...]`.

Top-k unseen items of every user (or of the users in users=FILE) -> Parquet shards in out (see
`serve.candidates`). Keys and defaults: `configs/candidates.yaml`, checked by `serve.candidates.config`. A bad
key or value exits 2 with one `config error:` line; a job that cannot run (missing or mismatched index,
unknown users, shards of another job in out) exits 1 with one `candidates failed:` line. Re-running the same
command skips complete shards and redoes the rest.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import configs  # noqa: E402
from serve.candidates.config import known_keys, validate  # noqa: E402
from data.cli import command, one_line_errors  # noqa: E402


@command(known_keys)
@hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="candidates")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        c = validate(cfg)
        from serve.candidates import CandidatesError, run  # JAX is imported only once the config is valid
        from towers.restore import RestoreError

        try:
            run(c)
        except (CandidatesError, RestoreError) as e:
            print(f"candidates failed: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
