"""Checkpoint files on disk: whether one is intact, and which one a run resumes from.

Light on purpose (no torch, no Lightning): ``failures.py`` names the last good checkpoint in
``failed.json`` and must stay importable in a second. The Lightning side (``VerifiedCheckpoint``,
stage checkpointing) is in ``callbacks.py``; which checkpoint a resumed run starts from is
``run_dir.train_checkpoint``.

Every checkpoint the pipeline writes gets a sidecar ``<ckpt>.sha256`` (JSON: ``sha256``, ``size``,
``step``, ``file``), written atomically once the checkpoint file is complete. A resume trusts a
checkpoint only if its content matches the sidecar; the newest is the one with the highest step
(from the sidecar, else from ``step=N`` in the name), not whichever is called ``last.ckpt``. A
checkpoint without a sidecar (runs from before sidecars) is accepted if its zip is readable.
Sharded checkpoints (FSDP, ``state_dict_type=sharded``) are directories with the same names: their
sidecar hashes every file in them, and one without a sidecar is accepted once complete (``.metadata``).

A checkpoint of a run dir (``<run dir>/checkpoints/``) also carries the identity of the run that
wrote it, under ``run`` in its sidecar: the loss, a hash of the config (minus the keys that cannot
change the weights, :data:`IDENTITY_IGNORED`) and the training data's fingerprint, all read from the
run's ``run_config.json``. A resume compares it with the run it continues (:func:`identity_problem`):
another run's checkpoint copied in is refused instead of silently continued.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from tisdpo.hashing import file_sha256, stable_hash
from tisdpo.jsonio import write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "run_config.json"
IDENTITY = "_identity"  # run_config.json: data and code identity, checked apart from the config
# Config keys that may differ between a run and its resumption: they cannot change the weights.
IDENTITY_IGNORED = (IDENTITY, "resume", "resume_strict_code", "resume_allow_code_change", "paths", "hydra", "logger",
                    "eval", "cache", "label", "project", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                    "checkpoint", "train.num_workers", "export")
LAST = "last.ckpt"
SIDECAR = ".sha256"
_STEP = re.compile(r"(?:^|-)step=(\d+)")


def sidecar_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + SIDECAR)


def _content_sha256(path: Path) -> str:
    """sha256 of a checkpoint: its bytes, or for a sharded checkpoint (a directory, as FSDP writes
    with state_dict_type=sharded) every file's relative name and hash, in order."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for part in sorted(q for q in path.rglob("*") if q.is_file()):
        digest.update(str(part.relative_to(path)).encode())
        digest.update(file_sha256(part).encode())
    return digest.hexdigest()


def _content_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(q.stat().st_size for q in path.rglob("*") if q.is_file())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"a.b.c": value}``."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def identity_ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IDENTITY_IGNORED)


def run_identity(run_dir: Path) -> dict[str, Any] | None:
    """What makes a run's checkpoints its own: ``{"loss", "config", "data"}`` from its run_config.json
    (None when it has none, e.g. a stage's build dir)."""
    try:
        config = json.loads((Path(run_dir) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    weights_keys = {k: v for k, v in flatten(config).items() if not identity_ignored(k)}
    data = ((config.get(IDENTITY) or {}).get("data") or {}).get("train")
    return {"loss": (config.get("loss") or {}).get("name"), "config": stable_hash(weights_keys), "data": data}


def _owning_run(path: Path) -> Path | None:
    """The run dir of a checkpoint in ``<run dir>/checkpoints/``, else None."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else None


def write_sidecar(path: Path, step: int, identity: dict[str, Any] | None = None) -> Path:
    """Hash the complete checkpoint ``path`` (a file, or a sharded checkpoint's directory) into
    ``<path>.sha256`` (atomic: never half a sidecar), with the identity of the run that wrote it
    (``identity``, else read from the run dir the checkpoint is in)."""
    path = Path(path)
    record: dict[str, Any] = {"sha256": _content_sha256(path), "size": _content_size(path), "step": int(step),
                              "file": path.name}
    owner = _owning_run(path)
    identity = identity if identity is not None else (run_identity(owner) if owner is not None else None)
    if identity is not None:
        record["run"] = identity
    return write_json_atomic(sidecar_path(path), record)


def identity_problem(path: Path, run_dir: Path) -> str | None:
    """Why checkpoint ``path`` is not the run ``run_dir``'s own (another loss, config or data), as
    a phrase; None when it is, or when either side predates identities (nothing to compare)."""
    recorded = (read_sidecar(path) or {}).get("run")
    expected = run_identity(run_dir)
    if not isinstance(recorded, dict) or expected is None:
        return None
    names = {"loss": "loss", "config": "config hash", "data": "training data"}
    differences = [f"{names[k]} {recorded[k]} (this run: {expected[k]})" for k in names
                   if recorded.get(k) is not None and expected.get(k) is not None and recorded[k] != expected[k]]
    if not differences:
        return None
    return "was written by another run: " + ", ".join(differences)


def read_sidecar(path: Path) -> dict | None:
    try:
        record = json.loads(sidecar_path(path).read_text())
        return record if isinstance(record, dict) and "sha256" in record else None
    except (OSError, ValueError):
        return None


def readable_zip(path: Path) -> bool:
    """A complete torch.save file (a zip archive with its central directory): a truncated or
    half-written file fails this without loading the tensors."""
    try:
        if Path(path).stat().st_size == 0:
            return False
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def sharded_complete(path: Path) -> bool:
    """A sharded checkpoint directory that torch.distributed.checkpoint finished: its coordinator
    writes ``.metadata`` last, after every rank's shards."""
    return (path / ".metadata").is_file() and any(path.glob("*.distcp"))


def checkpoint_problem(path: Path, content: bool = True) -> str | None:
    """Why ``path`` cannot be trusted, or None. ``content=False`` skips the sha256 (size and zip
    only): for naming the last checkpoint in failed.json, where hashing gigabytes would delay exit.
    A sharded checkpoint (a directory) is checked the same way, over all its files."""
    path = Path(path)
    if not (path.is_file() or path.is_dir()):
        return "is missing"
    sidecar = read_sidecar(path)
    if sidecar is None:
        if not (readable_zip(path) if path.is_file() else sharded_complete(path)):
            return "is unreadable (partial or corrupt)"
        if content:
            log.warning("checkpoint %s has no %s sidecar (written before checkpoints were hashed): accepted because "
                        "its zip is readable", path, SIDECAR)
        return None
    size = _content_size(path)
    if size != sidecar.get("size", size):
        return f"is {size} bytes, its sidecar says {sidecar['size']} (partial write)"
    if content and _content_sha256(path) != sidecar["sha256"]:
        return "does not match its sha256 sidecar (corrupt: flipped bytes or an overwritten file)"
    return None


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint holds: from its sidecar, else ``step=N`` in its name, else -1."""
    sidecar = read_sidecar(path)
    if sidecar is not None and isinstance(sidecar.get("step"), int):
        return sidecar["step"]
    match = _STEP.search(Path(path).stem)
    return int(match.group(1)) if match else -1


def _newest_first(paths: list[Path]) -> list[Path]:
    steps = {p: checkpoint_step(p) for p in paths}
    known = max(steps.values(), default=-1)
    # An old-style last.ckpt (no sidecar, no step in its name) was written at or after the newest step file.
    order = {p: (known if s < 0 and p.name.startswith("last") else s, p.name.startswith("last")) for p, s in steps.items()}
    return sorted(paths, key=lambda p: order[p], reverse=True)


def find_checkpoint(directory: Path, content: bool = True) -> Path | None:
    """The newest trustworthy checkpoint in ``directory`` (by step), or None; each newer one that
    fails its check is skipped with a warning saying why."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    # files, and the directories FSDP writes for sharded checkpoints (same names)
    candidates = [p for p in directory.glob("*.ckpt") if (p.is_file() or p.is_dir()) and not p.name.startswith(".")]
    for candidate in _newest_first(candidates):
        problem = checkpoint_problem(candidate, content=content)
        if problem is None:
            return candidate
        if content:
            log.warning("resume: checkpoint %s %s; trying an older one", candidate, problem)
    return None


def discard_partial(path: Path) -> bool:
    """After a failed write: remove ``path`` (and its sidecar) unless it still checks out (the write
    failed before touching it). True when something was removed."""
    path = Path(path)
    if not path.exists() or checkpoint_problem(path, content=True) is None:
        return False
    log.warning("checkpoint %s was left incomplete by a failed write: removed", path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)
    return True


def save_verified(trainer, path: Path) -> Path:
    """``trainer.save_checkpoint(path)`` plus its sidecar; a failed write leaves no partial file."""
    path = Path(path)
    try:
        trainer.save_checkpoint(str(path))
        if trainer.is_global_zero:
            write_sidecar(path, trainer.global_step)
    except BaseException:
        if trainer.is_global_zero:
            discard_partial(path)
        raise
    return path
