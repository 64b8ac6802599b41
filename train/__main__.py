"""`python -m train [+experiment=NAME] [key=value ...]`: validate the config, then train and evaluate.

The run directory (checkpoints, metrics, TensorBoard, logs, vocabularies, final metrics) is Hydra's run dir:
`hydra.run.dir=PATH` puts it where you want. Re-running with the same run dir resumes. A bad key or value, or
bad data, exits with status 2 and one `config error:` / `data error:` line (`data.cli`).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import configs  # noqa: E402
from data.cli import command, one_line_errors  # noqa: E402
from data.schema import schema_keys  # noqa: E402
from train.config import Config, validate  # noqa: E402


@command(lambda: schema_keys(Config))
@hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        c = validate(cfg)
        from train.loop import run  # JAX is imported only after the config is known to be valid

        run(c, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
