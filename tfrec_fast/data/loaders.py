"""Loaders for interaction-log file formats (RecBole, SASRec, MovieLens).

Every loader returns `Interactions` in file order, with raw integer ids, and
raises:

* `FileNotFoundError` naming the path when the file does not exist;
* `ValueError` "... contains no interactions" when it has no data lines;
* `ValueError` naming the file, the 1-based line number and the line text for
  a line with the wrong number of fields or a non-integer id.

Blank lines are ignored everywhere. Data is read at run time only; nothing is
bundled with this package.
"""

import importlib.util
import os
import pathlib
import re

from tfrec_fast.data._parsing import TableFormat
from tfrec_fast.data._parsing import parse_interactions
from tfrec_fast.data.interactions import Interactions

_RECBOLE_INSTALL = "pip install --no-deps recbole==1.2.1"
_ML100K_RELATIVE = ("dataset_example", "ml-100k", "ml-100k.inter")
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def load_movielens_100k() -> Interactions:
    """Loads MovieLens-100k from the example data shipped inside `recbole`.

    Reads `recbole/dataset_example/ml-100k/ml-100k.inter` from the installed
    package without importing recbole's Python code (recbole is installed with
    `--no-deps`, so `import recbole` may fail).

    Returns:
        Interactions with 100000 rows (943 users, 1682 items): users/items
        int64 [100000] raw ids, timestamps float64 [100000] (Unix seconds).

    Raises:
        ModuleNotFoundError: recbole is not installed (the message says
            `pip install --no-deps recbole==1.2.1`).
        FileNotFoundError: recbole is installed but lacks the file.
    """
    return load_recbole_inter(movielens_100k_path())


def movielens_100k_path() -> pathlib.Path:
    """Returns the path of `ml-100k.inter` inside the installed recbole.

    Uses `importlib.util.find_spec`, which locates a top-level package without
    executing its `__init__.py`.

    Raises:
        ModuleNotFoundError: recbole is not installed.
        FileNotFoundError: No search location of recbole holds the file.
    """
    try:
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "MovieLens-100k is read from the example data of the recbole "
            f"package, which is not installed: {_RECBOLE_INSTALL}",
            name="recbole")
    candidates = [pathlib.Path(location).joinpath(*_ML100K_RELATIVE)
                  for location in spec.submodule_search_locations]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "recbole is installed but its MovieLens-100k example file is missing: "
        f"{candidates[0]} (reinstall with: {_RECBOLE_INSTALL})")


def load_recbole_inter(path: os.PathLike) -> Interactions:
    """Loads a RecBole atomic `.inter` file.

    Format: tab-separated, the first non-blank line a header of `name:type`
    fields, e.g.
    `user_id:token\\titem_id:token\\trating:float\\ttimestamp:float`. The
    fields `user_id` and `item_id` (integer tokens) are required, `timestamp`
    is optional (without it the line order is the time order); other fields
    are ignored but every line must have as many fields as the header.

    Args:
        path: The `.inter` file.

    Returns:
        Interactions: users/items int64 [N] raw ids, timestamps float64 [N].

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: Empty log, header without `user_id`/`item_id`, malformed
            line or non-integer id (with file, line number and line text).
    """
    path = _existing_file(path)
    first = _first_nonblank_line(path)
    if first is None:
        raise ValueError(f"{path} contains no interactions.")
    header_line_no, header = first
    fields = header.split("\t")
    names = [field.split(":", 1)[0].strip() for field in fields]
    types = [field.split(":", 1)[1].strip() if ":" in field else ""
             for field in fields]
    for required in ("user_id", "item_id"):
        if required not in names:
            raise ValueError(
                f"{path}, line {header_line_no}: the RecBole header has no "
                f"{required!r} "
                f"field: {header!r}")
    fmt = TableFormat(
        delimiter="\t",
        num_fields=len(fields),
        user_column=names.index("user_id"),
        item_column=names.index("item_id"),
        time_column=names.index("timestamp") if "timestamp" in names else None,
        float_columns=tuple(j for j, t in enumerate(types) if t == "float"),
        header_lines=header_line_no)
    return parse_interactions(path, fmt)


def load_sasrec_txt(path: os.PathLike) -> Interactions:
    """Loads a SASRec-style `user item` file (one interaction per line).

    Fields are separated by whitespace; the line order is the time order, so
    timestamps are 0.0, 1.0, ..., N - 1.

    Args:
        path: The text file.

    Returns:
        Interactions: users/items int64 [N] raw ids, timestamps float64 [N].

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: Empty log, malformed line or non-integer id.
    """
    path = _existing_file(path)
    fmt = TableFormat(delimiter=None, num_fields=2, user_column=0,
                      item_column=1)
    return parse_interactions(path, fmt)


def load_movielens_ratings(path: os.PathLike) -> Interactions:
    """Loads MovieLens ratings: `ratings.dat` or `ratings.csv`.

    `ratings.dat` (ML-1M, ML-10M): `user::item::rating::timestamp`, no header.
    `ratings.csv` (ML-20M, ML-25M, ml-latest):
    `userId,movieId,rating,timestamp` with a header line (a first line whose
    first field is not an integer is taken as the header). The format is
    chosen by the `.csv` extension, else by the first non-blank line
    containing `::` (or, failing that, a comma).

    Args:
        path: The ratings file.

    Returns:
        Interactions: users/items int64 [N] raw ids, timestamps float64 [N]
        (Unix seconds). Ratings are dropped.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: Empty log, unrecognised separator, malformed line or
            non-integer id.
    """
    path = _existing_file(path)
    first = _first_nonblank_line(path)
    if first is None:
        raise ValueError(f"{path} contains no interactions.")
    line_no, line = first
    if path.suffix.lower() == ".csv":
        delimiter = ","
    elif "::" in line:
        delimiter = "::"
    elif "," in line:
        delimiter = ","
    else:
        raise ValueError(
            f"{path}, line {line_no}: not a MovieLens ratings file (expected "
            f"'user::item::rating::timestamp' or a .csv file): {line!r}")
    header_lines = 0
    if delimiter == "," and not _INT_RE.fullmatch(line.split(",", 1)[0]):
        header_lines = line_no
    fmt = TableFormat(delimiter=delimiter, num_fields=4, user_column=0,
                      item_column=1, time_column=3, float_columns=(2,),
                      header_lines=header_lines)
    return parse_interactions(path, fmt)


def _existing_file(path: os.PathLike) -> pathlib.Path:
    """Returns `path` as a Path, raising FileNotFoundError if it is missing."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Interaction file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(
            f"Expected an interaction file, got a directory: {path}")
    return path


def _first_nonblank_line(path: pathlib.Path):
    """Returns (1-based line number, text) of the first non-blank line.

    Returns None when every line is blank (or the file is empty).
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                return line_no, line.rstrip("\r\n")
    return None
