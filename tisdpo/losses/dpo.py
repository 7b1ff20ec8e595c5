"""DPO (Rafailov et al. 2023) and conservative DPO (cDPO, label smoothing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.record import LossRecord


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
             rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
             label_smoothing: float = 0.0):
    """DPO / cDPO loss per pair.

        h = β (S(y_w) − S(y_l)),   S(y) = Σ_t mask_t (π_θ − π_ref log-probs)_t
        L = −(1 − ε) logσ(h) − ε logσ(−h)          (ε = label_smoothing; ε=0 is DPO)

    cDPO treats the label as flipped with probability ε. Token weights and KL terms are
    accepted (one signature for all losses) and ignored.
    Returns (losses [B], chosen_rewards = β S(y_w) [B], rejected_rewards = β S(y_l) [B]).
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm)
    h = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    checks.in_range(cfg, "loss.label_smoothing", low=0, high=0.5, high_open=True,
                    note="the assumed share of flipped labels; 0.5 would learn nothing")


RECORD = LossRecord(fn=dpo_loss, check=check_hparams)
