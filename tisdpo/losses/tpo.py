"""TPO, Triple Preference Optimization (Saeidi et al. 2024, arXiv 2405.16681): reference-free
preference term plus behavioural cloning on a gold response, the TPO that TI-DPO compares against."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.record import LossRecord


def tpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
             rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.01,
             alpha: float = 1.0, length_normalized: bool = False, gamma: float = 0.0,
             gold_logps=None, gold_mask=None):
    """TPO loss per pair.

        s(y)   = Σ_t mask_t log π_θ(y_t | x, y_<t)       (TPO-L, length_normalized: s(y)/|y|)
        L_pref = −logσ(β s(y_w) − β s(y_l) − γ)          (γ = 0 for TPO; TPO-L's reward margin)
        L_BC   = −Σ_t mask_t log π_θ(g_t | x, g_<t) / |g| (negative log-likelihood of the gold response g)
        L      = L_pref + α L_BC

    The release averages the NLL over all gold tokens of the batch; here over each gold response
    (the batch mean of L then weighs responses equally; the same when lengths are equal).

    Our pair datasets carry two responses, so without ``gold_logps``/``gold_mask`` the gold response
    is the chosen one (the best-rated response of the pair; ``experiments/FIDELITY.md``). No
    reference: reference log-probs, token weights and KL terms are accepted and ignored.
    Returns (losses [B], β s(y_w) [B], β s(y_l) [B]), rewards detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen, rejected = masked_sum(policy_chosen_logps, cm), masked_sum(policy_rejected_logps, rm)
    if length_normalized:  # clamp: an empty response contributes 0 rather than NaN
        chosen, rejected = chosen / cm.sum(-1).clamp(min=1), rejected / rm.sum(-1).clamp(min=1)
    if gold_logps is None:
        gold_logps, gold_mask = policy_chosen_logps, cm
    gm = gold_mask.to(gold_logps.dtype)
    behaviour_cloning = -masked_sum(gold_logps, gm) / gm.sum(-1).clamp(min=1)
    losses = -F.logsigmoid(beta * chosen - beta * rejected - gamma) + alpha * behaviour_cloning
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the scale of the log-likelihood reward")
    checks.in_range(cfg, "loss.alpha", low=0, note="the weight of the gold response's behaviour cloning")
    checks.in_range(cfg, "loss.gamma", low=0, note="TPO-L's reward margin")
    checks.flag(cfg, "loss.length_normalized")


RECORD = LossRecord(fn=tpo_loss, reference_free=True, check=check_hparams)
