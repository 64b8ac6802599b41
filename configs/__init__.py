"""The YAML configs of every command (train.yaml, evaluate.yaml, export.yaml, serve.yaml, ... and their groups).

They ship inside the package as package data, so a wheel installed with `pip install .` finds them as well as
an editable checkout does. `DIR` is the one place that locates them: each command's `@hydra.main(config_path=
str(DIR))` (Hydra uses an absolute path as is), the commands that read one file with OmegaConf, and the tests.
"""
import pathlib

DIR = pathlib.Path(__file__).resolve().parent
