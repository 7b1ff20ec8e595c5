"""Local data files -> raw rows: JSON, JSON Lines, gzipped JSON Lines, parquet.

Only the file's format is this module's concern: which schema the rows have is
:mod:`tisdpo.data.schemas`', which file or hub split to read is :mod:`tisdpo.data.sources`'.
Every unreadable file raises :class:`~tisdpo.data.errors.DataError` in one line naming the
dataset, the option the file came from, the file, and the line when there is one.

Local files are read as text with Python's json module, never through a columnar
(pyarrow / datasets) conversion first: that conversion unifies a column's type across rows,
so a float in row 60 turned row 0's int into 0.0 and the error blamed the wrong row.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq  # a dependency of datasets; parquet files are read with it

from .errors import DataError

__all__ = ["LOCAL_FORMATS", "read_local_rows"]

# file-name suffix -> how it is parsed
LOCAL_FORMATS = {
    ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json",
    ".parquet": "parquet",
}
_UTF8_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"


def _one_line(err: BaseException) -> str:
    # library messages (pyarrow, gzip) can span lines; ours are one line by contract
    return " ".join(str(err).split()) or type(err).__name__


def _local_format(path: Path, name: str, source: str) -> str:
    lowered = path.name.lower()
    for suffix, fmt in sorted(LOCAL_FORMATS.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(suffix):
            return fmt
    raise DataError(name, None, None, f"unsupported file type; use one of {', '.join(sorted(LOCAL_FORMATS))}", source)


def _read_bytes(path: Path, name: str, source: str) -> bytes:
    if not path.exists():
        raise DataError(name, None, None, "does not exist", source)
    if path.is_dir():
        raise DataError(name, None, None, "is a directory, not a file; give the data file itself "
                        f"({', '.join(sorted(LOCAL_FORMATS))})", source)
    if path.stat().st_size == 0:
        raise DataError(name, None, None, "the file is empty (0 bytes)", source)
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (EOFError, OSError) as err:  # truncated gzip: EOFError; not gzip: BadGzipFile (an OSError)
        if path.name.lower().endswith(".gz"):
            raise DataError(name, None, None, f"not a complete gzip file ({_one_line(err)}); "
                            "re-download or re-compress it", source) from err
        raise DataError(name, None, None, f"cannot be read ({_one_line(err)})", source) from err


def _refuse_only_nul(data: bytes, name: str, source: str) -> None:
    """A file of NUL bytes alone is a preallocated or zeroed file (an interrupted copy, a wiped
    disk block), not text in any encoding: said before the UTF-16 check in :func:`_decode`, which
    would read the NULs as halves of 2-byte characters and send the user to re-encode it."""
    if data and not data.strip(b"\0"):
        raise DataError(name, None, None, f"the file holds only NUL bytes ({len(data):,} of them): a "
                        "zero-filled (binary) file, not text; re-download or re-create it", source)


def _decode(data: bytes, name: str, source: str) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); anything else is named, with its line."""
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    elif data.startswith((b"\xff\xfe", b"\xfe\xff")) or data[:1] == b"\0" or data[1:2] == b"\0":
        # JSON starts with an ASCII character: a NUL next to it means 2 or 4 bytes per character
        raise DataError(name, None, None, "the file is UTF-16 (or UTF-32) encoded; save it as UTF-8", source)
    elif data.startswith(_GZIP_MAGIC):
        raise DataError(name, None, None, "the file is gzip-compressed but its name does not end in .gz", source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            name, None, None,
            f"not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start - line_start} of the line); "
            "save the file as UTF-8", source, line=line,
        ) from err


def _json_rows(text: str, name: str, source: str) -> tuple[list[Any], list[int] | None]:
    """A top-level JSON list, or JSON Lines: (rows, 1-based line of each row or None)."""
    if not text.strip():
        raise DataError(name, None, None, "the file holds only whitespace, no rows", source)
    if text.lstrip().startswith("["):
        try:
            return json.loads(text), None
        except json.JSONDecodeError as err:
            raise DataError(name, None, None, f"not valid JSON: {err.msg} at column {err.colno}",
                            source, line=err.lineno) from err
    return _json_lines(text, name, source)


def _json_lines(text: str, name: str, source: str) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    lines: list[int] = []
    # split on "\n" only: str.splitlines also splits on U+2028 etc., legal inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) hold no row
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not rows and _one_object(text):
                raise DataError(name, None, None, "the file holds one JSON object, not rows: use a JSON list "
                                "of rows, or JSON Lines (one row per line)", source) from err
            raise DataError(name, len(rows), None, f"not valid JSON: {err.msg} at column {err.colno}",
                            source, line=number) from err
        lines.append(number)
    return rows, lines


def _one_object(text: str) -> bool:
    """Whether the whole text is one (pretty-printed) JSON object: its first line alone fails."""
    try:
        return isinstance(json.loads(text), Mapping)
    except json.JSONDecodeError:
        return False


def _parquet_rows(path: Path, name: str, source: str) -> list[dict]:
    try:
        # to_pylist keeps each value's own type: parquet columns are typed in the file
        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types; the file is named
        raise DataError(name, None, None, f"not a readable parquet file ({_one_line(err)})", source) from err


def read_local_rows(name: str, path: str | os.PathLike, option: str) -> tuple[list[Any], list[int] | None, str]:
    """(rows, 1-based line of each row for JSON Lines else None, source text for messages).

    ``name`` is the dataset and ``option`` the config option the file came from
    (``dataset.path`` / ``dataset.test_path``): every :class:`DataError` names both and the file.
    """
    path = Path(path).expanduser()
    source = f"{option} {str(path)!r}"
    fmt = _local_format(path, name, source)
    data = _read_bytes(path, name, source)  # existence, directory, emptiness: one set of messages
    _refuse_only_nul(data, name, source)
    if fmt == "parquet":
        return _parquet_rows(path, name, source), None, source
    rows, lines = _json_rows(_decode(data, name, source), name, source)
    return rows, lines, source
