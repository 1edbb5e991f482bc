"""Fast delimited-text parsing of interaction logs, with line-numbered errors.

The fast path hands the whole file to `np.loadtxt` (C parser, about 10 M
lines/s). `np.loadtxt` only reports a data-row index, so on any failure the
file is re-read line by line in Python to find the first bad line and name it
(file, 1-based line number, line text). The slow scan also returns the data if
it finds nothing wrong (for inputs the C parser rejects but the format allows,
e.g. whitespace-only lines in a tab-separated file), so both paths accept
exactly the same files.
"""

import dataclasses
import itertools
import os
import re
import warnings
from typing import Optional, Tuple

import numpy as np

from tfrec_fast.data.interactions import Interactions

_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclasses.dataclass(frozen=True)
class TableFormat:
    """Layout of one delimited interaction file.

    Attributes:
        delimiter: Field separator; None means runs of whitespace.
        num_fields: Number of fields every non-blank data line must have.
        user_column: 0-based index of the integer user id field.
        item_column: 0-based index of the integer item id field.
        time_column: 0-based index of the numeric timestamp field, or None to
            use the data-line order 0, 1, ..., N - 1 as timestamps.
        float_columns: Other fields known to be numeric; they are parsed (and
            discarded) as float64 in the fast path. Remaining fields are read
            as opaque strings.
        header_lines: Number of leading lines to skip (0 or 1).
    """

    delimiter: Optional[str]
    num_fields: int
    user_column: int
    item_column: int
    time_column: Optional[int] = None
    float_columns: Tuple[int, ...] = ()
    header_lines: int = 0

    def describe_delimiter(self) -> str:
        """Human-readable name of the delimiter, for error messages."""
        return "whitespace" if self.delimiter is None else repr(self.delimiter)


def parse_interactions(path: os.PathLike, fmt: TableFormat) -> Interactions:
    """Parses a delimited interaction file into `Interactions`.

    Blank (empty or whitespace-only) lines are ignored.

    Args:
        path: Existing file to read (UTF-8 text).
        fmt: Its layout.

    Returns:
        Interactions with users/items int64 [N] and timestamps float64 [N].

    Raises:
        ValueError: A line has the wrong number of fields or a non-integer id
            (message names the file, the 1-based line number and the line), or
            the file holds no data lines ("... contains no interactions").
    """
    try:
        users, items, times = _fast_parse(path, fmt)
    except ValueError:  # Includes UnicodeDecodeError.
        users, items, times = _slow_parse(path, fmt)
    if users.shape[0] == 0:
        raise ValueError(f"{os.fspath(path)} contains no interactions.")
    return Interactions(users=users, items=items, timestamps=times)


def _column_dtype(fmt: TableFormat, column: int):
    """numpy dtype used for `column` in the fast path."""
    if column in (fmt.user_column, fmt.item_column):
        return np.int64
    if column == fmt.time_column or column in fmt.float_columns:
        return np.float64
    return object


def _fast_parse(path, fmt: TableFormat):
    """Parses with np.loadtxt; raises ValueError on any malformed input.

    Returns:
        (users int64 [N], items int64 [N], timestamps float64 [N]).
    """
    dtype = [(f"f{j}", _column_dtype(fmt, j)) for j in range(fmt.num_fields)]
    options = dict(dtype=dtype, comments=None, ndmin=1, quotechar=None)
    with warnings.catch_warnings():
        # An empty file only warns; parse_interactions reports it.
        warnings.simplefilter("ignore", UserWarning)
        if fmt.delimiter is None or len(fmt.delimiter) == 1:
            table = np.loadtxt(os.fspath(path), delimiter=fmt.delimiter,
                               skiprows=fmt.header_lines, encoding="utf-8",
                               **options)
        else:
            # np.loadtxt wants a single-character delimiter: map e.g. "::" to
            # a tab while streaming. Stray tabs then fail and the slow path,
            # which splits on the real delimiter, reports the line.
            with open(path, encoding="utf-8") as f:
                lines = itertools.islice(f, fmt.header_lines, None)
                table = np.loadtxt(
                    (line.replace(fmt.delimiter, "\t") for line in lines),
                    delimiter="\t", **options)
    users = np.ascontiguousarray(table[f"f{fmt.user_column}"])
    items = np.ascontiguousarray(table[f"f{fmt.item_column}"])
    if fmt.time_column is None:
        times = np.arange(users.shape[0], dtype=np.float64)
    else:
        times = np.ascontiguousarray(table[f"f{fmt.time_column}"])
    return users, items, times


def _slow_parse(path, fmt: TableFormat):
    """Line-by-line parse: raises on the first bad line, else returns data.

    Only used after the fast path failed, so its per-line Python loop runs at
    most once per bad file.

    Returns:
        (users int64 [N], items int64 [N], timestamps float64 [N]).
    """
    users, items, times = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no <= fmt.header_lines:
                continue
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split(fmt.delimiter)
            if len(fields) != fmt.num_fields:
                raise _line_error(
                    path, line_no, line,
                    f"expected {fmt.num_fields} fields separated by "
                    f"{fmt.describe_delimiter()}, found {len(fields)}")
            users.append(_parse_id(fields[fmt.user_column], "user id",
                                   path, line_no, line))
            items.append(_parse_id(fields[fmt.item_column], "item id",
                                   path, line_no, line))
            if fmt.time_column is None:
                times.append(float(len(times)))
            else:
                times.append(_parse_float(fields[fmt.time_column],
                                          "timestamp", path, line_no, line))
    return (np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
            np.array(times, dtype=np.float64))


def _parse_id(field: str, what: str, path, line_no: int, line: str) -> int:
    """Parses an int64 id field or raises a line-numbered ValueError."""
    if not _INT_RE.fullmatch(field):
        raise _line_error(path, line_no, line,
                          f"{what} {field.strip()!r} is not an integer")
    value = int(field)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise _line_error(path, line_no, line,
                          f"{what} {field.strip()!r} does not fit in int64")
    return value


def _parse_float(field: str, what: str, path, line_no: int, line: str):
    """Parses a float field or raises a line-numbered ValueError."""
    try:
        return float(field)
    except ValueError:
        problem = f"{what} {field.strip()!r} is not a number"
        raise _line_error(path, line_no, line, problem) from None


def _line_error(path, line_no: int, line: str, problem: str) -> ValueError:
    """Builds the ValueError for a bad line: file, line number, text."""
    return ValueError(
        f"{os.fspath(path)}, line {line_no}: {problem}: {line!r}")
