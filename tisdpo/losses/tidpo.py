"""TI-DPO (arXiv 2505.19653): token-importance-weighted DPO plus a triplet term."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_pair, check_same_shape, masked_sum, require


def tidpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
               rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 0.1,
               base: str = "dpo", alpha: float = 0.5):
    """TI-DPO preference term per pair (the γ·L_triplet term is added by the caller).

        base="dpo":   L = −logσ(β (S^w_w − S^w_l)),       S^w(y) = Σ_t mask_t w_t Δ_t
        base="tdpo2": L = −logσ(β (S^w_w − S^w_l − α (K_l − sg(K_w)))),
                      K(y) = Σ_t mask_t KL(π_ref‖π_θ)_t  (unweighted, as TDPO)

    Weights (default 1) are the TI-DPO importance weights (gradient attribution mixed with the
    Gaussian prior, mean 1 per response; tisdpo.weights.prior.mix_importance). They are
    computed from the policy but used as constants, so pass them detached. base="tdpo2" follows
    the authors' code (TDPO2 with weighted margins). Rewards: β S^w (β(S^w + αK) for tdpo2).
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]).
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    chosen = masked_sum(policy_chosen_logps - reference_chosen_logps, cm, chosen_weights)
    rejected = masked_sum(policy_rejected_logps - reference_rejected_logps, rm, rejected_weights)
    if base == "dpo":
        margin = chosen - rejected
    elif base == "tdpo2":
        why = "for tidpo_loss with base='tdpo2': per-position KL(π_ref‖π_θ), [B, T]"
        chosen_k = masked_sum(require("chosen_kl", chosen_kl, why), cm)
        rejected_k = masked_sum(require("rejected_kl", rejected_kl, why), rm)
        margin = chosen - rejected - alpha * (rejected_k - chosen_k.detach())
        chosen, rejected = chosen + alpha * chosen_k, rejected + alpha * rejected_k
    else:
        raise ValueError(f"base must be 'dpo' or 'tdpo2', got {base!r}")
    losses = -F.logsigmoid(beta * margin)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def _left_align(x: torch.Tensor, mask: torch.Tensor):
    """Move each row's valid entries to the front (order kept), zeros after; also return counts.

    Makes "response position t" well defined whatever the padding layout of the caller.
    """
    m = mask.bool()
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
    return (x * m).gather(1, order), m.sum(1)


def _distance(rho_a, n_a, rho_b, n_b):
    """d(a, b) = Σ_{t < min(n_a, n_b)} (ρ_t(a) − ρ_t(b))²  -> [B]."""
    length = min(rho_a.shape[1], rho_b.shape[1])
    t = torch.arange(length, device=rho_a.device)
    common = t[None, :] < torch.minimum(n_a, n_b)[:, None]
    diff = rho_a[:, :length] - rho_b[:, :length]
    return (diff.square() * common).sum(-1)


def triplet_loss(anchor_policy_logps, anchor_reference_logps, anchor_mask,
                 chosen_policy_logps, chosen_reference_logps, chosen_mask,
                 rejected_policy_logps, rejected_reference_logps, rejected_mask, *,
                 margin: float = 0.1, reduction: str = "mean"):
    """TI-DPO triplet term.

        ρ_t(y)   = log π_θ(y_t|x,y_<t) − log π_ref(y_t|x,y_<t)          (per-token implicit reward)
        d(a, b)  = Σ_{t < min(|a|, |b|)} (ρ_t(a) − ρ_t(b))²             (positions present in both)
        L        = mean_i max(0, d(y, y_w) − d(y, y_l) + margin)

    y is the anchor sampled from the current policy, y_w / y_l the chosen / rejected responses.
    Position t is the t-th *valid* token of each response (found from the masks), so any
    padding layout works; the three inputs may have different T. Gradients flow through all
    three sequences. reduction="none" returns the per-example hinge [B].
    """
    check_same_shape("anchor_policy_logps", anchor_policy_logps,
                     anchor_reference_logps=anchor_reference_logps, anchor_mask=anchor_mask)
    check_same_shape("chosen_policy_logps", chosen_policy_logps,
                     chosen_reference_logps=chosen_reference_logps, chosen_mask=chosen_mask)
    check_same_shape("rejected_policy_logps", rejected_policy_logps,
                     rejected_reference_logps=rejected_reference_logps,
                     rejected_mask=rejected_mask)
    b = anchor_policy_logps.shape[0]
    for name, t in (("chosen_policy_logps", chosen_policy_logps),
                    ("rejected_policy_logps", rejected_policy_logps)):
        if t.shape[0] != b:
            raise ValueError(f"{name} has batch size {t.shape[0]}, expected {b} "
                             f"(that of anchor_policy_logps)")
    rho_a, n_a = _left_align(anchor_policy_logps - anchor_reference_logps, anchor_mask)
    rho_w, n_w = _left_align(chosen_policy_logps - chosen_reference_logps, chosen_mask)
    rho_l, n_l = _left_align(rejected_policy_logps - rejected_reference_logps, rejected_mask)
    hinge = F.relu(_distance(rho_a, n_a, rho_w, n_w) - _distance(rho_a, n_a, rho_l, n_l) + margin)
    if reduction == "mean":
        return hinge.mean()
    if reduction == "none":
        return hinge
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
