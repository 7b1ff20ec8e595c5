"""SePO (Yang et al., arXiv 2408.13518, EMNLP 2025): train only the key tokens a DPO oracle picks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_pair, require
from tisdpo import checks
from tisdpo.losses.record import OFFLINE, LossRecord


def top_fraction_mask(weights: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per row, the k = max(1, ⌊fraction · n⌋) valid tokens of largest weight (n = valid tokens;
    none for an empty row). Ties: the earlier token first (a stable sort, as the released
    ``get_topK``'s repeated argmax)."""
    valid = mask.bool()
    counts = valid.sum(-1).tolist()
    k = torch.tensor([max(1, int(fraction * n)) if n else 0 for n in counts], device=weights.device)
    order = torch.sort(weights.detach().masked_fill(~valid, float("-inf")), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order).contiguous())
    return (ranks < k[:, None]) & valid


def sepo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
              reference_rejected_logps, chosen_mask, rejected_mask, *, chosen_weights=None,
              rejected_weights=None, chosen_kl=None, rejected_kl=None, beta: float = 1.0,
              gamma: float = 0.0, chosen_fraction: float = 0.3, rejected_fraction: float = 0.3):
    """SePO loss per pair (reference-free, on the selected key tokens).

        K(y_w) = top ⌊k_w·n⌋ tokens of y_w by weight,   K(y_l) = top ⌊k_l·n⌋ tokens of y_l by weight
        a(y)   = Σ_{t∈K(y)} log π_θ(y_t | x, y_<t) / |K(y)|
        L      = −logσ(β (a(y_w) − a(y_l)) − γ)

    The weights carry the oracle's token rewards oriented per side (``estimator.transform``:
    chosen ranks sign·r with sign +1, rejected with −1), so "largest weight" is SePO's top-k% of
    the chosen response and bottom-k% of the rejected one; only their order matters here.
    The released objective (utils_selective.py ``SelectiveRRHFLoss``) is β = 1, γ = 0. At least one
    token per non-empty response is kept (the release drops responses under 8 tokens instead).
    Without weights (the validation batches, which carry none) every valid token counts.
    Reference log-probs and KL terms are ignored. Returns (losses [B], β a(y_w), β a(y_l)), detached.
    """
    cm, rm = check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                        reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights,
                        rejected_weights, chosen_kl, rejected_kl)
    dtype = policy_chosen_logps.dtype
    if chosen_weights is None and rejected_weights is None:  # validation batches carry no weights: every token
        chosen_sel, rejected_sel = cm, rm
    else:
        why = "for sepo_loss with the other side's weights given: the token scores that select the key tokens, [B, T]"
        chosen_sel = top_fraction_mask(require("chosen_weights", chosen_weights, why), cm, chosen_fraction).to(dtype)
        rejected_sel = top_fraction_mask(require("rejected_weights", rejected_weights, why), rm,
                                         rejected_fraction).to(dtype)
    chosen = (policy_chosen_logps * chosen_sel).sum(-1) / chosen_sel.sum(-1).clamp(min=1)
    rejected = (policy_rejected_logps * rejected_sel).sum(-1) / rejected_sel.sum(-1).clamp(min=1)
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, low_open=True, note="the scale of the average log-likelihood reward")
    checks.in_range(cfg, "loss.gamma", low=0, note="the target reward margin")
    for side in ("chosen", "rejected"):
        checks.in_range(cfg, f"loss.{side}_fraction", low=0, high=1, low_open=True,
                        note="the share of each response's tokens that is trained")


RECORD = LossRecord(fn=sepo_loss, reference_free=True, token_weights=frozenset({OFFLINE}), weights_required=True,
                    check=check_hparams)
