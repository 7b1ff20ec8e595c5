"""`loss` config node -> LossSpec (the pure loss with its hyperparameters bound)."""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tisdpo.losses import LOSSES, kl_direction
from tisdpo.modules.kto_reference import mismatched_kl_logps
from tisdpo.modules.preference import LossSpec
from tisdpo.modules.triplet import build_triplet

# Keys of a loss config that describe the run rather than the loss function's arguments.
META_KEYS = ("name", "triplet")
WEIGHTED_LOSSES = ("tisdpo", "tidpo")


def loss_hparams(loss_cfg: DictConfig) -> dict:
    node = OmegaConf.to_container(loss_cfg, resolve=True)
    return {k: v for k, v in node.items() if k not in META_KEYS and not k.startswith("_")}


def build_loss_spec(loss_cfg: DictConfig, tokenizer=None, chunk_size: int = 256) -> LossSpec:
    """The pure loss with its hyperparameters bound, plus what it needs beyond the log-probs:
    KTO's mismatched-pair reference point, TI-DPO's triplet term (which samples anchors, so it
    needs the ``tokenizer``)."""
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
        auxiliary=_triplet(loss_cfg, tokenizer, chunk_size),
    )


def _triplet(loss_cfg: DictConfig, tokenizer, chunk_size: int):
    """TI-DPO's triplet term, or None without one (no ``loss.triplet``, or gamma = 0: the
    "w/o triplet loss" ablation, which then needs no reference model beyond cached log-probs)."""
    if loss_cfg.get("triplet") is None or float(loss_cfg.triplet.gamma) == 0:
        return None
    if tokenizer is None:
        raise ValueError(f"loss={loss_cfg.name} has a triplet term, which samples anchors: build_loss_spec needs the tokenizer")
    return build_triplet(loss_cfg.triplet, tokenizer, chunk_size)
