"""Which checkpoint a run or a stage resumes from, and the stage checkpointing callbacks.

Preference training checkpoints into ``<run dir>/checkpoints/`` (``last.ckpt`` + ``...step=N.ckpt``).
Pipeline stages (SFT, estimator models) checkpoint into their artifact's stable build dir
(``cache.py``): a killed build resumes there on the next request.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tisdpo.pipeline.callbacks import RNGStateCallback
from tisdpo.pipeline.run_dir import parse_resume

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def readable_checkpoint(path: Path) -> bool:
    """A complete torch.save file (a zip archive with its central directory): a truncated or
    half-written file fails this without loading the tensors."""
    try:
        if path.stat().st_size == 0:
            return False
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _step_of(path: Path) -> int:
    for part in path.stem.split("-"):
        if part.startswith("step="):
            try:
                return int(part.split("=", 1)[1].split("_")[0])
            except ValueError:
                return -1
    return -1


def find_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from in ``directory``: ``last.ckpt``, or else the newest readable
    ``...step=N.ckpt``; an unreadable file is skipped with a warning."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [directory / LAST] if (directory / LAST).is_file() else []
    candidates += sorted((p for p in directory.glob("*.ckpt") if p.name != LAST), key=_step_of, reverse=True)
    for candidate in candidates:
        if readable_checkpoint(candidate):
            return candidate
        log.warning("resume: checkpoint %s is unreadable (partial or corrupt); trying an older one", candidate)
    return None


def train_checkpoint(cfg, output_dir: Path) -> str | None:
    """The checkpoint the preference training stage resumes from, if any."""
    resume = parse_resume(cfg.get("resume"))
    if not resume.requested:
        return None
    if resume.checkpoint is not None and resume.checkpoint.is_file():  # resume=<a checkpoint file>: exactly that one
        log.info("resuming training from %s", resume.checkpoint)
        return str(resume.checkpoint)
    found = find_checkpoint(output_dir / CHECKPOINT_DIR)
    if found is None:
        if resume.run_dir is None:
            log.warning("resume=true, but %s holds no checkpoint: starting from scratch (Hydra makes a new dir per "
                        "run: pass hydra.run.dir=<the previous run dir>, or resume=<the previous run dir>)",
                        output_dir / CHECKPOINT_DIR)
        else:
            log.warning("resume=%s: the run has no readable checkpoint yet: training starts from scratch", output_dir)
        return None
    log.info("resuming training from %s", found)
    return str(found)


def stage_every_n_steps(cfg) -> int:
    """How often a pipeline stage (SFT, estimator models) checkpoints: ``checkpoint.stage_every_n_steps``
    (default: ``checkpoint.every_n_steps``); 0 turns stage checkpoints off."""
    node = cfg.get("checkpoint") or {}
    value = node.get("stage_every_n_steps")
    return int(value if value is not None else node.get("every_n_steps") or 0)


def stage_checkpointing(work_dir: Path | None, every_n_steps: int) -> tuple[list[Callback], str | None]:
    """Callbacks that checkpoint a stage's training into ``work_dir`` every N steps, and the
    checkpoint to resume from (None: start). ``work_dir=None`` or N <= 0: no checkpoints."""
    if work_dir is None or every_n_steps <= 0:
        return [], None
    work_dir = Path(work_dir)
    resume_from = find_checkpoint(work_dir)
    if resume_from is not None:
        log.info("stage: resuming an interrupted training from %s", resume_from)
    checkpoint = ModelCheckpoint(dirpath=work_dir, every_n_train_steps=every_n_steps, save_last=True, save_top_k=1,
                                 enable_version_counter=False)
    return [checkpoint, RNGStateCallback()], str(resume_from) if resume_from else None
