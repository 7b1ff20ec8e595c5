"""Shared helpers for the preference losses: input validation and masked sums.

Every loss takes per-token tensors of shape [B, T] holding response positions only
(position t = log p(y_t | x, y_<t)); chosen and rejected may have different T.
Notation used in all docstrings:
    Δ_t  = policy_logps_t − reference_logps_t
    S(y) = Σ_t mask_t Δ_t                 (sequence log-ratio)
    S^w(y) = Σ_t mask_t w_t Δ_t           (weighted sequence log-ratio)
    K(y) = Σ_t mask_t KL_t                (summed per-position KL)

Rewards convention: each loss returns detached per-response "rewards" whose difference
chosen − rejected is the argument of the sigmoid (so reward accuracy = share of pairs the loss
already ranks correctly). For DPO that is β·S; for TDPO and TIS-DPO the KL terms are folded in.
IPO and KTO have no such sigmoid argument and report β·S, as TRL and HALOs do.
"""
from __future__ import annotations

from typing import Optional

import torch


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_same_shape(name: str, first: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """`first` must be [B, T]; every non-None tensor in `others` must have its shape.

    Errors name the offending argument, so a caller sees which input is wrong.
    """
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise ValueError(f"{name} must be a [B, T] tensor, got {_shape(first)}")
    for other, t in others.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != first.shape):
            raise ValueError(f"{other} has shape {_shape(t)}, expected {_shape(first)} "
                             f"(the shape of {name})")


def check_pair(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, chosen_mask, rejected_mask, chosen_weights=None,
               rejected_weights=None, chosen_kl=None, rejected_kl=None):
    """Validate the full loss contract; return (chosen_mask, rejected_mask) as float tensors."""
    check_same_shape("policy_chosen_logps", policy_chosen_logps,
                     reference_chosen_logps=reference_chosen_logps, chosen_mask=chosen_mask,
                     chosen_weights=chosen_weights, chosen_kl=chosen_kl)
    check_same_shape("policy_rejected_logps", policy_rejected_logps,
                     reference_rejected_logps=reference_rejected_logps,
                     rejected_mask=rejected_mask, rejected_weights=rejected_weights,
                     rejected_kl=rejected_kl)
    if policy_chosen_logps.shape[0] != policy_rejected_logps.shape[0]:
        raise ValueError(f"policy_rejected_logps has batch size {policy_rejected_logps.shape[0]}, "
                         f"expected {policy_chosen_logps.shape[0]} (that of policy_chosen_logps)")
    dtype = policy_chosen_logps.dtype
    return chosen_mask.to(dtype), rejected_mask.to(dtype)


def require(name: str, t: Optional[torch.Tensor], why: str) -> torch.Tensor:
    """Raise a clear error when an optional contract input is needed but missing."""
    if t is None:
        raise ValueError(f"{name} is required {why}")
    return t


def masked_sum(values: torch.Tensor, mask: torch.Tensor,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_t mask_t (w_t) values_t over the last dim -> [B]."""
    x = values * mask
    if weights is not None:
        x = x * weights
    return x.sum(-1)
