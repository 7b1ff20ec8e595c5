"""TI-DPO (arXiv 2505.19653): token-importance-weighted DPO plus a triplet term."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum, require
from tisdpo import checks
from tisdpo.losses.record import OFFLINE, ONLINE, REF_POLICY, LossRecord
from tisdpo.losses.tidpo_triplet import build_triplet, triplet_loss  # noqa: F401 (triplet_loss: the term's pure function)


def tidpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
               rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
               base: str = "dpo", alpha: float = 0.5):
    """TI-DPO preference term per pair (the γ·L_triplet term is added by the caller).

        base="dpo":   L = −logσ(β (S^w_w − S^w_l)),       S^w(y) = Σ_t mask_t w_t Δ_t
        base="tdpo2": L = −logσ(β (S^w_w − S^w_l − α (K_l − sg(K_w)))),
                      K(y) = Σ_t mask_t KL(π_ref‖π_θ)_t  (unweighted, as TDPO)

    Weights (default 1) are the TI-DPO importance weights (gradient attribution mixed with the
    Gaussian prior, mean 1 per response; tisdpo.weights.prior.mix_importance). They are
    computed from the policy but used as constants, so pass them detached. base="tdpo2" follows
    the authors' code (TDPO2 with weighted margins). Rewards: β S^w (β(S^w + αK) for tdpo2).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm, chosen_weights)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm, rejected_weights)
    if base == "dpo":
        margin = chosen - rejected
    elif base == "tdpo2":
        why = "for tidpo_loss with base='tdpo2': per-position KL(π_ref‖π_θ), [B, T]"
        chosen_k = masked_sum(require("chosen_kl", chosen_kl, why), cm)
        rejected_k = masked_sum(require("rejected_kl", rejected_kl, why), rm)
        margin = chosen - rejected - alpha * (rejected_k - chosen_k.detach())
        chosen, rejected = chosen + alpha * chosen_k, rejected + alpha * rejected_k
    else:
        raise ValueError(f"base must be 'dpo' or 'tdpo2', got {base!r}")
    losses = -F.logsigmoid(beta * margin)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    checks.in_range(cfg, "loss.alpha", low=0, note="the weight of the KL term")
    checks.one_of(cfg, "loss.base", ("dpo", "tdpo2"))
    checks.in_range(cfg, "loss.triplet.gamma", low=0, note="the weight of the triplet term; 0 turns it off")
    checks.in_range(cfg, "loss.triplet.margin", low=0)
    checks.in_range(cfg, "loss.triplet.anchor_every", low=1, integer=True)
    checks.in_range(cfg, "loss.triplet.max_new_tokens", low=1, integer=True)
    checks.in_range(cfg, "loss.triplet.top_k", low=0, integer=True, note="0: no top-k filter")
    checks.in_range(cfg, "loss.triplet.top_p", low=0, high=1, low_open=True)
    checks.in_range(cfg, "loss.triplet.temperature", low=0, low_open=True, note="anchors are sampled")


# The released code's base is TDPO2 (KL(π_ref‖π_θ) in the margin); weights online (gradient
# attribution) or, for the uniform/random ablations, offline; the triplet term samples anchors.
RECORD = LossRecord(
    fn=tidpo_loss, kl=lambda hp: REF_POLICY if hp.get("base", "dpo") == "tdpo2" else None,
    token_weights=frozenset({ONLINE, OFFLINE}), weights_required=True,
    auxiliary=build_triplet, config_keys=("triplet",), check=check_hparams,
)
