"""Experiment logger from the `logger` config group; W&B never blocks on the network."""
from __future__ import annotations

import logging
import os
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_offline_by_default(requested: bool | None) -> bool:
    """Offline unless an API key is present or the user asked for online explicitly."""
    if requested is not None:
        return bool(requested)
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "run"):
        return False
    return not os.environ.get("WANDB_API_KEY")


def build_logger(cfg: DictConfig, config_dict: dict[str, Any]):
    """The Lightning logger, or False for ``logger=none``."""
    node = cfg.logger
    target = node.get("_target_")
    if not target:
        return False
    if target.endswith("WandbLogger"):
        node = OmegaConf.merge(node, {"offline": wandb_offline_by_default(node.get("offline"))})
        os.makedirs(node.save_dir, exist_ok=True)
        logger = instantiate(node, _partial_=True)(config=config_dict)
        log.info("W&B logging %s to %s", "offline" if node.offline else "online", node.save_dir)
        return logger
    return instantiate(node)
