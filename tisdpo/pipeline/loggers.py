"""Experiment logger from the `logger` config group; W&B never blocks on the network."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
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


def finish_logging(logger, output_dir: Path, results: dict[str, Any]) -> None:
    """At the end of a run: the token-weight page and histogram into W&B (as HTML and image), when W&B
    is the logger; then the W&B run is closed."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb  # optional at import time: only a W&B run gets here

    files = {}
    if (output_dir / "token_weights.html").is_file():
        files["weights/token_view"] = wandb.Html((output_dir / "token_weights.html").read_text())
    if (output_dir / "weights_hist.png").is_file():
        files["weights/histogram"] = wandb.Image(str(output_dir / "weights_hist.png"))
    if files:
        logger.experiment.log(files)
    logger.experiment.finish()
