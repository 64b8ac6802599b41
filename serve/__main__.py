"""`python -m serve run_dir=RUN [index_dir=DIR] [host=127.0.0.1] [port=8000] [KEY=VALUE ...]`: the top-k server.

The write routes are open unless `auth_token` is set (by default from the environment variable
TWOTOWER_AUTH_TOKEN); reloads reach only directories under `reload_root` (default `<run_dir>/export`).

Keys and defaults are those of `configs/serve.yaml`; arguments are `key=value` overrides as for the other
entry points (`batch_sizes=[1,8,32]` for lists). A bad key or value exits 2 with one line; a run or index that
cannot be loaded exits 1. The server is uvicorn running `serve.server.create_app`.
"""
from __future__ import annotations

import logging
import os
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs
from data.cli import one_line_errors
from data.schema import ConfigError

CONFIG = configs.DIR / "serve.yaml"


def parse_args(args: list[str]) -> dict:
    """`key=value` arguments merged over configs/serve.yaml, checked. Returns a plain dict.

    Raises:
      ConfigError: an argument that is not key=value, an unknown key, or a bad value.
    """
    base = OmegaConf.load(CONFIG)
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected key=value (keys: {', '.join(base)})")
        if key not in base:
            raise ConfigError(f"{arg}: unknown key (known: {', '.join(base)})")
    try:
        c = OmegaConf.to_container(OmegaConf.merge(base, OmegaConf.from_dotlist(args)), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    sizes = c["batch_sizes"]
    checks = [("run_dir", c["run_dir"] is not None, "is required: python -m serve run_dir=PATH"),
              ("run_dir", c["run_dir"] is None or os.path.isdir(str(c["run_dir"])), "no such directory"),
              ("port", isinstance(c["port"], int) and 0 <= c["port"] < 65536, "must be an int in [0, 65535]"),
              ("batch_sizes", isinstance(sizes, list) and sizes and all(isinstance(b, int) and b > 0 for b in sizes),
               "must be a non-empty list of positive ints"),
              ("max_wait_ms", isinstance(c["max_wait_ms"], (int, float)) and c["max_wait_ms"] >= 0, "must be >= 0"),
              ("max_body_bytes", isinstance(c["max_body_bytes"], int) and c["max_body_bytes"] > 0, "must be > 0"),
              ("step", c["step"] is None or isinstance(c["step"], int) and c["step"] >= 0,
               "must be an int >= 0 or null"),
              ("http", c["http"] in ("auto", "h11", "httptools"), "must be auto, h11 or httptools"),
              ("reload_root", c["reload_root"] is None or os.path.isdir(str(c["reload_root"])), "no such directory")]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}={c[key]!r}: {why}")
    if not (c["auth_token"] is None or isinstance(c["auth_token"], str) and c["auth_token"].strip()):
        # The value is a secret: not echoed. A number given on the command line parses as an int.
        raise ConfigError("auth_token: must be a non-empty string or null (set TWOTOWER_AUTH_TOKEN, or quote "
                          "a numeric token)")
    return c


def main(argv: list[str]) -> int:
    with one_line_errors():
        c = parse_args(argv)
    logging.basicConfig(level=c["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every restore step at INFO
    import uvicorn

    from serve.manifest import IndexLoadError
    from serve.server import create_app
    from towers.restore import RestoreError
    try:
        app = create_app(c["run_dir"], c["index_dir"], step=c["step"], batch_sizes=tuple(c["batch_sizes"]),
                         max_wait_ms=float(c["max_wait_ms"]), max_body_bytes=c["max_body_bytes"],
                         warmup=c["warmup"], reload_root=c["reload_root"], auth_token=c["auth_token"])
    except (RestoreError, IndexLoadError) as e:
        print(f"serve failed: {e}", file=sys.stderr)
        return 1
    state = app.state.server
    logging.getLogger("twotower.serve").info("serving %s (%d items, index %s) on http://%s:%d",
                                             state.model.model_version, len(state.current[0]),
                                             state.current[1], c["host"], c["port"])
    uvicorn.run(app, host=c["host"], port=c["port"], log_level=c["log_level"], access_log=False, http=c["http"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
