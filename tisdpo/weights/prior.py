"""TI-DPO position prior and weight mixing; uniform / random baseline weights.

Positions are counted over *valid* tokens (t = 0 for a response's first valid token), so the
prior is the same whatever the padding layout of the [B, T] mask.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def _mask_from_lengths(lengths, max_len: Optional[int]) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    t = int(lengths.max()) if max_len is None and lengths.numel() else (max_len or 0)
    return torch.arange(t)[None, :] < lengths[:, None]


def gaussian_prior(lengths_or_mask: Union[torch.Tensor, Sequence[int]],
                   max_len: Optional[int] = None) -> torch.Tensor:
    """Gaussian position prior over each response, normalised to sum 1 over valid positions.

        P(t) ∝ exp(−½ ((t − μ)/σ)²),   μ = (T − 1)/2,  σ = T/4,   t = 0..T−1

    T = that response's number of valid tokens. Input: a [B, T] mask (bool or 0/1), or a 1-D
    sequence of lengths (then the output is [B, max_len or max length], right-padded).
    Returns [B, T] float32, zero at invalid positions (an empty response is all zero).
    """
    if isinstance(lengths_or_mask, torch.Tensor) and lengths_or_mask.dim() == 2:
        mask = lengths_or_mask.bool()
    else:
        mask = _mask_from_lengths(lengths_or_mask, max_len)
    n = mask.sum(-1, keepdim=True).float()  # T per response
    t = mask.cumsum(-1).float() - 1  # index among valid tokens
    mu, sigma = (n - 1) / 2, (n / 4).clamp(min=1e-6)
    p = torch.exp(-0.5 * ((t - mu) / sigma) ** 2).masked_fill(~mask, 0.0)
    return p / p.sum(-1, keepdim=True).clamp(min=1e-30)


def mix_importance(importance: torch.Tensor, mask: torch.Tensor, lam: float = 0.7) -> torch.Tensor:
    """TI-DPO token weights: importance mixed with the Gaussian prior, mean 1 per response.

        I_t = importance_t / Σ_valid importance        (uniform 1/T if that sum is 0 or not finite)
        W_t = T · (λ I_t + (1 − λ) P_t),              P = gaussian_prior(mask)

    so each row's mean weight over its T valid tokens is 1 (λ=1: T·I, λ=0: T·P). Importance is
    expected ≥ 0 (gradient L1 norms). Returns [B, T] float32, 0 at invalid positions; detached
    (weights are constants in the loss).
    """
    if importance.shape != mask.shape or importance.dim() != 2:
        raise ValueError(f"importance has shape {tuple(importance.shape)}, mask "
                         f"{tuple(mask.shape)}: both must be the same [B, T]")
    m = mask.bool()
    imp = importance.detach().float().masked_fill(~m, 0.0)
    total = imp.sum(-1, keepdim=True)
    n = m.sum(-1, keepdim=True).float()
    ok = torch.isfinite(total) & (total > 0)
    # guard: a row with no usable importance falls back to uniform instead of NaN
    i = torch.where(ok, imp / total.where(ok, torch.ones_like(total)), m / n.clamp(min=1))
    w = n * (lam * i + (1 - lam) * gaussian_prior(m))
    return w.masked_fill(~m, 0.0)


def uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """w_t = 1 at valid positions, 0 elsewhere ("equal weight" ablation)."""
    return mask.float()


def random_weights(mask: torch.Tensor, generator: Optional[torch.Generator] = None,
                   low: float = 0.7, high: float = 1.3) -> torch.Tensor:
    """w_t ~ U(low, high) i.i.d. at valid positions, 0 elsewhere ("random weight" ablation)."""
    u = torch.rand(mask.shape, generator=generator, device=mask.device)
    return (low + (high - low) * u) * mask.float()
