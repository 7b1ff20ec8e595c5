"""Optimiser + warm-up schedule shared by the SFT and preference modules."""
from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy


def warmup_lambda(warmup_steps: int, schedule: str = "constant", total_steps: int | None = None):
    """Linear warm-up over ``warmup_steps`` (as eric-mitchell/direct-preference-optimization),
    then constant, linear decay to 0, or cosine decay to 0 over ``total_steps``."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"optim.schedule={schedule!r} is not one of constant, linear, cosine")
    if schedule != "constant" and not total_steps:
        raise ValueError(f"optim.schedule={schedule!r} needs a known number of training steps")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def configure_optimizer(params, optim_cfg: Any, total_steps: int | None):
    """Lightning's ``configure_optimizers`` return value from an ``optim`` config node."""
    optimizer = instantiate(optim_cfg.optimizer)(params)
    factor = warmup_lambda(int(optim_cfg.warmup_steps), str(optim_cfg.schedule), total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ShardedNormClipping:
    """Gradient-norm clipping that also works under FSDP.

    Lightning's FSDP precision plugin refuses ``gradient_clip_algorithm='norm'``: with sharded
    parameters the norm must be reduced across ranks, which ``torch.nn.utils.clip_grad_norm_``
    does not do. FSDP's root module has its own ``clip_grad_norm_`` that does; under FSDP this
    mixin calls it, elsewhere it leaves clipping to Lightning.
    """

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        strategy = self.trainer.strategy
        root = getattr(strategy, "model", None)
        # isinstance: subclasses of FSDPStrategy (a cluster plugin's, the CPU test strategy) clip the same way
        sharded = isinstance(strategy, FSDPStrategy) and hasattr(root, "clip_grad_norm_")
        if sharded and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            root.clip_grad_norm_(float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def last_checkpoint_note(trainer) -> str:
    """What a non-finite loss or gradient leaves to resume from, as it is: the newest checkpoint the
    run's checkpoint callback wrote before this step, or that none was written."""
    callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    path = (getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")) if callback else ""
    if path:
        return f"the newest checkpoint, written before this step, is {path} (resume=true continues from it)"
    return "no checkpoint was written before this step (checkpoint.every_n_steps), so nothing can be resumed"
