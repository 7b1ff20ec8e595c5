"""ConfPO (Yoon et al., ICML 2025): SimPO on the policy's low-confidence tokens only, no extra model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_pair
from tisdpo import checks
from tisdpo.losses.record import LossRecord


def confident_token_mask(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The tokens ConfPO trains: those whose probability is below the response's mean probability,

        sel_t = mask_t · [log π_θ(y_t) < log( Σ_s mask_s π_θ(y_s) / Σ_s mask_s )]

    (strictly below; a constant mask: no gradient flows through the selection)."""
    valid = mask.bool()
    probs = logps.detach().exp() * mask
    threshold = (probs.sum(-1) / mask.sum(-1).clamp(min=1)).log()
    return (logps.detach() < threshold[:, None]) & valid


def confpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
                rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 1.5,
                gamma: float = 1.6):
    """ConfPO loss per pair (its SimPO form, the authors' released default).

        sel(y)  = the tokens of y whose π_θ(y_t) is below the mean probability over y (confident_token_mask)
        a(y)    = Σ_t sel_t log π_θ(y_t | x, y_<t) / Σ_t sel_t                   (mean over the selected tokens)
        L       = −logσ(β (a(y_w) − a(y_l)) − γ),   0 when either side selects no token

    The selection uses the current policy's own per-token probabilities (no reference, no extra
    model) and is a constant of the step. A pair where a side has no selected token contributes
    0 to the batch mean, as the released code (it still counts in the mean). Reference
    log-probs, token weights and KL terms are accepted (one signature for all losses) and ignored.
    Returns (losses [B], β a(y_w) [B], β a(y_l) [B]), rewards detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    dtype = policy_chosen_logps.dtype
    chosen_sel = confident_token_mask(policy_chosen_logps, cm).to(dtype)
    rejected_sel = confident_token_mask(policy_rejected_logps, rm).to(dtype)
    chosen_n, rejected_n = chosen_sel.sum(-1), rejected_sel.sum(-1)
    chosen = (policy_chosen_logps * chosen_sel).sum(-1) / chosen_n.clamp(min=1)
    rejected = (policy_rejected_logps * rejected_sel).sum(-1) / rejected_n.clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    losses = losses * ((chosen_n > 0) & (rejected_n > 0)).to(dtype)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the scale of the average log-likelihood reward")
    checks.in_range(cfg, "loss.gamma", low=0, note="the target reward margin")


RECORD = LossRecord(fn=confpo_loss, reference_free=True, check=check_hparams)
