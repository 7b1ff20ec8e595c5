"""TIS-DPO (Liu et al., ICLR 2025, arXiv 2410.04350): importance-weighted token-level DPO."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum, require
from tisdpo import checks
from tisdpo.losses.record import OFFLINE, POLICY_REF, LossRecord


def tisdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
                rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
                alpha: float = 0.5, use_eta: bool = True):
    """TIS-DPO loss per pair.

        u = β (Σ_t w^w_t Δ^w_t − Σ_t w^l_t Δ^l_t)
        η = αβ (Σ_t w^w_t KL'^w_t − Σ_t w^l_t KL'^l_t),   KL'_t = KL(π_θ(·|ctx_t) ‖ π_ref(·|ctx_t))
        L = −logσ(u − η)              (use_eta=False drops η: the "w/o η" ablation)

    All sums run over valid (mask=1) positions. Weights default to 1, and with unit weights and
    use_eta=False this is exactly DPO. KL' is the *reverse* direction of TDPO's:
    per_position_kl(policy_logits, ref_logits); η penalises the chosen side for drifting from
    the reference (larger weighted KL on y_w → larger loss). The paper writes α=1; the authors'
    code uses α=0.5 (our default). Weights are constants here (estimated offline); pass them
    detached. Rewards: β(S^w − αK'^w) per side (β S^w without η), so chosen − rejected = u − η.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm, chosen_weights)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm, rejected_weights)
    if use_eta:
        why = "for tisdpo_loss with use_eta=True: per-position KL(π_θ‖π_ref), [B, T]"
        chosen = chosen - alpha * masked_sum(require("chosen_kl", chosen_kl, why), cm,
                                             chosen_weights)
        rejected = rejected - alpha * masked_sum(require("rejected_kl", rejected_kl, why), rm,
                                                 rejected_weights)
    # u − η = β[(S^w_w − αK'_w) − (S^w_l − αK'_l)]
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    checks.in_range(cfg, "loss.alpha", low=0, note="the weight of the KL term")
    checks.flag(cfg, "loss.use_eta")


# η needs KL(π_θ‖π_ref) per position; "w/o η" needs none. Weights: offline scores (the estimators).
RECORD = LossRecord(
    fn=tisdpo_loss, kl=lambda hp: POLICY_REF if hp.get("use_eta", True) else None,
    token_weights=frozenset({OFFLINE}), weights_required=True, check=check_hparams,
)
