"""OTPO (Li et al., arXiv 2505.18720): DPO on optimal-transport-weighted token sums."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.record import OFFLINE, ONLINE, LossRecord


def otpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
              reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
              rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1):
    """OTPO loss per pair: DPO whose sequence log-ratios are weighted token sums.

        L = −logσ(β (Σ_t mask_t w^w_t Δ^w_t − Σ_t mask_t w^l_t Δ^l_t))

    The weights are OTPO's (``estimator=otpo``): the marginals of an unbalanced optimal-transport
    plan between the chosen and the rejected response's last-layer hidden states, computed from
    the current policy each step and used as constants for both the policy and the reference
    sums (the released ``get_batch_logps2`` multiplies both by the same weights). Each side's
    weights sum to min(|y_w|, |y_l|). Weights default to 1 (then this is DPO). KL terms ignored.
    Returns (losses [B], β S^w(y_w) [B], β S^w(y_l) [B]), rewards detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm, chosen_weights)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm, rejected_weights)
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")


# Weights: OTPO's online transport weights (estimator=otpo), or any offline estimator's.
RECORD = LossRecord(fn=otpo_loss, token_weights=frozenset({ONLINE, OFFLINE}), weights_required=True,
                    check=check_hparams)
