"""How every `python -m` command (train, eval, serve, serve.export, serve.trending, serve.candidates) starts and
how it fails on bad input: a bad config or bad data exits with status 2 and exactly one line on stderr,
`config error: ...` or `data error: ...`, with no traceback, whether the problem is found on the command line,
while Hydra composes the config, or inside the command's body (loading the data, say).

A Hydra command is declared as

    @command(known_keys)
    @hydra.main(version_base="1.3", config_path=str(configs.DIR), config_name="train")
    def main(cfg):
        with one_line_errors():
            ...

`command` checks the command line for unknown keys before Hydra composes (Hydra's own error is several lines
and exit 1) and reports Hydra's composition errors (a config group option that does not exist). The body
reports its own errors with `one_line_errors`: Hydra would print an error leaving `main` after a line of its
own, with a traceback. Other errors keep their traceback and exit 1.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator

from data.errors import DataError
from data.schema import ConfigError, unknown_override


def _exit(kind: str, message: str) -> None:
    print(f"{kind}: {' '.join(message.splitlines())}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """`ConfigError` and `DataError` raised in the block, and Hydra's composition errors (a config group option
    or file that does not exist, a malformed override), exit with status 2 and one line on stderr."""
    from hydra.errors import ConfigCompositionException, OverrideParseException
    try:
        yield
    except ConfigError as e:
        _exit("config error", str(e))
    except DataError as e:
        _exit("data error", str(e))
    except (ConfigCompositionException, OverrideParseException) as e:
        text = str(e).split("Config search path")[0] + (f" ({e.__cause__})" if e.__cause__ else "")
        _exit("config error", " ".join(text.split()))  # Hydra's messages are laid out over lines and tabs


def command(known_keys: Callable[[], set[str]]) -> Callable:
    """Decorator of a command's `@hydra.main` function (placed above it): rejects command-line overrides of
    keys outside `known_keys()` (every dotted key and section name of the command's schema) before Hydra
    composes, and turns Hydra's composition errors into one line and exit status 2."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def start(*args, **kwargs):
            with one_line_errors():
                if (problem := unknown_override(sys.argv[1:], known_keys())) is not None:
                    raise ConfigError(problem)
                os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors instead of printing them
                return main(*args, **kwargs)
        return start
    return wrap
