"""Score -> token-weight transforms (DESIGN "Token weights", paper transform + released ones).

Each takes scores r ([T] or [B, T]; r_t = log π⁺(y_t|…) − log π⁻(y_t|…)), a mask of the same
shape (None = all valid) and the response side: sign=+1 for chosen, −1 for rejected. A chosen
token that π⁺ prefers (r > 0) and a rejected token that π⁻ prefers (r < 0) both weigh more.
Masked positions get weight 0: a padding token carries no weight, so summing w over a row
(or averaging over valid tokens) needs no extra masking; the losses multiply by the mask anyway.

Default (conf/estimator/_transform.yaml): rank_linear in [0.7, 1.3], the transform of the
authors' released code (README step 3, ``transform.method=rank_based``); exp_clamp is the
paper's formula (which publishes no L, U and saturates at k = μ = 1, ±0.5); signed_linear (a
deviation, off by default) lets weights go below 0. ``at_bound`` says
which tokens sit at a transform's bound (the ``weights/bound_fraction`` diagnostic).
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


def _ordinal_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of a 1-D tensor, ties broken by position (the earlier token ranks lower):
    what the released code's ``sorted(range(n), key=lambda k: nums[k])`` (a stable sort) gives."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(x.numel(), device=x.device)
    return ranks.to(x.dtype)


RANK_TIES = {"ordinal": _ordinal_ranks, "average": _average_ranks}


def rank_linear(scores, mask=None, *, sign: int, low: float = 0.7, high: float = 1.3,
                ties: str = "ordinal"):
    """Rank transform (the authors' released code, ``rank_based_transform``): rank sign·r within
    each response, map the ranks linearly onto [low, high].

        w_t = low + (high − low) · rank_t / (n − 1),   rank_t ∈ {0..n−1} among the n valid tokens

    The token with the largest sign·r gets `high`, the smallest `low`; the ranks are evenly spaced,
    so the mean weight of every response is exactly (low + high)/2 (= 1 for [0.7, 1.3]) whatever
    the scores: no rescaling of β, the two sides stay symmetric. Invariant to the scale of the
    scores. A 1-token response gets (low + high)/2. ``ties``: "ordinal" (released code: a stable
    sort, the earlier token ranks lower) or "average" (tied tokens share their mean rank; the
    mean stays (low + high)/2).
    """
    if ties not in RANK_TIES:
        raise ValueError(f"estimator.transform.rank_linear.ties={ties!r} is not one of {sorted(RANK_TIES)}")
    rank = RANK_TIES[ties]
    r, m, was_1d = _prepare(scores, mask, sign)
    w = torch.zeros_like(r)
    for b in range(r.shape[0]):  # ranks are per response; a loop keeps memory at T² per row
        x = sign * r[b][m[b]]
        n = x.numel()
        if n == 1:
            w[b][m[b]] = (low + high) / 2
        elif n > 1:
            w[b][m[b]] = low + (high - low) * rank(x) / (n - 1)
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


def signed_linear(scores, mask=None, *, sign: int, bound: float = 1.5, low: float = -0.5,
                  high: float = 2.5):
    """Signed weights (a deviation from both papers, issue #22; never a default): ``clamp_linear``'s
    affine map onto [low, high] with ``low`` <= 0 allowed,

        x_t = clamp(sign · r_t, −bound, bound)
        w_t = low + (high − low) · (x_t + bound) / (2 · bound)

    so a chosen token the scores call harmful (sign·r ≤ −bound) gets ``low`` < 0: the weighted margin
    then pushes its probability *down* although it sits in the chosen response, which no positive
    weight can do (a positive weight only slows its rise). At the defaults r = 0 gets (low + high)/2 = 1,
    DPO's weight, and the weights span [−0.5, 2.5]. Config validation accepts low <= 0 for this
    transform alone (``estimators.common.check_transform``).
    """
    return clamp_linear(scores, mask, sign=sign, bound=bound, low=low, high=high)


TRANSFORMS = {"exp_clamp": exp_clamp, "rank_linear": rank_linear, "clamp_linear": clamp_linear,
              "signed_linear": signed_linear}
#: the transforms whose weights may be <= 0 (config validation lets their ``low`` be negative)
SIGNED_TRANSFORMS = ("signed_linear",)


def at_bound(scores, mask=None, *, name: str, sign: int, **params) -> torch.Tensor:
    """Bool mask of the valid tokens whose weight sits at a bound of transform ``name`` (same
    arguments as the transform): where the transform stops telling tokens apart.

        exp_clamp:    r_t ≤ L or r_t ≥ U                (the clamp is active)
        clamp_linear, signed_linear: |sign · r_t| ≥ bound (the clamp is active)
        rank_linear:  w_t = low or w_t = high           (the lowest / highest rank of its response;
                                                          2 of n tokens, fewer with tied extremes)

    A saturating transform (most tokens at a bound) turns the weights into a binary signal.
    """
    if name not in TRANSFORMS:
        raise ValueError(f"estimator.transform.name={name!r} is not one of {sorted(TRANSFORMS)}")
    r, m, was_1d = _prepare(scores, mask, sign)
    if name == "exp_clamp":
        hit = (r <= params.get("lower", -0.5)) | (r >= params.get("upper", 0.5))
    elif name in ("clamp_linear", "signed_linear"):
        hit = (sign * r).abs() >= params.get("bound", 1.5)
    else:
        w = rank_linear(r, m, sign=sign, **params)
        low, high = params.get("low", 0.7), params.get("high", 1.3)
        one = m.sum(-1, keepdim=True) == 1  # a 1-token response sits at the middle, not a bound
        hit = ((w - low).abs() < 1e-6) | ((w - high).abs() < 1e-6)
        hit = hit & ~one
    hit = hit & m
    return hit[0] if was_1d else hit
