"""Reading evaluation data: JSON lines / JSON files (with the data pipeline's ``iter_json_objects``), gzipped JSON
lines (HumanEval), and CSV files (the exam benchmarks), one file or every matching file of a folder. Every problem is
a ``DataError`` naming the file (and the line or row).

CSV files are read with pandas, the library ModelLink reads them with, in one of two ways:

* ``modellink=True``: pandas' defaults, as ModelLink's ``pd.read_csv`` calls (so an option written ``None`` or
  ``NA`` reads as NaN and is printed ``nan``, and a column of numbers is printed as numbers, as in ModelLink's
  prompts);
* ``modellink=False``: every cell the exact text of the file (the Hugging Face copies lm-eval reads keep text).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

from aquila_npu.data.sources import iter_json_objects
from aquila_npu.errors import DataError

__all__ = ["DataError", "Row", "data_files", "list_files", "read_jsonl", "read_csv", "read_json"]


@dataclass(frozen=True)
class Row:
    file: str
    line: int  # 1-based line (JSON lines), item (JSON array) or data row (CSV) number in the file
    where: str  # "FILE line N" / "FILE row N", for messages
    data: dict


def list_files(path: str, suffixes: Sequence[str], flag: str = "--task-data-path",
               exclude_prefixes: Sequence[str] = ()) -> List[str]:
    """``path`` itself, or the files of the folder ``path`` ending in one of ``suffixes`` (sorted), leaving out
    names that start with one of ``exclude_prefixes``."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if f.endswith(tuple(suffixes)) and not f.startswith(tuple(exclude_prefixes))
                       and os.path.isfile(os.path.join(path, f)))
        if not files:
            raise DataError(f"{flag} {path}: no {' or '.join(suffixes)} files in the folder")
        return files
    raise DataError(f"{flag} {path}: no such file or folder")


def data_files(path: str) -> List[str]:
    """``path`` itself, or the ``*.jsonl`` / ``*.json`` files of the folder ``path`` (sorted)."""
    return list_files(path, (".jsonl", ".json"))


def read_jsonl(path: str, suffixes: Sequence[str] = (".jsonl", ".json"),
               exclude_prefixes: Sequence[str] = ()) -> Iterator[Row]:
    """Every JSON object of every data file (JSON lines, gzipped JSON lines, or a ``.json`` array), with where it
    stands."""
    for file in list_files(path, suffixes, exclude_prefixes=exclude_prefixes):
        try:
            for where, obj in iter_json_objects(file):
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                yield Row(file, int(where.rsplit(" ", 1)[1]), where, obj)
        except (EOFError, OSError) as e:  # a damaged gzip file
            raise DataError(f"{file}: cannot read ({e})") from None


def read_json(file: str) -> object:
    """One JSON document (BBH's per-task files)."""
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{file} line {e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read ({e})") from None


def read_csv(file: str, columns: Sequence[str], header: bool, modellink: bool,
             required: Sequence[str] = ()) -> List[Row]:
    """The rows of a CSV file as dicts of ``columns``.

    ``header=False``: the file has no header and exactly these columns (MMLU). ``header=True``: the first line names
    the columns (C-Eval, CMMLU: an unnamed leading index column is ignored); the ``columns`` are looked up by name,
    case-insensitively. ``required``: columns that must be present and non-empty in every row.
    """
    import pandas as pd

    kwargs = {} if modellink else {"dtype": str, "keep_default_na": False}
    try:
        if header:
            df = pd.read_csv(file, **kwargs)
        else:
            df = pd.read_csv(file, header=None, **kwargs)
    except FileNotFoundError:
        raise DataError(f"{file}: no such file") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{file}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{file}: not a readable CSV file ({str(e).strip().splitlines()[0]})") from None
    if header:
        names = {str(c).strip().lower(): c for c in df.columns}
        missing = [c for c in columns if c.lower() not in names]
        if missing:
            raise DataError(f"{file}: no column {', '.join(repr(c) for c in missing)} in the header "
                            f"({', '.join(str(c) for c in df.columns)})")
        df = df[[names[c.lower()] for c in columns]]
    elif len(df.columns) != len(columns):
        raise DataError(f"{file}: {len(df.columns)} columns, expected {len(columns)} ({', '.join(columns)}) and no "
                        "header line")
    df.columns = list(columns)
    if not len(df):
        raise DataError(f"{file}: no rows")
    rows = []
    for n, values in enumerate(df.itertuples(index=False, name=None), 1):
        data = dict(zip(columns, values))
        for c in required:
            if _blank(data[c]):
                raise DataError(f"{file} row {n}: '{c}' is empty")
        rows.append(Row(file, n, f"{file} row {n}", data))
    return rows


def first_per_file(rows: Sequence[Row], n: Optional[int]) -> List[Row]:
    """The first ``n`` rows of each file (ModelLink's --max-eval-samples); all rows when ``n`` is None."""
    if n is None:
        return list(rows)
    seen: dict = {}
    out = []
    for r in rows:
        seen[r.file] = seen.get(r.file, 0) + 1
        if seen[r.file] <= n:
            out.append(r)
    return out


def _blank(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    try:
        return value != value  # NaN
    except Exception:  # noqa: BLE001 - anything else is a value
        return False


def text(value) -> str:
    """A cell as ModelLink's f-strings print it (``nan``, ``3``, ``2.5``, or the text)."""
    return f"{value}"


def find_sibling(path: str, folder: str, name: str) -> Tuple[Optional[str], str]:
    """``{parent of path's folder}/{folder}/{name}`` (ModelLink's ``../dev/{subject}_dev.csv``): (the file if it
    exists else None, the path looked at)."""
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidate = os.path.join(os.path.dirname(os.path.normpath(os.path.abspath(base))), folder, name)
    return (candidate if os.path.isfile(candidate) else None), candidate
