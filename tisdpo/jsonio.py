"""Strict JSON files: results.json and friends are read by jq, pandas, browsers and other languages.

Python's ``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which is not JSON: other
readers reject the whole file (a tester got NaN in results.json from ``eval.n_prompts=0``).
:func:`write_json_atomic` writes non-finite floats as ``null`` instead and says which keys,
in one warning; it refuses nothing, since a run's results are worth keeping even when one
metric is undefined.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["finite_json", "read_json", "write_json_atomic"]

log = logging.getLogger(__name__)

#: keys named in the warning; more are counted
MAX_NAMED = 10


def _scalar(value: Any) -> Any:
    """numpy / torch 0-d values -> Python numbers (their floats can be NaN too)."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def finite_json(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float replaced by None, and the keys where that happened
    (``a/b`` for nested dicts, ``a[3]`` for list items)."""
    obj = _scalar(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [where or "<top level>"]
    if isinstance(obj, dict):
        out, bad = {}, []
        for key, value in obj.items():
            out[key], found = finite_json(value, f"{where}/{key}" if where else str(key))
            bad += found
        return out, bad
    if isinstance(obj, (list, tuple)):
        out, bad = [], []
        for i, value in enumerate(obj):
            clean, found = finite_json(value, f"{where}[{i}]")
            out.append(clean)
            bad += found
        return out, bad
    return obj, []


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` to ``path`` as strict JSON, atomically (a reader never sees half a file).

    Non-finite floats become ``null``, with one warning naming the keys. Objects JSON has no
    type for (paths, enums) are written as their ``str``. Returns the path.
    """
    path = Path(path)
    clean, bad = finite_json(obj)
    if bad:
        named = ", ".join(bad[:MAX_NAMED]) + (f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else "")
        log.warning("%s: %d non-finite value%s written as null: %s", path, len(bad), "s" * (len(bad) != 1), named)
    text = json.dumps(clean, indent=indent, allow_nan=False, default=str)
    # a per-process temporary name: two ranks or jobs writing the same file never share one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())  # the rename must not land before the data on a crash
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path`` (UTF-8). Lenient about NaN, which files written before
    :func:`write_json_atomic` may hold."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
