"""One way to fit a stage: a Lightning Trainer from the `trainer` config, checkpointed and resumable.

SFT, the estimator models (pi+/pi-) and preference training all go through :func:`fit_stage`, so
precision, devices and strategy are decided in one place. The caller seeds and builds the module
(seeding before the models are built keeps their random draws reproducible).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from tisdpo.models.sharding import full_state_dict, is_sharded
from tisdpo.runtime.callbacks import stage_checkpointing
from tisdpo.runtime.sharded import is_fsdp, is_fsdp_strategy


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes that share one optimiser step: devices per node x nodes (devices 'auto'/-1: every
    visible GPU, or 1 on a CPU-only host)."""
    devices = trainer_cfg.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        accelerator = str(trainer_cfg.get("accelerator", "cpu"))
        devices = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif not isinstance(devices, (int, str)):
        devices = len(devices)
    return max(1, int(devices)) * max(1, int(trainer_cfg.get("num_nodes", 1) or 1))


def accumulation(batch_size: int, grad_accum: int, global_batch_size: int | None, world: int) -> int:
    """Micro-batches per optimiser step. With ``global_batch_size`` (the papers' batch, whatever
    the device count) it is derived: global = batch_size x world x accumulation; else ``grad_accum``."""
    if not global_batch_size:
        return int(grad_accum)
    per_step = int(batch_size) * world
    if int(global_batch_size) % per_step:
        raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of batch_size={batch_size} x "
                         f"{world} device(s): choose a batch size that divides it")
    return int(global_batch_size) // per_step


def optimizer_steps(max_steps: int | None, epochs: float | None, n_examples: int, batch_size: int, world: int,
                    accumulate: int) -> int:
    """Optimiser steps to train for: ``max_steps`` when given, else ``epochs`` passes over the
    ``n_examples`` pairs (the released code trains one epoch); at least 1."""
    if max_steps:
        return int(max_steps)
    if not epochs:
        raise ValueError("train.max_steps or train.epochs must be set")
    batches_per_epoch = n_examples // (batch_size * world) or 1  # the loader drops the last partial batch
    return max(1, int(float(epochs) * batches_per_epoch) // accumulate)


def _wrap_classes(model) -> set[type]:
    """The classes of ``model._no_split_modules`` (its decoder layers): FSDP's wrap unit."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules: give "
                         "trainer.strategy.auto_wrap_policy explicitly for FSDP")
    return classes


def _strategy(strategy_cfg: Any, model, activation_checkpointing: bool):
    """The strategy object; FSDP's wrap unit (and activation checkpointing) taken from the model."""
    if not is_fsdp_strategy(strategy_cfg):
        return instantiate(strategy_cfg, _convert_="all") if isinstance(strategy_cfg, DictConfig) else strategy_cfg
    extra: dict[str, Any] = {}
    if model is not None and strategy_cfg.get("auto_wrap_policy") is None:
        extra["auto_wrap_policy"] = ModuleWrapPolicy(_wrap_classes(model))
    if model is not None and activation_checkpointing and strategy_cfg.get("activation_checkpointing_policy") is None:
        extra["activation_checkpointing_policy"] = ModuleWrapPolicy(_wrap_classes(model))
    return instantiate(strategy_cfg, _convert_="all", **extra)


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: works with frozen inputs, LoRA and no_grad references)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def build_trainer(trainer_cfg: DictConfig, model=None, activation_checkpointing: bool = False,
                  **overrides: Any) -> L.Trainer:
    """A Lightning Trainer from the `trainer` group, with stage-specific overrides. ``model`` (the
    trainable network) lets a sharded strategy find its wrap unit."""
    strategy = trainer_cfg.get("strategy")
    # Objects (loggers, callbacks, the strategy) go in as call kwargs, not through the config tree.
    node = OmegaConf.masked_copy(trainer_cfg, [k for k in trainer_cfg if k != "strategy"])
    make_trainer = instantiate(node, _partial_=True, _convert_="all")
    if strategy is not None:
        overrides.setdefault("strategy", _strategy(strategy, model, activation_checkpointing))
    return make_trainer(**overrides)


def fit_stage(trainer_cfg: DictConfig, module: L.LightningModule, train_loader, *, max_steps: int,
              val_loader=None, checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
              ckpt_path: str | None = None, callbacks: Sequence[Callback] = (), logger: Any = False,
              model=None, gradient_checkpointing: bool = False, **trainer_kwargs: Any) -> L.Trainer:
    """Fit ``module`` for ``max_steps`` steps; returns the trainer.

    ``checkpoint_dir`` (a pipeline stage's build dir): checkpoint there every ``checkpoint_every``
    steps and resume from what a killed earlier attempt left. ``ckpt_path``: resume from exactly
    that checkpoint (preference training, whose checkpointing the caller sets up). Without
    validation data, validation is off (stages). ``gradient_checkpointing`` (``train.gradient_checkpointing``,
    for every stage that trains ``model``): activations recomputed in backward, through the strategy's
    own activation checkpointing of its wrap unit under FSDP, through the model's elsewhere."""
    stage_callbacks, resume_from = stage_checkpointing(checkpoint_dir, checkpoint_every)
    if checkpoint_dir is not None:
        # Lightning's own files (an `hpc_ckpt_*.ckpt` saved on SLURM's requeue signal, which it loads
        # by itself when no ckpt_path is given) stay with this stage, never in the working directory
        # where another stage's trainer would pick them up.
        trainer_kwargs.setdefault("default_root_dir", str(checkpoint_dir))
    callbacks = [*stage_callbacks, *callbacks]
    if val_loader is None:
        trainer_kwargs.setdefault("limit_val_batches", 0)
        trainer_kwargs.setdefault("enable_model_summary", False)
    sharded = is_fsdp(trainer_cfg)
    if gradient_checkpointing and model is not None and not sharded:
        enable_gradient_checkpointing(model)
    trainer = build_trainer(
        trainer_cfg, model=model, activation_checkpointing=gradient_checkpointing and sharded,
        max_steps=max_steps, logger=logger, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **trainer_kwargs,
    )
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path or resume_from)
    return trainer


def trained_state_dict(trainer: L.Trainer, model) -> dict | None:
    """The whole weights of ``model``, a submodule of the LightningModule ``trainer`` just fitted.
    Under FSDP this gathers the shards and is collective: every rank must call it; rank 0 gets the
    tensors, the other ranks None."""
    name = next(n for n, child in trainer.lightning_module.named_children() if child is model)
    return full_state_dict(trainer.strategy.model, prefix=f"{name}.")


def save_trained(trainer: L.Trainer, model, out: Path) -> bool:
    """Write ``model``, just trained by ``trainer``, to ``out`` as a Hugging Face directory from
    rank 0; returns whether this process wrote it. Under FSDP every rank must call it: the full
    weights are gathered from the shards."""
    state = trained_state_dict(trainer, model) if is_sharded(model) else None
    if trainer.global_rank != 0:
        return False
    model.save_pretrained(out, state_dict=state)  # state None: the model's own (whole) weights
    return True
