"""A disk cache of judge answers, so that a rerun pays for no judge call twice.

One JSON line per answer in ``<cache_dir>/<name>.jsonl``: ``{"key": <sha256>, "value": {...}}``,
the key a hash of everything that decides the answer (the judge model and its settings, the
prompt template, the texts judged, their order). Appends are single ``write`` calls on a file
opened with ``O_APPEND``, so concurrent writers (threads, or several runs sharing a cache) never
interleave inside a line; a line cut short by a crash is skipped when the file is read back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_key(**fields: Any) -> str:
    """A stable hash of ``fields`` (JSON with sorted keys)."""
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """``get``/``put`` of JSON values by key, backed by an append-only JSONL file."""

    def __init__(self, cache_dir: str | os.PathLike, name: str):
        self.path = Path(os.path.expanduser(str(cache_dir))) / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._entries: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        skipped = 0
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    skipped += 1  # a line cut short by a crash: that answer is asked again
        if skipped:
            log.warning("judge cache %s: skipped %d unreadable line(s)", self.path, skipped)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put(self, key: str, value: Any) -> None:
        line = (json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._entries[key] = value
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


def open_cache(cache_dir: str | os.PathLike | None, name: str) -> JudgeCache | None:
    """The cache under ``cache_dir`` (None: no caching)."""
    return JudgeCache(cache_dir, name) if cache_dir else None


def backend_identity(backend: Any) -> dict[str, Any]:
    """What identifies a judge backend's answers (its ``identity()`` when it has one)."""
    identity = getattr(backend, "identity", None)
    if callable(identity):
        return dict(identity())
    return {"backend": type(backend).__name__}
