"""KTO (Ethayarajh et al. 2024) on paired data: y_w is desirable, y_l undesirable."""
from __future__ import annotations

from typing import Optional

import torch

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.kto_reference import mismatched_kl_logps
from tisdpo.losses.record import LossRecord


def kto_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
             rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             kl_logps: Optional[torch.Tensor] = None):
    """Paired KTO loss.

        r_w = S(y_w),  r_l = S(y_l)
        z   = sg(max(0, mean_j kl_logps_j))
        L   = ½ [ λ_D (1 − σ(β (r_w − z))) + λ_U (1 − σ(β (z − r_l))) ]

    The ½ makes the batch mean of L equal the mean over the 2B concatenated desirable and
    undesirable losses, i.e. the scale of TRL and HALOs (λ_D = desirable_weight,
    λ_U = undesirable_weight).

    Reference point z. KTO defines z as the KL(π_θ‖π_ref) of the policy, estimated in the batch
    on *mismatched* pairs (x_i, y_j), i≠j:
        kl_logps_i = Σ_t (log π_θ − log π_ref)(y_j,t | x_i, y_j,<t),
    typically with j = i+1 mod B (TRL and HALOs shift completions by one). That needs an extra
    forward pass of both models on the mismatched sequences, which the caller does and passes
    as `kl_logps` ([B] or any 1-D tensor).

    Fallback when `kl_logps` is None: z = sg(max(0, mean of the 2B matched log-ratio sums
    S(y_w), S(y_l))). Shifting these matched sums by one position in the batch, as a literal
    port of the mismatched construction would do, changes nothing: their batch mean is the same
    whichever row they sit in. So the fallback is an honest "matched-pair" estimate, biased
    towards the log-ratios the loss itself pushes (upwards for y_w, downwards for y_l); use
    kl_logps for the paper's estimator. z is detached either way (as in the paper), so it only
    shifts the operating point of the sigmoids. Token weights and KL terms are ignored.

    Returns (losses [B], β r_w [B], β r_l [B]), rewards detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm)
    if kl_logps is not None:
        if not isinstance(kl_logps, torch.Tensor) or kl_logps.dim() != 1 or kl_logps.numel() == 0:
            raise ValueError(f"kl_logps must be a non-empty 1-D tensor of mismatched-pair "
                             f"log-ratio sums, got {getattr(kl_logps, 'shape', type(kl_logps))}")
        z = kl_logps.detach().mean()
    else:
        z = torch.cat([chosen, rejected]).detach().mean()
    z = z.clamp(min=0).to(chosen.dtype)
    # 1 − σ(x) written as σ(−x): same value, no cancellation when σ(x) ≈ 1
    chosen_losses = desirable_weight * torch.sigmoid(-beta * (chosen - z))
    rejected_losses = undesirable_weight * torch.sigmoid(-beta * (z - rejected))
    losses = 0.5 * (chosen_losses + rejected_losses)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    for option in ("desirable_weight", "undesirable_weight"):
        checks.in_range(cfg, f"loss.{option}", low=0, low_open=True)


# The reference point z: both models on mismatched in-batch pairs, every step (kto_reference.py).
RECORD = LossRecord(fn=kto_loss, extra_inputs=mismatched_kl_logps, check=check_hparams)
