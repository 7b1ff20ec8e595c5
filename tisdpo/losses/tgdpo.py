"""TGDPO (Zhu et al., ICML 2025, arXiv 2506.14574): DPO with a per-token β set by token-level rewards."""
from __future__ import annotations

import torch.nn.functional as F

from ._common import check_pair, masked_sum
from tisdpo import checks
from tisdpo.losses.record import OFFLINE, LossRecord


def tgdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
               rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
               alpha: float = 0.5):
    """TGDPO loss per pair (the released ``pref_loss: sigmoid`` branch).

        β^w_t = β (1 + αβ g^w_t),   β^l_t = β (1 + αβ g^l_t)
        L     = −logσ( Σ_t mask_t β^w_t Δ^w_t − Σ_t mask_t β^l_t Δ^l_t )

    g is the token reward *oriented* like every weight here (larger = the token deserves more
    push): g^w_t = r̂(y^w_t), g^l_t = −r̂(y^l_t), where r̂_t is the token-level reward; in the
    authors' code r̂_t = log π_rm(y_t) − log π_ref(y_t) of a DPO-trained token reward model, so
    β^w_t = β(1 + αβ r̂^w_t) and β^l_t = β(1 − αβ r̂^l_t), their formula. The weights this loss
    receives ARE g (the estimator's scores through an identity transform, ``method=tgdpo``), not
    multipliers; g = 0 (or no weights) is DPO. The factors are not clipped (as released): a
    token with αβ g < −1 gets a negative β_t. Rewards: the weighted sums, so chosen − rejected is
    the argument of the sigmoid. Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen_factor = 1 + alpha * beta * chosen_weights if chosen_weights is not None else None
    rejected_factor = 1 + alpha * beta * rejected_weights if rejected_weights is not None else None
    chosen = beta * masked_sum(policy_chosen_logps - reference_chosen_logps, cm, chosen_factor)
    rejected = beta * masked_sum(policy_rejected_logps - reference_rejected_logps, rm, rejected_factor)
    losses = -F.logsigmoid(chosen - rejected)
    return losses, chosen.detach(), rejected.detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    checks.in_range(cfg, "loss.alpha", low=0, note="the strength of the token-reward guidance; 0 is DPO")


# Token rewards: offline scores of any estimator, passed through unchanged (method=tgdpo*).
RECORD = LossRecord(fn=tgdpo_loss, token_weights=frozenset({OFFLINE}), weights_required=True, check=check_hparams)
