"""SimPO (Meng et al., NeurIPS 2024, arXiv 2405.14734): reference-free, length-normalised margin."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.record import LossRecord


def simpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
               rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 2.0,
               gamma: float = 1.0):
    """SimPO loss per pair.

        r(y) = β/|y| Σ_t mask_t log π_θ(y_t | x, y_<t)      (average log-likelihood, no reference)
        L    = −logσ(r(y_w) − r(y_l) − γ)                   (γ: the target reward margin)

    The authors' code writes γ as ``gamma_beta_ratio`` = γ/β: −logσ(β (avg_w − avg_l − γ/β)), the
    same value. Reference log-probs, token weights and KL terms are accepted (one signature for all
    losses) and ignored. Returns (losses [B], r(y_w) [B], r(y_l) [B]), rewards detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    # clamp: an empty response contributes 0 rather than NaN
    chosen = beta * masked_sum(policy_chosen_logps, cm) / cm.sum(-1).clamp(min=1)
    rejected = beta * masked_sum(policy_rejected_logps, rm) / rm.sum(-1).clamp(min=1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses, chosen.detach(), rejected.detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the scale of the average log-likelihood reward")
    checks.in_range(cfg, "loss.gamma", low=0, note="the target reward margin")


RECORD = LossRecord(fn=simpo_loss, reference_free=True, check=check_hparams)
