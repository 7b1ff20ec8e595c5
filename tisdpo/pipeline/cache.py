"""Content-addressed artifact cache for pipeline stages.

Each artifact is a directory ``<root>/<stage>/<key>/`` where ``key`` hashes everything that
determines it (config slice, data fingerprint, upstream artifact keys, seed). Builds go to a
sibling build directory (``.build-<key>``) and are renamed into place only when complete, so a
killed build never leaves a half-written artifact behind; the build directory is stable, so the
next request resumes a killed build from the checkpoints it left in ``<build dir>/_resume``.
A ``MANIFEST.json`` records the sha256 of every file; a read whose hashes do not match is treated as corrupt: warned about, deleted, rebuilt.
A file lock per key means two sweep jobs that need the same artifact build it once.
A cache that cannot be written (read-only mount, another user's files) still serves its valid
artifacts: a sealed artifact is immutable, so it is read without the lock; a lock that cannot be
created beside the artifact is taken in the temporary dir instead (keyed by the artifact's path).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from tisdpo.hashing import file_sha256

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
# Builders keep in-progress training checkpoints under <build dir>/_resume; removed before sealing.
RESUME_SUBDIR = "_resume"


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of a canonical JSON dump (sorted keys); the cache key of a config slice."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _hash_tree(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


@dataclass
class Artifact:
    stage: str
    key: str
    path: Path
    reused: bool


class ArtifactCache:
    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root = Path(root).expanduser()
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []  # what each stage did, for logs and results.json

    def record(self, stage: str, **fields: Any) -> None:
        """An event for a stage that is not a cached artifact (training, evaluation): never reused."""
        self.events.append({"stage": stage, "reused": None, **fields})

    def _dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def is_valid(self, path: Path) -> bool:
        manifest = path / MANIFEST
        if not manifest.is_file():
            return False
        try:
            recorded = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError):
            return False
        return recorded == _hash_tree(path)

    def get_or_build(
        self,
        stage: str,
        key_fields: dict[str, Any],
        build: Callable[[Path], None],
        device: Any = None,
    ) -> Artifact:
        """Return the artifact keyed by ``key_fields`` (everything that determines it), building it
        with ``build(tmp_dir)`` if absent.

        ``build`` writes its files into the directory it is given; it must not rely on the
        final path (the directory is renamed once ``build`` returns).
        """
        key = stable_hash(key_fields)
        final = self._dir(stage, key)
        if not self.enabled:
            final = self.root / "_uncached" / stage / f"{key}-{uuid.uuid4().hex[:8]}"
        # Sealed artifacts are renamed into place whole and never change: a valid one needs no lock
        # (a read-only cache serves it).
        if self.enabled and final.exists() and self.is_valid(final):
            return self._reused(stage, key, final)
        final.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with _lock(final):
            if self.enabled and final.exists():
                if self.is_valid(final):
                    return self._reused(stage, key, final)
                log.warning("stage %s: artifact %s is corrupt or partial (hash mismatch); rebuilding", stage, final)
                shutil.rmtree(final)
            # A stable build dir per key: a build killed mid-way (SIGKILL, preemption) leaves its
            # checkpoints there and the next request resumes it (we hold the lock: no one else is in it).
            tmp = final.parent / (f".build-{key}" if self.enabled else f".tmp-{key}-{uuid.uuid4().hex[:8]}")
            resumed = tmp.exists()
            if resumed:
                log.warning("stage %s: resuming the interrupted build in %s", stage, tmp)
            tmp.mkdir(parents=True, exist_ok=True)
            try:
                build(tmp)
                shutil.rmtree(tmp / RESUME_SUBDIR, ignore_errors=True)
                (tmp / "key.json").write_text(json.dumps(key_fields, indent=2, sort_keys=True, default=str))
                (tmp / MANIFEST).write_text(json.dumps({"stage": stage, "key": key, "files": _hash_tree(tmp)}, indent=2))
                os.replace(tmp, final)  # atomic on POSIX: readers see all or nothing
            except Exception:  # a failed build starts over next time; an interrupted one (killed) resumes
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        seconds = time.perf_counter() - started
        log.info("stage %-10s built   %s (%.1fs)", stage, final, seconds)
        event = {"stage": stage, "key": key, "reused": False, "seconds": round(seconds, 2)}
        if device is not None:  # where the build ran (results.json "stages")
            event["device"] = str(device)
        if resumed:
            event["resumed_build"] = True
        self.events.append(event)
        return Artifact(stage, key, final, reused=False)

    def _reused(self, stage: str, key: str, final: Path) -> Artifact:
        log.info("stage %-10s reused  %s", stage, final)
        # no device: nothing ran (the artifact's key.json names what built it)
        self.events.append({"stage": stage, "key": key, "reused": True, "seconds": 0.0, "device": None})
        return Artifact(stage, key, final, reused=True)


def _lock(final: Path) -> FileLock:
    """The build lock beside the artifact; in the temporary dir when the cache dir cannot hold it."""
    path = Path(str(final) + ".lock")
    try:
        with open(path, "a"):
            pass
        return FileLock(str(path))
    except OSError as error:  # read-only cache, or not ours: jobs on this machine still build once
        fallback = Path(tempfile.gettempdir()) / f"tisdpo-lock-{hashlib.sha256(str(final.resolve()).encode()).hexdigest()[:16]}.lock"
        log.warning("cache: cannot create the lock %s (%s); locking with %s instead", path, error.strerror or error, fallback)
        return FileLock(str(fallback))
