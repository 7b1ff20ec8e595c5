"""IPO (Azar et al. 2023): squared loss on the log-ratio margin."""
from __future__ import annotations

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.record import LossRecord


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
             rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
             average_log_prob: bool = False):
    """IPO loss per pair.

        L = (S(y_w) − S(y_l) − 1/(2β))²

    With `average_log_prob`, each S is divided by its response's token count (the IPO paper's
    per-token normalisation, as in TRL); the default uses sums like the other losses.
    Weights and KL terms are accepted and ignored.
    Returns (losses [B], β S(y_w) [B], β S(y_l) [B]), rewards detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm)
    if average_log_prob:
        # clamp: an empty response contributes 0 rather than NaN
        chosen = chosen / cm.sum(-1).clamp(min=1)
        rejected = rejected / rm.sum(-1).clamp(min=1)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    # IPO's target margin is 1/(2 beta): beta must be positive
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    checks.flag(cfg, "loss.average_log_prob")


RECORD = LossRecord(fn=ipo_loss, check=check_hparams)
