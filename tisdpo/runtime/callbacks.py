"""Lightning callbacks of the pipeline: verified checkpoints (a sha256 sidecar beside each, see
``checkpoints.py``), the global RNG streams saved and restored for exact resume, and a checkpoint taken
when a signal stops training.

A Lightning checkpoint holds the weights, the optimiser, the LR schedule and the loop counters;
for a resumed run to end with the same parameters as an uninterrupted one it also needs the
global RNG streams (python, numpy, torch, CUDA): :class:`RNGStateCallback` saves them with the
checkpoint and restores them when training restarts; validation runs on a forked stream, so where
validation falls does not change training randomness (TI-DPO samples during validation).

:class:`SignalCheckpoint` works with Lightning's SIGTERM handling rather than against it: Lightning
only sets ``trainer.received_sigterm`` (and raises its SIGTERMException, a ``SystemExit`` with
status 0, at the end of the step); our handlers (``failures.handled_signals``, and SIGUSR1 composed
here during the fit) only note the signal. At the end of the step the callback saves a verified
checkpoint and raises ``failures.Interrupted``, which ``failures.run_recorded`` records.
"""
from __future__ import annotations

import logging
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from tisdpo.runtime.checkpoints import LAST, discard_partial, find_checkpoint, save_verified, sidecar_path, write_sidecar
from tisdpo.runtime.failures import Interrupted, fit_running, on_signal, pending_signal

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    # Plain python values and tensors only: Lightning loads checkpoints with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                                                     float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(Callback):
    """Global RNG states in the checkpoint, restored at the start of resumed training; validation
    runs on a forked stream so that it never shifts the training stream."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        # Saved mid-validation (a checkpoint callback on validation end) the stream to resume is
        # the one validation forked from.
        return {"rng": self._outside_validation or rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._outside_validation = rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._outside_validation is not None:
            set_rng_states(self._outside_validation)
            self._outside_validation = None


class SignalCheckpoint(Callback):
    """On SIGTERM, SIGINT or SIGUSR1 during a fit: finish the step, save ``<dirpath>/last.ckpt`` (with
    its sha256 sidecar), raise :class:`Interrupted`. A resume continues from exactly that step."""

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)
        self._usr1 = None
        self._handler = None
        self._active = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registers its handlers just before this hook (SLURM auto-requeue on SIGUSR1:
        # save an hpc checkpoint + `scontrol requeue`); ours runs after it, then training stops.
        self._active = True
        fit_running(True)
        previous = signal.getsignal(signal.SIGUSR1)
        self._handler = _compose(previous, on_signal)
        try:
            signal.signal(signal.SIGUSR1, self._handler)
            self._usr1 = previous
        except ValueError:  # not the main thread
            self._usr1 = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        name = pending_signal() or ("SIGTERM" if trainer.received_sigterm else None)
        if name is None:
            return
        saved = None
        if not _mid_accumulation(trainer):  # accumulated gradients are not in a checkpoint
            saved = str(save_verified(trainer, self.dirpath / LAST))
        raise Interrupted(name, checkpoint=saved)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop()

    def _stop(self) -> None:
        if not self._active:
            return
        self._active = False
        fit_running(False)
        # Lightning's teardown may already have put its own original back: only undo what is still ours.
        if self._usr1 is not None and signal.getsignal(signal.SIGUSR1) is self._handler:
            try:
                signal.signal(signal.SIGUSR1, self._usr1)
            except ValueError:
                pass
        self._usr1 = self._handler = None


def _compose(first, then):
    def handler(signum, frame):
        if callable(first) and first not in (signal.default_int_handler,):
            first(signum, frame)
        then(signum, frame)

    return handler


def _mid_accumulation(trainer) -> bool:
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    should = getattr(loop, "_should_accumulate", None)
    return bool(should()) if callable(should) else False


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
