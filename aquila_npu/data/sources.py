"""Stream rows from parquet, json and jsonl files: one file, a directory of them, or a glob.

Nothing is loaded whole: parquet is read in record batches (only the needed columns), jsonl line by line, and a
``.json`` file holding one JSON array is decoded object by object. Every problem raises ``DataError`` naming the file
and the row (1-based; for jsonl the line number).
"""

import codecs
import glob
import gzip
import json
import os
import re

from aquila_npu.errors import DataError

FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "jsonl"}
_READ_BYTES = 1 << 20
_PARQUET_BATCH = 1024
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what 'surrogateescape' turns a byte of invalid UTF-8 into


def resolve_inputs(spec):
    """The sorted list of data files that ``--input`` names (a file, a directory, or a glob pattern)."""
    if not spec:
        raise DataError("--input is required")
    if os.path.isdir(spec):
        files = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                       if _format(f) and os.path.isfile(os.path.join(spec, f)))
        if not files:
            raise DataError(f"--input: directory {spec} holds no {'/'.join(FORMATS)} files")
        return files
    if os.path.isfile(spec):
        if not _format(spec):
            raise DataError(f"--input: {spec}: unsupported file type (use {', '.join(FORMATS)})")
        return [spec]
    if glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f) and _format(f))
        if not files:
            raise DataError(f"--input: the pattern {spec} matches no {'/'.join(FORMATS)} files")
        return files
    raise DataError(f"--input: {spec} does not exist")


def _format(path):
    return FORMATS.get(os.path.splitext(path)[1].lower())


class Columns:
    """The columns a handler reads. A kind is ``"text"`` (a string; null reads as ""), ``"any"`` (passed as it is) or
    a callable that converts the value and raises ValueError for a bad one (e.g. a conversation parser). ``required``
    columns must exist; a missing optional one reads as "" (text) or None. ``flag`` is the command-line flag that
    chose them, for error messages."""

    def __init__(self, names, kinds=None, required=None, flag="--json-keys"):
        self.names = list(names)
        self.kinds = list(kinds) if kinds is not None else ["text"] * len(self.names)
        self.required = list(required) if required is not None else [True] * len(self.names)
        self.flag = flag

    def missing(self, available, where):
        for name, req in zip(self.names, self.required):
            if req and name not in available:
                have = ", ".join(sorted(map(str, available))) or "none"
                raise DataError(f"{where}: no column {name!r} (chosen by {self.flag}; columns there: {have})")

    def value(self, i, value, where):
        kind = self.kinds[i]
        if kind == "any":
            return value
        if callable(kind):
            try:
                return kind(value)
            except ValueError as err:
                raise DataError(f"{where}: column {self.names[i]!r}: {err} (chosen by {self.flag})") from None
        if value is None:
            return ""
        if isinstance(value, bytes):
            return _decode(value, where)
        if not isinstance(value, str):
            raise DataError(f"{where}: column {self.names[i]!r} holds {type(value).__name__}, not text "
                            f"(chosen by {self.flag})")
        return value


def _decode(raw, where):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None


def iter_rows(files, columns):
    """Yield one tuple per row (values in ``columns.names`` order) from every file in turn.

    Raises ``DataError`` for an empty file, a missing column, a non-text value in a text column, invalid JSON or
    invalid UTF-8, naming the file and row.
    """
    for path in files:
        fmt = _format(path)
        if fmt == "parquet":
            rows = _parquet_rows(path, columns)
        else:
            rows = (_row_from_object(obj, columns, where) for where, obj in iter_json_objects(path))
        n = 0
        for n, row in enumerate(rows, 1):
            yield row
        if n == 0:
            raise DataError(f"{path}: empty file (no rows)")


def _parquet_rows(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    names = pf.schema_arrow.names
    columns.missing(names, path)
    present = [n for n in columns.names if n in names]
    row0 = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=present):
        values = []
        for name in columns.names:
            if name not in names:
                values.append([None] * batch.num_rows)
                continue
            col = batch.column(name)
            try:
                values.append(col.to_pylist())
            except UnicodeDecodeError:
                raw = col.cast(pa.large_binary()).to_pylist()
                for j, b in enumerate(raw):
                    if b is not None:
                        _decode(b, f"{path} row {row0 + j + 1} column {name!r}")
                raise
        for j, row in enumerate(zip(*values)):
            where = f"{path} row {row0 + j + 1}"
            yield tuple(columns.value(i, v, where) for i, v in enumerate(row))
        row0 += batch.num_rows


def _row_from_object(obj, columns, where):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    columns.missing(obj.keys(), where)
    return tuple(columns.value(i, obj.get(name), where) for i, name in enumerate(columns.names))


def iter_json_objects(path):
    """(where, object) for every JSON value of a ``.jsonl`` file (one per non-blank line; gzipped when the name ends
    in ``.gz``) or a ``.json`` file (JSON lines, or one array decoded item by item); ``where`` is "FILE line N" /
    "FILE row N". Raises ``DataError`` for invalid JSON or UTF-8."""
    if path.lower().endswith(".gz"):
        return _jsonl_objects(path, gzip.open)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.lower().endswith(".json") and head.startswith(b"["):
        return _json_array_objects(path)
    return _jsonl_objects(path)


def _jsonl_objects(path, opener=open):
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path} line {lineno}"
            line = _decode(raw, where)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err})") from None
            yield where, obj


def _json_array_objects(path):
    decoder = json.JSONDecoder()
    bytes_decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    buf, pos, bad_at, eof, row = "", 0, None, False, 0
    with open(path, "rb") as f:

        def more():
            nonlocal buf, bad_at, eof
            chunk = f.read(_READ_BYTES)
            eof = not chunk
            text = bytes_decoder.decode(chunk, final=eof)
            if bad_at is None:
                m = _ESCAPED_BYTE.search(text)
                if m:
                    bad_at = len(buf) + m.start()
            buf += text

        def skip_ws():
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return
                more()

        more()
        skip_ws()
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError(f"{path}: expected a JSON array")
        pos += 1
        while True:
            skip_ws()
            if pos >= len(buf):
                raise DataError(f"{path}: JSON array not closed (file truncated after row {row})")
            if buf[pos] == "]":
                return
            if row:
                if buf[pos] != ",":
                    raise DataError(f"{path} row {row + 1}: invalid JSON (expected ',' between array items)")
                pos += 1
                skip_ws()
            where = f"{path} row {row + 1}"
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as err:
                    if bad_at is not None and pos <= bad_at <= err.pos:
                        raise DataError(f"{where}: not valid UTF-8") from None
                    if eof:
                        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
                    more()
            if bad_at is not None and pos <= bad_at < end:
                raise DataError(f"{where}: not valid UTF-8")
            row += 1
            yield where, obj
            pos = end
            if pos > _READ_BYTES:
                buf = buf[pos:]
                if bad_at is not None:
                    bad_at -= pos
                pos = 0
