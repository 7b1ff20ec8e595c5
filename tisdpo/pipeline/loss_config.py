"""`loss` config node -> LossSpec (the pure loss with its hyperparameters bound)."""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tisdpo.losses import LOSSES, kl_direction
from tisdpo.modules.kto_reference import mismatched_kl_logps
from tisdpo.modules.preference import LossSpec

# Keys of a loss config that describe the run rather than the loss function's arguments.
META_KEYS = ("name", "triplet")
WEIGHTED_LOSSES = ("tisdpo", "tidpo")


def loss_hparams(loss_cfg: DictConfig) -> dict:
    node = OmegaConf.to_container(loss_cfg, resolve=True)
    return {k: v for k, v in node.items() if k not in META_KEYS and not k.startswith("_")}


def build_loss_spec(loss_cfg: DictConfig) -> LossSpec:
    name = loss_cfg.name
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not one of {sorted(LOSSES)}")
    node = OmegaConf.to_container(loss_cfg, resolve=True)
    for key in META_KEYS:
        node.pop(key, None)
    fn = instantiate(node)  # a functools.partial with the hyperparameters bound
    return LossSpec(
        name=name, fn=fn, kl_direction=kl_direction(name, **loss_hparams(loss_cfg)),
        uses_weights=name in WEIGHTED_LOSSES,
        extra_inputs=mismatched_kl_logps if name == "kto" else None,
    )
