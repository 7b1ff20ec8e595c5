"""One way to fit a stage: a Lightning Trainer from the `trainer` config, checkpointed and resumable.

SFT, the estimator models (pi+/pi-) and preference training all go through :func:`fit_stage`, so
precision, devices and strategy are decided in one place. The caller seeds and builds the module
(seeding before the models are built keeps their random draws reproducible).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig

from tisdpo.pipeline.checkpoints import stage_checkpointing


def build_trainer(trainer_cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from the `trainer` group, with stage-specific overrides."""
    # Objects (loggers, callbacks) go in as call kwargs, not through the config tree.
    make_trainer = instantiate(trainer_cfg, _partial_=True, _convert_="all")
    return make_trainer(**overrides)


def fit_stage(trainer_cfg: DictConfig, module: L.LightningModule, train_loader, *, max_steps: int,
              val_loader=None, checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
              ckpt_path: str | None = None, callbacks: Sequence[Callback] = (), logger: Any = False,
              **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``module`` for ``max_steps`` steps; returns the trainer.

    ``checkpoint_dir`` (a pipeline stage's build dir): checkpoint there every ``checkpoint_every``
    steps and resume from what a killed earlier attempt left. ``ckpt_path``: resume from exactly
    that checkpoint (preference training, whose checkpointing the caller sets up). Without
    validation data, validation is off (stages)."""
    stage_callbacks, resume_from = stage_checkpointing(checkpoint_dir, checkpoint_every)
    callbacks = [*stage_callbacks, *callbacks]
    if val_loader is None:
        trainer_kwargs.setdefault("limit_val_batches", 0)
        trainer_kwargs.setdefault("enable_model_summary", False)
    trainer = build_trainer(
        trainer_cfg, max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **trainer_kwargs,
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path or resume_from)
    return trainer
