"""`python -m train [+experiment=NAME] [key=value ...]`: validate the config, then train and evaluate.

The run directory (checkpoints, metrics, TensorBoard, logs, vocabularies, final metrics) is Hydra's run dir:
`hydra.run.dir=PATH` puts it where you want. Re-running with the same run dir resumes.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from towers.config import exit_config_error  # noqa: E402
from train.config import ConfigError, validate  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        c = validate(cfg)
    except ConfigError as e:
        exit_config_error(e)
    from train.loop import run  # JAX is imported only after the config is known to be valid

    try:
        run(c, HydraConfig.get().runtime.output_dir)
    except ConfigError as e:
        exit_config_error(e)


if __name__ == "__main__":
    main()
