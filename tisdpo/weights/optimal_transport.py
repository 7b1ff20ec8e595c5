"""OTPO's token weights: an unbalanced optimal-transport plan between a pair's responses.

For one pair, P = the chosen response's token representations (n × d), Q = the rejected one's
(m × d), both the policy's last-layer hidden states at the position that predicts each token:

    C_ij  = ||p_i − q_j||_2 + 1e-6,  divided by its largest entry when that exceeds 1
    Γ     = argmin_Γ≥0 ⟨Γ, C⟩ + ε Σ Γ_ij (log Γ_ij − 1) + τ KL(Γ1 ‖ a) + τ KL(Γᵀ1 ‖ b),   a = 1_n, b = 1_m
    s     = ΣΓ / min(n, m)
    w^w_i = Σ_j Γ_ij / s,      w^l_j = Σ_i Γ_ij / s          (each side's weights sum to min(n, m))

ε = ``reg`` (the entropic term), τ = ``reg_m`` (the marginal relaxation). Γ is found by the
generalised Sinkhorn iteration of Chizat et al. (2018), the fixed point of POT's
``ot.unbalanced.sinkhorn_unbalanced(a, b, C, ε, τ)`` with its default ``reg_type="entropy"``
(u = (a / Kv)^φ, v = (b / Kᵀu)^φ, K = exp(−C/ε), φ = τ / (τ + ε), Γ = diag(u) K diag(v)), run
in the log domain for every pair of the batch at once. The release (Mimasss2/OTPO,
scripts/otpo_trainer.py ``get_ot_weight``) builds C over the whole padded sequence with the
masked positions zeroed: those zero vectors carry no mass, but their distances (the valid
vectors' norms) enter the normalising maximum; ``cost_matrix`` reproduces that.
"""
from __future__ import annotations

import torch


def cost_matrix(chosen: torch.Tensor, rejected: torch.Tensor, chosen_mask: torch.Tensor,
                rejected_mask: torch.Tensor) -> torch.Tensor:
    """[B, n, m] Euclidean costs between the valid vectors (+1e-6), each pair divided by its largest
    entry when that exceeds 1. The maximum runs over the valid pairs and the valid vectors' norms
    (their distance to the zeroed masked positions of the released padded matrix)."""
    chosen = chosen * chosen_mask[..., None]
    rejected = rejected * rejected_mask[..., None]
    cost = torch.cdist(chosen, rejected, p=2) + 1e-6
    valid = chosen_mask.bool()[:, :, None] & rejected_mask.bool()[:, None, :]
    largest = torch.stack([
        cost.masked_fill(~valid, 0).flatten(1).amax(-1),
        (chosen.norm(dim=-1) * chosen_mask).amax(-1) + 1e-6,
        (rejected.norm(dim=-1) * rejected_mask).amax(-1) + 1e-6,
    ], -1).amax(-1)
    scale = torch.where(largest > 1, largest, torch.ones_like(largest))
    return cost / scale[:, None, None]


def _masked_lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that gives −inf (not NaN) over an all −inf slice."""
    peak = x.amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    return (x - peak).exp().sum(dim).log() + peak.squeeze(dim)


def unbalanced_sinkhorn(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, reg: float, reg_m: float,
                        max_iter: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """[B, n, m] entropic unbalanced OT plans of the marginals a [B, n], b [B, m] (0 = no mass)
    under ``cost`` (module docstring). Stops when every pair's scaling u changes by less than
    ``tol`` (relative, checked every 10 iterations as POT does) or after ``max_iter`` iterations."""
    fi = reg_m / (reg_m + reg)
    log_k = -cost / reg
    log_a, log_b = a.log(), b.log()   # −inf where there is no mass
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    f = f.masked_fill(a <= 0, float("-inf"))
    g = g.masked_fill(b <= 0, float("-inf"))
    for it in range(max_iter):
        f_prev = f
        lse_rows = _masked_lse(log_k + g[:, None, :], dim=2)
        f = torch.where(a > 0, fi * (log_a - torch.where(torch.isfinite(lse_rows), lse_rows, torch.zeros_like(lse_rows))),
                        torch.full_like(log_a, float("-inf")))
        lse_cols = _masked_lse(log_k + f[:, :, None], dim=1)
        g = torch.where(b > 0, fi * (log_b - torch.where(torch.isfinite(lse_cols), lse_cols, torch.zeros_like(lse_cols))),
                        torch.full_like(log_b, float("-inf")))
        if it % 10 == 0:
            u, u_prev = f.exp(), f_prev.exp()
            top = torch.maximum(torch.maximum(u.amax(-1), u_prev.amax(-1)), torch.ones_like(u[:, 0]))
            if float(((u - u_prev).abs().amax(-1) / top).max()) < tol:
                break
    return (f[:, :, None] + g[:, None, :] + log_k).exp()


def ot_token_weights(chosen: torch.Tensor, rejected: torch.Tensor, chosen_mask: torch.Tensor,
                     rejected_mask: torch.Tensor, *, reg: float, reg_m: float, max_iter: int = 1000,
                     tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen weights [B, n], rejected weights [B, m]) from representations [B, n, d] / [B, m, d]
    and bool masks: the plan's row / column marginals rescaled so each side sums to min(n, m);
    0 at masked positions and for a pair with an empty side."""
    a, b = chosen_mask.to(chosen.dtype), rejected_mask.to(rejected.dtype)
    plan = unbalanced_sinkhorn(cost_matrix(chosen, rejected, a, b), a, b, reg=reg, reg_m=reg_m,
                               max_iter=max_iter, tol=tol)
    scale = plan.sum((1, 2)) / torch.minimum(a.sum(-1), b.sum(-1)).clamp(min=1)
    scale = scale.clamp(min=torch.finfo(plan.dtype).tiny)[:, None]
    return plan.sum(2) / scale, plan.sum(1) / scale
