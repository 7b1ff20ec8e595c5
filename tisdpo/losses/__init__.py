"""Preference losses: pure functions on per-token [B, T] tensors (see DESIGN "Loss contract").

    f(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
      reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
      rejected_weights=None, chosen_kl=None, rejected_kl=None, **hparams)
      -> (losses [B], chosen_rewards [B], rejected_rewards [B])

Which losses need the per-position KL, and in which direction, is answered by `kl_direction`
(the KL itself comes from `tisdpo.kernels.logprobs.per_position_kl`).
"""
from __future__ import annotations

import inspect
from typing import Optional

from .dpo import dpo_loss
from .ipo import ipo_loss
from .kto import kto_loss
from tisdpo.kernels.logprobs import per_position_kl, token_logps
from .tdpo import tdpo_loss
from .tidpo import tidpo_loss, triplet_loss
from .tisdpo import tisdpo_loss

LOSSES = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "kto": kto_loss,
    "tdpo": tdpo_loss,
    "tisdpo": tisdpo_loss,
    "tidpo": tidpo_loss,
}

# KL directions. "ref_policy": KL(π_ref‖π_θ) = per_position_kl(ref_logits, policy_logits) (TDPO).
# "policy_ref": KL(π_θ‖π_ref) = per_position_kl(policy_logits, ref_logits) (TIS-DPO η).
REF_POLICY = "ref_policy"
POLICY_REF = "policy_ref"

# loss name -> (KL direction, predicate on the hyperparameters saying whether it is needed)
NEEDS_KL = {
    "tdpo": (REF_POLICY, lambda hp: True),
    "tisdpo": (POLICY_REF, lambda hp: bool(hp["use_eta"])),
    "tidpo": (REF_POLICY, lambda hp: hp["base"] == "tdpo2"),
}


def kl_direction(name: str, **hparams) -> Optional[str]:
    """The KL direction loss `name` needs with these hyperparameters, or None if none.

    Unspecified hyperparameters take the loss function's own defaults, so
    kl_direction("tisdpo") == "policy_ref" and kl_direction("tisdpo", use_eta=False) is None.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    if name not in NEEDS_KL:
        return None
    defaults = {k: p.default for k, p in inspect.signature(LOSSES[name]).parameters.items()
                if p.default is not inspect.Parameter.empty}
    direction, needed = NEEDS_KL[name]
    return direction if needed({**defaults, **hparams}) else None


__all__ = [
    "LOSSES", "NEEDS_KL", "REF_POLICY", "POLICY_REF", "kl_direction",
    "dpo_loss", "ipo_loss", "kto_loss", "tdpo_loss", "tisdpo_loss", "tidpo_loss", "triplet_loss",
    "token_logps", "per_position_kl",
]
