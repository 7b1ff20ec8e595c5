"""A loss config node -> the bound loss: its function with the hyperparameters set, and what its
record (``record.py``) asks for those values. Loss names are the ``conf/loss`` files
(``tisdpo.registry``); nothing here lists them."""
from __future__ import annotations

from typing import Any, Mapping

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tisdpo.losses.record import BoundLoss, LossRecord
from tisdpo.registry import loss_record


def loss_hparams(loss_cfg: DictConfig, record: LossRecord | None = None) -> dict[str, Any]:
    """The node's arguments of the loss function (not `name`, `_target_`, nor the record's config keys)."""
    record = record or loss_record(loss_cfg)
    node = OmegaConf.to_container(loss_cfg, resolve=True)
    return {k: v for k, v in node.items() if k != "name" and k not in record.config_keys and not k.startswith("_")}


def kl_direction(loss_cfg: DictConfig) -> str | None:
    """Which per-position KL this configured loss needs (None, REF_POLICY or POLICY_REF)."""
    record = loss_record(loss_cfg)
    return record.kl(loss_hparams(loss_cfg, record))


def bind_loss(loss_cfg: DictConfig, tokenizer=None, chunk_size: int = 256) -> BoundLoss:
    """The pure loss with its hyperparameters bound, and what its record asks for these values."""
    record = loss_record(loss_cfg)
    hparams = loss_hparams(loss_cfg, record)
    fn = instantiate({"_target_": loss_cfg._target_, "_partial_": True, **hparams})
    node: Mapping[str, Any] = OmegaConf.to_container(loss_cfg, resolve=True)
    auxiliary = record.auxiliary(node, tokenizer, chunk_size) if record.auxiliary is not None else None
    return BoundLoss(name=str(loss_cfg.name), fn=fn, record=record, kl_direction=record.kl(hparams), auxiliary=auxiliary)
