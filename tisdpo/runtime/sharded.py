"""FSDP around the trainer: the reference's placement, and FSDP on the CPU (the test path).

Reference placement (``train.reference_placement``). Lightning's FSDPStrategy shards the
LightningModule it is given: the policy. The frozen reference is deliberately not a registered
submodule (it must stay out of the optimiser and the checkpoints), so left alone every GPU
would hold a full copy of it (14 GB for a 7B model in bf16). ``shard`` (the default under FSDP:
``auto``) wraps it in its own FSDP root with the strategy's wrap unit, sharding and mixed
precision, so each rank holds 1/N of it and gathers one layer at a time in its forward, like the
policy's; ``replicate`` keeps the full copy on every device (faster when it fits: no all-gathers),
and says so in the log.

``RootKeepingFSDPStrategy`` (trainer=fsdp): Lightning's, plus validation after fitting the same
module (see its docstring).

``CPUFSDPStrategy``: Lightning refuses FSDPStrategy on the CPU, and its wrapper passes no
device to torch's FSDP, which then looks for an accelerator. FSDP itself runs on the CPU with
gloo when told the device, so this subclass does exactly that; ``trainer=fsdp_cpu`` runs the
whole pipeline sharded over two CPU processes, the way ``trainer=ddp_cpu`` does for DDP.
"""
from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing
from omegaconf import DictConfig
from torch.distributed.fsdp import FullyShardedDataParallel

log = logging.getLogger(__name__)

PLACEMENTS = ("auto", "shard", "replicate")


class RootKeepingFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, able to validate after fitting the same module (trainer=fsdp).

    ``trainer.validate`` after ``trainer.fit`` sets the strategy up again; Lightning then finds
    the module's decoder layers already wrapped, takes it for a user-wrapped model and leaves the
    root unwrapped, so the root's own parameters (embeddings, final norm, LM head) stay shards and
    the forward fails. This strategy keeps the root it made and hands it back for the same module."""

    def _setup_model(self, model):
        root = getattr(self, "_root", None)
        if root is not None and root.module is model:
            return root
        self._root = self._wrap(model)
        return self._root

    def _wrap(self, model):
        return super()._setup_model(model)


class CPUFSDPStrategy(RootKeepingFSDPStrategy):
    """FSDP on CPU processes (gloo): torch's FSDP told its device is the CPU (trainer=fsdp_cpu)."""

    def _wrap(self, model):
        model = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def shards_reference(placement: str, sharded_trainer: bool) -> bool:
    """Whether the reference gets its own FSDP root (``auto``: exactly when the policy is sharded)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"train.reference_placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement == "shard" and not sharded_trainer:
        raise ValueError("train.reference_placement=shard needs an FSDP trainer (trainer=fsdp); "
                         "use auto or replicate")
    return placement == "shard" or (placement == "auto" and sharded_trainer)


class ShardedReference(Callback):
    """Wrap ``pl_module.reference`` in its own FSDP root at setup, with the strategy's wrap unit,
    sharding strategy and mixed precision (the process group exists by then; the policy is
    wrapped right after). Gradients never reach it: it runs under no_grad."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        reference = getattr(pl_module, "reference", None)
        strategy = trainer.strategy
        if reference is None or isinstance(reference, FullyShardedDataParallel):
            return
        if not isinstance(strategy, FSDPStrategy):
            raise TypeError(f"ShardedReference needs an FSDP strategy, got {type(strategy).__name__}")
        reference.requires_grad_(False)
        kwargs = {k: v for k, v in strategy.kwargs.items() if k in ("auto_wrap_policy", "use_orig_params")}
        device = strategy.root_device
        wrapped = FullyShardedDataParallel(
            reference, sharding_strategy=strategy.sharding_strategy, mixed_precision=strategy.mixed_precision_config,
            device_id=device if device.type == "cpu" else device.index, **kwargs,
        )
        object.__setattr__(pl_module, "reference", wrapped)
        log.info("reference: sharded over %d processes (train.reference_placement)", trainer.world_size)


def is_fsdp_strategy(strategy) -> bool:
    """Whether a ``trainer.strategy`` node targets an FSDPStrategy (Lightning's or a subclass here)."""
    return isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("FSDPStrategy")


def is_fsdp(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer config shards the model."""
    return is_fsdp_strategy(trainer_cfg.get("strategy"))


def reference_placement(cfg: DictConfig, reference) -> list[Callback]:
    """The callbacks that place the frozen ``reference`` of a fit under ``cfg.trainer``
    (``train.reference_placement``): [ShardedReference()] to shard it, [] otherwise."""
    sharded = is_fsdp(cfg.trainer)
    shard = shards_reference(str(cfg.train.get("reference_placement") or "auto"), sharded)
    # None: cached log-probs, no reference model in training; LoRA: a view of the policy, no copy
    if not isinstance(reference, torch.nn.Module):
        return []
    if shard:
        return [ShardedReference()]
    if sharded:
        gib = sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**30
        log.warning("train.reference_placement=replicate: a full copy of the reference (%.2f GiB) on every device", gib)
    return []


__all__ = ["is_fsdp", "is_fsdp_strategy", "reference_placement", "CPUFSDPStrategy", "RootKeepingFSDPStrategy", "PLACEMENTS", "ShardedReference", "shards_reference"]
