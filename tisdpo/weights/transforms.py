"""Score -> token-weight transforms (DESIGN "Token weights", paper transform + released ones).

Each takes scores r ([T] or [B, T]; r_t = log π⁺(y_t|…) − log π⁻(y_t|…)), a mask of the same
shape (None = all valid) and the response side: sign=+1 for chosen, −1 for rejected. A chosen
token that π⁺ prefers (r > 0) and a rejected token that π⁻ prefers (r < 0) both weigh more.
Masked positions get weight 0: a padding token carries no weight, so summing w over a row
(or averaging over valid tokens) needs no extra masking; the losses multiply by the mask anyway.
"""
from __future__ import annotations

from typing import Optional

import torch


def _prepare(scores: torch.Tensor, mask: Optional[torch.Tensor], sign: int):
    """-> (scores [B, T] float, mask [B, T] bool, was_1d)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 (chosen) or -1 (rejected), got {sign!r}")
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must be [T] or [B, T], got {tuple(scores.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    if mask.shape != scores.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(scores.shape)} "
                         f"(the shape of scores)")
    was_1d = scores.dim() == 1
    if was_1d:
        scores, mask = scores[None], mask[None]
    return scores.float() if not scores.is_floating_point() else scores, mask.bool(), was_1d


def _finish(w: torch.Tensor, mask: torch.Tensor, was_1d: bool) -> torch.Tensor:
    w = w.masked_fill(~mask, 0.0)
    return w[0] if was_1d else w


def exp_clamp(scores, mask=None, *, sign: int, k: float = 1.0, mu: float = 1.0,
              lower: float = -0.5, upper: float = 0.5, rescale_mean_one: bool = False):
    """Paper transform: w_t = k · exp(sign · μ · clamp(r_t, L, U)).

    Order: the clamp is applied to the raw score r *before* multiplying by sign·μ. [L, U] then
    bounds the estimator's log-ratio itself, the same way for both sides (how much evidence any
    single token may contribute), and the weight range is [k e^{μL}, k e^{μU}] for chosen and
    [k e^{−μU}, k e^{−μL}] for rejected. With the symmetric default L = −U this equals
    clamping sign·μ·r to [μL, μU]. rescale_mean_one divides each response by its mean weight
    over valid tokens (so k cancels): w_t ← w_t / mean_{valid} w.
    """
    r, m, was_1d = _prepare(scores, mask, sign)
    w = k * torch.exp(sign * mu * r.clamp(lower, upper))
    if rescale_mean_one:
        mean = (w * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
        w = w / mean.clamp(min=torch.finfo(w.dtype).tiny)
    return _finish(w, m, was_1d)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of a 1-D tensor, ties get the average of the ranks they span."""
    less = (x[None, :] < x[:, None]).sum(1)
    less_equal = (x[None, :] <= x[:, None]).sum(1)
    return (less + less_equal - 1).to(x.dtype) / 2  # mean of ranks less .. less_equal-1


def rank_linear(scores, mask=None, *, sign: int, low: float = 0.7, high: float = 1.3):
    """Rank transform (authors' released code): rank sign·r per response, map to [low, high].

        w_t = low + (high − low) · rank_t / (n − 1),   rank_t ∈ {0..n−1} among the n valid tokens

    Ties get their average rank; a 1-token response gets (low + high)/2. The token with the
    largest sign·r gets `high`. Rank-based, so invariant to the scale of the scores.
    """
    r, m, was_1d = _prepare(scores, mask, sign)
    w = torch.zeros_like(r)
    for b in range(r.shape[0]):  # ranks are per response; a loop keeps memory at T² per row
        x = sign * r[b][m[b]]
        n = x.numel()
        if n == 1:
            w[b][m[b]] = (low + high) / 2
        elif n > 1:
            w[b][m[b]] = low + (high - low) * _average_ranks(x) / (n - 1)
    return _finish(w, m, was_1d)


def clamp_linear(scores, mask=None, *, sign: int, bound: float = 1.5, low: float = 0.7,
                 high: float = 1.3):
    """Threshold transform (authors' released code): clamp sign·r, then map linearly.

        x_t = clamp(sign · r_t, −bound, bound)
        w_t = low + (high − low) · (x_t + bound) / (2 · bound)

    so r = 0 gives (low + high)/2 and |r| ≥ bound saturates at low / high.
    """
    r, m, was_1d = _prepare(scores, mask, sign)
    x = (sign * r).clamp(-bound, bound)
    w = low + (high - low) * (x + bound) / (2 * bound)
    return _finish(w, m, was_1d)


TRANSFORMS = {"exp_clamp": exp_clamp, "rank_linear": rank_linear, "clamp_linear": clamp_linear}
