"""Which checkpoint a run or a stage resumes from, and the checkpointing callbacks.

Preference training checkpoints into ``<run dir>/checkpoints/`` (``last.ckpt`` + ``...step=N.ckpt``).
Pipeline stages (SFT, estimator models) checkpoint into their artifact's stable build dir
(``cache.py``): a killed build resumes there on the next request. Every checkpoint is written by
:class:`VerifiedCheckpoint` (or :func:`checkpoint_files.save_verified`): a ``.sha256`` sidecar
beside it, checked before a resume trusts it (``checkpoint_files.py``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tisdpo.pipeline.callbacks import RNGStateCallback, SignalCheckpoint
from tisdpo.pipeline.checkpoint_files import (CHECKPOINT_DIR, LAST, checkpoint_problem, discard_partial,
                                              find_checkpoint, readable_zip, sidecar_path, write_sidecar)
from tisdpo.pipeline.run_dir import parse_resume
from tisdpo.pipeline.validate import ConfigError

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "LAST", "VerifiedCheckpoint", "find_checkpoint", "readable_checkpoint",
           "stage_checkpointing", "stage_every_n_steps", "train_checkpoint"]

readable_checkpoint = readable_zip  # the old name: a complete zip, whatever its content


class VerifiedCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a sha256 sidecar written once each checkpoint is complete;
    a write that fails (a full disk) leaves no partial file behind. No version counter: a run dir
    moved or resumed keeps writing ``last.ckpt`` (a ``last-v1.ckpt`` beside a stale ``last.ckpt``
    made the stale one win the next resume)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
            if trainer.is_global_zero:
                write_sidecar(Path(filepath), trainer.global_step)
        except BaseException:
            if trainer.is_global_zero:
                discard_partial(Path(filepath))
            raise

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            sidecar_path(Path(filepath)).unlink(missing_ok=True)


def train_checkpoint(cfg, output_dir: Path) -> str | None:
    """The checkpoint the preference training stage resumes from, if any."""
    resume = parse_resume(cfg.get("resume"))
    if not resume.requested:
        return None
    if resume.checkpoint is not None and resume.checkpoint.exists():  # resume=<a checkpoint (file or sharded dir)>: exactly that one
        problem = checkpoint_problem(resume.checkpoint)
        if problem is not None:  # the user named this file: no silent fallback to another one
            raise ConfigError(f"resume={resume.checkpoint}: the checkpoint {problem}; pass resume=<its run dir> to "
                              "continue from the newest intact checkpoint")
        log.info("resuming training from %s", resume.checkpoint)
        return str(resume.checkpoint)
    found = find_checkpoint(output_dir / CHECKPOINT_DIR)
    if found is None:
        if resume.run_dir is None:
            log.warning("resume=true, but %s holds no checkpoint: starting from scratch (Hydra makes a new dir per "
                        "run: pass hydra.run.dir=<the previous run dir>, or resume=<the previous run dir>)",
                        output_dir / CHECKPOINT_DIR)
        else:
            log.warning("resume=%s: the run has no intact checkpoint: training starts from scratch", output_dir)
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
    checkpoint = VerifiedCheckpoint(dirpath=work_dir, every_n_train_steps=every_n_steps, save_last=True, save_top_k=1)
    # A signal mid-stage: checkpoint where the stage is, then stop (the next request resumes the build).
    return [checkpoint, RNGStateCallback(), SignalCheckpoint(work_dir)], str(resume_from) if resume_from else None
