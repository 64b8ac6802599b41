"""Finding input files (paths as given, or relative to $TWOTOWER_DATA_DIR) and checking their contents (sha256)."""
from __future__ import annotations

import hashlib
import os
import pathlib

from data.errors import DataError, line_error


def resolve_path(path: str | os.PathLike | None, what: str = "data.path") -> pathlib.Path:
    """An existing path: as given (after ~ expansion), else relative to $TWOTOWER_DATA_DIR.

    Raises:
      DataError: neither exists; the message lists where it looked.
    """
    if not path:
        raise DataError(f"{what} is not set")
    p = pathlib.Path(os.path.expanduser(str(path)))
    if p.exists():
        return p
    tried = [str(p.resolve())]
    base = os.environ.get("TWOTOWER_DATA_DIR")
    if base and not p.is_absolute():
        q = pathlib.Path(base) / p
        if q.exists():
            return q
        tried.append(str(q))
    raise DataError(f"{what} {str(path)!r} does not exist (looked at {', '.join(tried)}); set it to the "
                    "dataset directory or file, or set TWOTOWER_DATA_DIR to the directory that holds it")


def int_field(path, lineno: int, value: str, name: str, line: str) -> int:
    """`int(value)` or a `DataError` naming the file, line and field."""
    try:
        return int(value)
    except ValueError:
        raise line_error(path, lineno, f"{name} {value!r} is not an integer", line) from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (shards and embeddings of large corpora are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
