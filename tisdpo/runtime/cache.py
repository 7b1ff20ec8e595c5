"""Content-addressed artifact cache for pipeline stages.

Each artifact is a directory ``<root>/<stage>/<key>/`` where ``key`` hashes everything that
determines it (config slice, data fingerprint, upstream artifact keys, seed). Builds go to a
sibling build directory (``.build-<key>``) and are renamed into place only when complete, so a
killed build never leaves a half-written artifact behind; the build directory is stable, so the
next request resumes a killed build from the checkpoints it left in ``<build dir>/_resume``.
A ``MANIFEST.json`` records the sha256 of every file; a read whose hashes do not match is treated as corrupt: warned about, deleted, rebuilt.
A file lock per key means two sweep jobs that need the same artifact build it once.

The key also names the code that builds the artifact: ``<hash of key_fields>-<code hash>``, where the
code hash covers the module that defines ``build`` and every ``tisdpo`` module it imports,
transitively (``hashing.code_hash``; comments do not count). Edited code therefore never reuses an
artifact the old code made. ``cache.reuse_across_code=true`` (set per job by ``run_dir.begin_run``)
reuses an artifact of the same inputs built by other code when there is no current one: logged as a
warning and recorded in the stage's event (``results.json["stages"]``: ``reused_across_code``).

Several processes of one run (DDP/FSDP: Lightning re-launches the script for the other ranks at
the first multi-device fit; torchrun and SLURM start them all): rank 0 builds and seals every
artifact, the other ranks wait until it is sealed and read it. A ``collective`` build (one that
trains through the run's strategy: SFT, the estimator models) is run by every rank, in the same
build dir, since its fit needs them all; only rank 0 writes files and seals (the builders save on
rank 0 only). The artifact must be decided the same way on every rank, so a multi-process run
needs the cache enabled (its paths are shared; an uncached build's are not).
A cache that cannot be written (read-only mount, another user's files) still serves its valid
artifacts: a sealed artifact is immutable, so it is read without the lock; a lock that cannot be
created beside the artifact is taken in the temporary dir instead (keyed by the artifact's path).
"""
from __future__ import annotations

import functools
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

from tisdpo.hashing import code_hash, file_sha256, stable_hash

__all__ = ["ArtifactCache", "Artifact", "stable_hash", "artifact_key", "set_code_policy", "launch_rank"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
# Builders keep in-progress training checkpoints under <build dir>/_resume; removed before sealing.
RESUME_SUBDIR = "_resume"


def launch_rank() -> int:
    """This process's global rank as its launcher set it: 0 for a single process, and for the
    process from which Lightning's launcher later starts the other ranks. (Under Lightning's own
    multi-node launch only "0 or not" is exact: a node's first process counts as rank NODE_RANK.)"""
    env = os.environ
    if env.get("RANK"):  # torchrun, and most cluster launchers
        return int(env["RANK"])
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return int(env["SLURM_PROCID"])
    local, node = int(env.get("LOCAL_RANK") or 0), int(env.get("NODE_RANK") or 0)
    return local or node


# Per job (run_dir.begin_run sets it from cache.reuse_across_code): may an artifact built by other code be reused?
_CODE_POLICY = {"reuse_across_code": False}


def set_code_policy(reuse_across_code: bool) -> None:
    """The job's ``cache.reuse_across_code``: the default of every ArtifactCache made after this call."""
    _CODE_POLICY["reuse_across_code"] = bool(reuse_across_code)


def builder_module(build: Callable) -> str | None:
    """The module that defines ``build`` (a function, lambda or functools.partial)."""
    while isinstance(build, functools.partial):
        build = build.func
    return getattr(build, "__module__", None)


def builder_code(build: Callable) -> str | None:
    """The hash of the code that builds an artifact: ``build``'s module and what it imports in
    tisdpo; None for a builder outside tisdpo (a test's, a notebook's): no code of ours to track."""
    module = builder_module(build)
    return code_hash(module) if module and module.split(".")[0] == "tisdpo" else None


def artifact_key(key_fields: dict[str, Any], build: Callable) -> str:
    """``<hash of the inputs>-<hash of the builder's code>``: the artifact's directory name."""
    code = builder_code(build)
    return f"{stable_hash(key_fields)}-{code}" if code else stable_hash(key_fields)


def key_code(key: str) -> str | None:
    """The code hash in an artifact key, or None (a builder outside tisdpo)."""
    return key.partition("-")[2] or None


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
    def __init__(self, root: str | os.PathLike, enabled: bool = True, rank_wait_s: float = 24 * 3600,
                 reuse_across_code: bool | None = None):
        self.root = Path(root).expanduser()
        self.enabled = enabled
        # None: the job's cache.reuse_across_code (set_code_policy)
        self.reuse_across_code = _CODE_POLICY["reuse_across_code"] if reuse_across_code is None else reuse_across_code
        self.rank_wait_s = rank_wait_s  # how long a rank other than 0 waits for rank 0's artifact
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
        collective: bool = False,
    ) -> Artifact:
        """Return the artifact keyed by ``key_fields`` (everything that determines it), building it
        with ``build(tmp_dir)`` if absent.

        ``build`` writes its files into the directory it is given; it must not rely on the
        final path (the directory is renamed once ``build`` returns). ``collective``: every rank
        of a multi-process run takes part in the build (see the module docstring).
        """
        key = artifact_key(key_fields, build)
        final = self._dir(stage, key)
        rank = launch_rank()
        if rank != 0:
            return self._from_rank_zero(stage, key, final, build if collective else None, rank)
        if not self.enabled:
            final = self.root / "_uncached" / stage / f"{key}-{uuid.uuid4().hex[:8]}"
        # Sealed artifacts are renamed into place whole and never change: a valid one needs no lock
        # (a read-only cache serves it).
        if self.enabled and final.exists() and self.is_valid(final):
            return self._reused(stage, key, final)
        if self.enabled and self.reuse_across_code and key_code(key):
            other = self._built_by_other_code(stage, key)
            if other is not None:
                return self._reused(stage, other.name, other, across_code_from=key)
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
                code = {"module": builder_module(build), "hash": builder_code(build)}
                (tmp / "key.json").write_text(json.dumps({**key_fields, "_code": code}, indent=2, sort_keys=True, default=str))
                (tmp / MANIFEST).write_text(json.dumps({"stage": stage, "key": key, "files": _hash_tree(tmp)}, indent=2))
                os.replace(tmp, final)  # atomic on POSIX: readers see all or nothing
            except Exception:  # a failed build starts over next time; an interrupted one (killed) resumes
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        seconds = time.perf_counter() - started
        log.info("stage %-10s built   %s (%.1fs)", stage, final, seconds)
        event = {"stage": stage, "key": key, "reused": False, "seconds": round(seconds, 2), "code": key_code(key)}
        if device is not None:  # where the build ran (results.json "stages")
            event["device"] = str(device)
        if resumed:
            event["resumed_build"] = True
        self.events.append(event)
        return Artifact(stage, key, final, reused=False)

    def _from_rank_zero(self, stage: str, key: str, final: Path, build: Callable[[Path], None] | None,
                        rank: int) -> Artifact:
        """A rank other than 0: join the build when it is collective, then wait for rank 0 to seal it."""
        if not self.enabled:
            raise ValueError(f"stage {stage}: cache.enabled=false with several processes (rank {rank}): the ranks "
                             "share each stage's artifact through the cache; enable it (cache.dir on a shared disk)")
        if final.exists() and self.is_valid(final):
            return self._reused(stage, key, final)
        started = time.perf_counter()
        if build is not None:
            tmp = final.parent / f".build-{key}"  # rank 0's build dir: a sharded checkpoint is written by all ranks
            tmp.mkdir(parents=True, exist_ok=True)
            build(tmp)
        parent = os.getppid()
        while not final.exists():
            waited = time.perf_counter() - started
            if os.environ.get("LOCAL_RANK") and os.getppid() != parent:
                raise RuntimeError(f"stage {stage}: rank 0 (which started this rank) exited before sealing {final}")
            if waited > self.rank_wait_s:
                raise TimeoutError(f"stage {stage}: rank {rank} waited {waited:.0f}s for rank 0 to seal {final}")
            time.sleep(1.0)
        if not self.is_valid(final):
            raise RuntimeError(f"stage {stage}: the artifact rank 0 sealed at {final} fails its hash check on rank {rank}")
        seconds = time.perf_counter() - started
        log.info("stage %-10s rank %d: read rank 0's artifact %s (%.1fs)", stage, rank, final, seconds)
        self.events.append({"stage": stage, "key": key, "reused": False, "seconds": round(seconds, 2), "rank": rank})
        return Artifact(stage, key, final, reused=False)

    def _built_by_other_code(self, stage: str, key: str) -> Path | None:
        """The newest valid artifact with the same inputs as ``key`` but built by other code, or None."""
        inputs, _, code = key.partition("-")
        if not code:
            return None
        found = [p for p in (self.root / stage).glob(f"{inputs}-*") if p.is_dir() and p.name != key]
        for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
            if self.is_valid(path):
                return path
        return None

    def _reused(self, stage: str, key: str, final: Path, across_code_from: str | None = None) -> Artifact:
        # no device: nothing ran (the artifact's key.json names what built it)
        event = {"stage": stage, "key": key, "reused": True, "seconds": 0.0, "device": None, "code": key_code(key)}
        if across_code_from is not None:
            current = key_code(across_code_from)
            log.warning("stage %-10s reused  %s, built by other code (%s; the code now is %s): "
                        "cache.reuse_across_code=true", stage, final, event["code"], current)
            event.update(reused_across_code=True, code_now=current)
        else:
            log.info("stage %-10s reused  %s", stage, final)
        self.events.append(event)
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
