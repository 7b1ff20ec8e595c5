"""TDPO (Zeng et al., ICML 2024, arXiv 2404.11999): DPO with a sequential forward-KL term."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum, require
from tisdpo import checks
from tisdpo.losses.record import REF_POLICY, LossRecord


def tdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
              reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
              rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
              alpha: float = 0.5, variant: str = "tdpo2"):
    """TDPO1 / TDPO2 loss per pair.

        KL_t = KL(π_ref(·|ctx_t) ‖ π_θ(·|ctx_t))   (chosen_kl / rejected_kl, [B, T];
               = per_position_kl(ref_logits, policy_logits) from tisdpo.kernels.logprobs)
        K(y) = Σ_t mask_t KL_t
        TDPO1: L = −logσ(β (S_w − S_l − (K_l − K_w)))
        TDPO2: L = −logσ(β (S_w − S_l − α (K_l − sg(K_w))))      sg = stop-gradient

    TDPO2 stops the gradient through the chosen KL so that the loss cannot lower the margin by
    inflating K_w; α balances the KL term (the paper's default 0.5). Weights are ignored.
    Rewards: β(S + K) for TDPO1 (as the authors' code) and β(S + αK) for TDPO2, so that
    chosen − rejected is the sigmoid argument. Returns (losses [B], rewards [B], rewards [B]).
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    why = "for tdpo_loss: per-position KL(π_ref‖π_θ), [B, T]"
    chosen_k = masked_sum(require("chosen_kl", chosen_kl, why), cm)
    rejected_k = masked_sum(require("rejected_kl", rejected_kl, why), rm)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm)
    if variant == "tdpo1":
        a, margin = 1.0, chosen - rejected - (rejected_k - chosen_k)
    elif variant == "tdpo2":
        a, margin = alpha, chosen - rejected - alpha * (rejected_k - chosen_k.detach())
    else:
        raise ValueError(f"variant must be 'tdpo1' or 'tdpo2', got {variant!r}")
    losses = -F.logsigmoid(beta * margin)
    return (losses, (beta * (chosen + a * chosen_k)).detach(),
            (beta * (rejected + a * rejected_k)).detach())


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    checks.in_range(cfg, "loss.alpha", low=0, note="the weight of the KL term")
    checks.one_of(cfg, "loss.variant", ("tdpo1", "tdpo2"))


# TDPO's margin always holds the sequential KL(π_ref‖π_θ)
RECORD = LossRecord(fn=tdpo_loss, kl=lambda hp: REF_POLICY, check=check_hparams)
