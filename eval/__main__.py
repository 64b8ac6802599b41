"""`python -m eval run_dir=RUN [step=N] [split=test|valid] [out_dir=DIR] [ks=[10,20]] [max_users=N] [data.KEY=V]`.

Restores the towers from the run's checkpoint, reloads its dataset, and writes metrics.json, report.md and
plots to out_dir (default RUN/eval/step_<N>). A bad key, value or run directory prints one `config error:` line
(bad data: one `data error:` line) and exits with status 2.
"""
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import configs  # noqa: E402
from eval.config import known_keys, register_configs, validate  # noqa: E402
from data.cli import command, one_line_errors  # noqa: E402

register_configs()


@command(known_keys)
@hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        c = validate(cfg)
        for name in ("jax", "absl", "orbax"):  # their INFO lines would bury the progress lines
            logging.getLogger(name).setLevel(logging.WARNING)
        from eval.run import run  # JAX is imported only after the config is known to be valid

        run(c)


if __name__ == "__main__":
    main()
