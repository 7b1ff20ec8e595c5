"""Preference training stage: policy initialised from the SFT model against a frozen copy of it."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from tisdpo.pipeline.loss_config import build_loss_spec
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.pipeline.loaders import build_trainer, preference_loader

log = logging.getLogger(__name__)


def load_initial_policy(cfg: DictConfig, sft_dir: Path | None, tokenizer):
    if sft_dir is not None:
        return build_model(name_or_path=str(sft_dir), dtype=cfg.model.get("dtype"))
    from tisdpo.pipeline.sft_stage import base_model

    return base_model(cfg, tokenizer)


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


def train_stage(
    cfg: DictConfig,
    *,
    policy,
    reference,
    train_examples: list[dict],
    val_examples: list[dict],
    tokenizer,
    logger,
    output_dir: Path,
    online_weights=None,
    auxiliary_loss=None,
    callbacks: list | None = None,
) -> tuple[PreferenceModule, dict[str, float]]:
    """Fit the preference module; returns it and the final validation metrics (val/...)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    spec = build_loss_spec(cfg.loss)
    max_steps = int(cfg.train.max_steps)
    module = PreferenceModule(
        policy, reference, spec, cfg.optim, total_steps=max_steps,
        logits_chunk_size=int(cfg.train.logits_chunk_size), check_finite=bool(cfg.train.check_finite),
        online_weights=online_weights, auxiliary_loss=auxiliary_loss, pad_token_id=tokenizer.pad_token_id,
    )
    train_loader = preference_loader(
        train_examples, tokenizer, int(cfg.train.batch_size), shuffle=True, seed=cfg.seed,
        num_workers=int(cfg.train.num_workers), pad_to_multiple_of=cfg.train.get("pad_to_multiple_of"),
    )
    val_loader = preference_loader(val_examples, tokenizer, int(cfg.train.eval_batch_size), shuffle=False, seed=cfg.seed)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", every_n_train_steps=int(cfg.checkpoint.every_n_steps),
        save_last=True, save_top_k=-1 if cfg.checkpoint.get("keep_all") else 1, save_weights_only=False,
    )
    val_every = int(cfg.train.val_every_n_steps)
    trainer = build_trainer(
        cfg.trainer, max_steps=max_steps, logger=logger, callbacks=[checkpoint, *(callbacks or [])],
        val_check_interval=min(val_every, max_steps) if val_every > 0 else None,
        check_val_every_n_epoch=None, limit_val_batches=1.0 if val_every > 0 else 0,
        accumulate_grad_batches=int(cfg.train.grad_accum),
        # no_grad instead of inference_mode in validation: TI-DPO's attribution needs enable_grad there.
        inference_mode=False,
    )
    ckpt_path = resume_checkpoint(cfg, output_dir)
    trainer.fit(module, train_loader, val_loader if val_every > 0 else None, ckpt_path=ckpt_path)
    final = trainer.validate(module, val_loader, verbose=False)
    return module, metrics_to_floats(final[0] if final else {})


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """`resume=true` continues from <run dir>/checkpoints/last.ckpt; `resume=<path>` from a run dir or file."""
    resume = cfg.get("resume")
    if not resume:
        return None
    candidate = output_dir if resume is True else Path(str(resume))
    if candidate.is_dir():
        candidate = candidate / "checkpoints" / "last.ckpt"
    if not candidate.is_file():
        if resume is True:
            log.info("resume=true but no checkpoint at %s yet: starting from scratch", candidate)
            return None
        raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {candidate}")
    log.info("resuming from %s", candidate)
    return str(candidate)
