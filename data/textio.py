"""Reading delimited text with exact error locations.

Big files (ratings) go through pyarrow.csv, which is fast but reports errors without reliable line numbers. When
pyarrow rejects a file, or its result has nulls or non-finite numbers, the file is re-scanned line by line in
Python to find the first bad row and raise `DataError("<file> line <n>: ...")`. The slow scan therefore runs
only for broken files. Small metadata files are read line by line directly (`iter_fields`, `iter_csv`).
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from data.errors import DataError, line_error

_INT = re.compile(r"[+-]?\d+")
_SEP_NAMES = {"\t": "tab", ",": "comma", " ": "space"}
_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def sep_name(sep: str) -> str:
    """How a separator is named in messages: 'tab', 'comma' or the quoted string."""
    return _SEP_NAMES.get(sep, repr(sep))


def _field_problem(field: str, kind: str) -> str | None:
    if kind == "int" and not _INT.fullmatch(field):
        return "is not an integer"
    if kind == "float":
        try:
            if not math.isfinite(float(field)):
                return "is not a finite number"
        except ValueError:
            return "is not a number"
    return None


def _check_row(path, lineno: int, fields: list[str], kinds: list[tuple[int, str, str]], width: int,
               sep: str, shown: str):
    if len(fields) != width:
        raise line_error(path, lineno, f"expected {width} {sep_name(sep)}-separated fields, got {len(fields)}",
                         shown)
    for pos, name, kind in kinds:
        problem = _field_problem(fields[pos], kind)
        if problem:
            raise line_error(path, lineno, f"field {pos + 1} ({name}) {fields[pos]!r} {problem}", shown)


def check_rows(path, *, sep: str, names: list[str], kinds: dict[str, str], header: bool, encoding: str = "utf-8",
               quoted: bool = False) -> None:
    """Raises `DataError` at the first row that does not match the expected layout (returns if none).

    Args are those of `read_table`; with `header`, rows must have as many fields as the header.
    """
    lineno = 0
    try:
        with open(path, encoding=encoding, newline="") as f:
            if quoted:
                reader = csv.reader(f, delimiter=sep, strict=True)
                rows = ((reader.line_num, row, sep.join(row)) for row in reader)
            else:
                rows = ((i, line.rstrip("\r\n").split(sep), line) for i, line in enumerate(f, 1))
            width, spec = len(names), None
            for lineno, fields, shown in rows:
                if fields in ([], [""]):
                    continue
                if spec is None:
                    if header:
                        spec = _header_positions(path, lineno, fields, names, kinds, shown)
                        width = len(fields)
                        continue
                    spec = [(i, n, kinds[n]) for i, n in enumerate(names)]
                _check_row(path, lineno, fields, spec, width, sep, shown)
    except UnicodeDecodeError as e:
        raise line_error(path, lineno + 1, f"cannot decode as {encoding}: {e.reason}") from None
    except csv.Error as e:
        raise line_error(path, lineno + 1, f"malformed CSV: {e}") from None


def _header_positions(path, lineno, fields, names, kinds, shown):
    missing = [n for n in names if n not in fields]
    if missing:
        raise line_error(path, lineno, f"header lacks column(s) {missing}; expected a header with {names}", shown)
    return [(fields.index(n), n, kinds[n]) for n in names]


def read_table(path: str | os.PathLike, *, sep: str, names: list[str], kinds: dict[str, str],
               header: bool = False, encoding: str = "utf-8", quoted: bool = False) -> dict[str, np.ndarray]:
    """Reads selected columns of a delimited file into numpy arrays.

    Args:
      path: the file.
      sep: field separator; may be several characters (e.g. "::"), only for unquoted numeric files.
      names: without `header`, the names of all fields in order; with it, the columns to read.
      kinds: per name "int" (-> int64), "float" (-> float64) or "str" (-> unicode array).
      header: the first line names the columns.
      encoding: text encoding of the file.
      quoted: RFC-4180 double quotes may enclose fields.

    Returns:
      {name: array [rows]}.

    Raises:
      DataError: naming the file and line of the first malformed row.
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        return {n: np.zeros(0, dtype=np.int64 if kinds[n] == "int" else float if kinds[n] == "float" else str)
                for n in names}
    scan_args = dict(sep=sep, names=names, kinds=kinds, header=header, encoding=encoding, quoted=quoted)
    try:
        table = _read_arrow(path, sep, names, kinds, header, encoding, quoted)
    except (pa.ArrowException, UnicodeDecodeError) as e:
        check_rows(path, **scan_args)
        raise DataError(f"{path}: could not be parsed ({e}); check the separator and encoding") from None
    out = {}
    for name in names:
        col = table.column(name)
        if col.null_count:
            check_rows(path, **scan_args)
            raise DataError(f"{path}: column {name!r} has {col.null_count} empty value(s)")
        arr = col.to_numpy()
        if kinds[name] == "str":
            arr = arr.astype(str)
        elif kinds[name] == "float" and not np.isfinite(arr).all():
            check_rows(path, **scan_args)
            raise DataError(f"{path}: column {name!r} has non-finite values")
        out[name] = arr
    return out


def _read_arrow(path, sep, names, kinds, header, encoding, quoted) -> pa.Table:
    source = path
    if len(sep) > 1:
        # pyarrow takes one-character separators; MovieLens '::' files are numeric, so a tab can stand in.
        with open(path, "rb") as f:
            source = pa.BufferReader(f.read().replace(sep.encode(), b"\t"))
        sep = "\t"
    read = pacsv.ReadOptions(column_names=None if header else names, encoding=encoding, block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=sep, quote_char='"' if quoted else False, double_quote=quoted,
                               newlines_in_values=False, ignore_empty_lines=True)
    convert = pacsv.ConvertOptions(column_types={n: _ARROW_TYPES[kinds[n]] for n in names},
                                   include_columns=names, strings_can_be_null=False)
    return pacsv.read_csv(source, read_options=read, parse_options=parse, convert_options=convert)


def iter_fields(path: str | os.PathLike, *, sep: str, width: int, encoding: str = "utf-8"
                ) -> Iterator[tuple[int, list[str]]]:
    """Yields (line number, fields) of an unquoted delimited file, skipping blank lines.

    Raises:
      DataError: a line without exactly `width` fields, or bytes that do not decode as `encoding`.
    """
    lineno = 0
    try:
        with open(path, encoding=encoding, newline="") as f:
            for lineno, line in enumerate(f, 1):
                text = line.rstrip("\r\n")
                if not text:
                    continue
                fields = text.split(sep)
                if len(fields) != width:
                    raise line_error(path, lineno, f"expected {width} {sep_name(sep)}-separated fields, got "
                                                   f"{len(fields)}", line)
                yield lineno, fields
    except UnicodeDecodeError as e:
        raise line_error(path, lineno + 1, f"cannot decode as {encoding}: {e.reason}") from None


def iter_csv(path: str | os.PathLike, *, required: list[str], encoding: str = "utf-8"
             ) -> Iterator[tuple[int, dict[str, str]]]:
    """Yields (line number, {column: value}) of an RFC-4180 CSV file with a header row.

    Raises:
      DataError: missing header columns, a row of the wrong width, or broken quoting, with file and line.
    """
    lineno = 0
    try:
        with open(path, encoding=encoding, newline="") as f:
            reader = csv.reader(f, strict=True)
            head = None
            for row in reader:
                lineno = reader.line_num
                if not row:
                    continue
                if head is None:
                    _header_positions(path, lineno, row, required, {n: "str" for n in required}, ",".join(row))
                    head = row
                    continue
                if len(row) != len(head):
                    raise line_error(path, lineno, f"expected {len(head)} comma-separated fields, got {len(row)}",
                                     ",".join(row))
                yield lineno, dict(zip(head, row))
    except UnicodeDecodeError as e:
        raise line_error(path, lineno + 1, f"cannot decode as {encoding}: {e.reason}") from None
    except csv.Error as e:
        raise line_error(path, lineno + 1, f"malformed CSV: {e}") from None


def detect_encoding(path: str | os.PathLike) -> str:
    """'utf-8' if the whole file decodes as UTF-8, else 'latin-1' (older MovieLens metadata files)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"
