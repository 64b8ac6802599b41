"""The one exception type the data layer raises for bad input.

`DataError` subclasses `ValueError` so callers that already catch `ValueError` keep working. Messages about
a malformed text row name the file and the 1-based line number, then what was expected and the offending
line, e.g. ``ml-100k/u.data line 17: expected 4 tab-separated fields, got 3: '1\\t2\\t3'``.
"""
from __future__ import annotations

import os

# Long lines are cut in messages so one bad row cannot flood a terminal or a log.
_MAX_SHOWN = 200


class DataError(ValueError):
    """Input data (files, arrays or config values about data) is invalid; the message says how to fix it."""


def show_line(line: str) -> str:
    """`repr` of a row for an error message, without its line ending and cut to a readable length."""
    line = line.rstrip("\r\n")
    if len(line) > _MAX_SHOWN:
        return repr(line[:_MAX_SHOWN]) + f"... ({len(line)} characters)"
    return repr(line)


def line_error(path: str | os.PathLike, lineno: int, problem: str, line: str | None = None) -> DataError:
    """Builds the standard `<file> line <n>: <problem>: '<line>'` error."""
    text = f"{os.fspath(path)} line {lineno}: {problem}"
    if line is not None:
        text += f": {show_line(line)}"
    return DataError(text)
