"""Lean per-token kernels: log-probabilities of labels and per-position KL.

Both shift (logits[:, t] predicts labels[:, t+1]) and work in float32 on blocks of at most
`chunk_size` (row, position) pairs, so the full-vocabulary float32 tensor [N, T, V] that
`log_softmax(logits.float())` would build is never materialised. Each is a custom autograd
Function that saves only its inputs (and a [N, T-1] statistic): backward recomputes the
softmax block by block and writes straight into one gradient buffer of the logits' shape
and dtype, the one full-size tensor backward cannot avoid.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from tisdpo.constants import IGNORE_INDEX

DEFAULT_CHUNK = 512  # (row, position) pairs per block: 512 x V fp32 = 65 MB at V=32k


def _blocks(n: int, length: int, chunk_size: int):
    """Yield (rows, cols) slices tiling [n, length], each block <= chunk_size (row, pos) pairs."""
    cols = max(1, min(length, chunk_size))
    rows = max(1, chunk_size // cols)
    for r in range(0, n, rows):
        for c in range(0, length, cols):
            # clip to `length`: the logits have one more position (the last) than the output
            yield slice(r, r + rows), slice(c, min(c + cols, length))


def _compute_dtype(*tensors):
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)  # float64 stays float64 (gradcheck)
    return dtype


# Block helpers: temporaries die when a helper returns, so at most one block's worth of
# float32 work space is alive at a time (plain loop variables would keep the previous
# iteration's block alive while the next one is computed).

def _logps_block(z, index, dtype):
    """-> (logsumexp, logit of the label) for one block of logits [r, c, V]."""
    z = z.to(dtype)
    return torch.logsumexp(z, -1), z.gather(-1, index[..., None]).squeeze(-1)


def _logps_grad_block(z, index, lse, g):
    """d logp_y / d z_v = 1[v=y] − softmax_v, times the upstream grad g [r, c, 1]."""
    d = (z - lse[..., None]).exp_().mul_(-g)  # bf16 − fp32 promotes straight to fp32
    return d.scatter_add_(-1, index[..., None], g)


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, mask, chunk_size):
        n, t, _ = logits.shape
        dtype = _compute_dtype(logits)
        picked = logits.new_zeros(n, t - 1, dtype=dtype)
        lse = logits.new_zeros(n, t - 1, dtype=dtype)
        for rows, cols in _blocks(n, t - 1, chunk_size):
            lse[rows, cols], picked[rows, cols] = _logps_block(
                logits[rows, cols], index[rows, cols], dtype)
        ctx.save_for_backward(logits, index, mask, lse)
        ctx.chunk_size = chunk_size
        return (picked - lse).masked_fill(~mask, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, index, mask, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # the last position predicts nothing: stays 0
        g = grad_out.masked_fill(~mask, 0.0)[..., None]
        n, t, _ = logits.shape
        for rows, cols in _blocks(n, t - 1, ctx.chunk_size):
            grad[rows, cols] = _logps_grad_block(logits[rows, cols], index[rows, cols],
                                                 lse[rows, cols], g[rows, cols])
        return grad, None, None, None


def token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                chunk_size: int = DEFAULT_CHUNK):
    """Per-token log-probabilities of the labels.

        logps[n, t] = logits[n, t, y] − logsumexp_v logits[n, t, v],   y = labels[n, t+1]

    logits [N, T, V] (any float dtype), labels [N, T] -> (logps [N, T-1] float32 (float64 for
    float64 logits), mask [N, T-1] bool = labels[:, 1:] != ignore_index). Masked positions give
    logp 0 and no gradient. Differentiable w.r.t. logits; peak extra memory is one
    chunk_size x V float32 block instead of a full [N, T, V] float32 log_softmax.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected "
                         f"{tuple(logits.shape[:2])} (the first two dims of logits)")
    mask = labels[:, 1:] != ignore_index
    index = labels[:, 1:].masked_fill(~mask, 0)  # any valid index; the value is masked out
    return _TokenLogps.apply(logits, index, mask, chunk_size), mask


def _dot(a, b):
    """Σ_v a_v b_v over the last dim without materialising a ⊙ b."""
    return (a[..., None, :] @ b[..., :, None])[..., 0, 0]


def _kl_block(pz, qz, dtype):
    lp, lq = torch.log_softmax(pz.to(dtype), -1), torch.log_softmax(qz.to(dtype), -1)
    p = lp.exp()
    return _dot(p, lp.sub_(lq))


def _kl_grad_block(pz, qz, g, dtype, need_p, need_q):
    """Gradients of KL(p‖q) at one block w.r.t. the p and q logits, times g [r, c, 1]."""
    lp, lq = torch.log_softmax(pz.to(dtype), -1), torch.log_softmax(qz.to(dtype), -1)
    p = lp.exp()
    grad_p = grad_q = None
    if need_p:  # dKL/dz^p_v = p_v (log p_v − log q_v − KL)
        a = lp.sub_(lq)
        grad_p = a.sub_(_dot(p, a)[..., None]).mul_(p).mul_(g)
    if need_q:  # dKL/dz^q_v = q_v − p_v
        grad_q = lq.exp_().sub_(p).mul_(g)
    return grad_p, grad_q


class _PositionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_logits, q_logits, mask, chunk_size):
        n, t, _ = p_logits.shape
        dtype = _compute_dtype(p_logits, q_logits)
        kl = p_logits.new_zeros(n, t - 1, dtype=dtype)
        for rows, cols in _blocks(n, t - 1, chunk_size):
            kl[rows, cols] = _kl_block(p_logits[rows, cols], q_logits[rows, cols], dtype)
        ctx.save_for_backward(p_logits, q_logits, mask)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return kl.masked_fill(~mask, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        p_logits, q_logits, mask = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        grad_p = torch.zeros_like(p_logits) if need_p else None
        grad_q = torch.zeros_like(q_logits) if need_q else None
        g = grad_out.masked_fill(~mask, 0.0)[..., None]
        n, t, _ = p_logits.shape
        for rows, cols in _blocks(n, t - 1, ctx.chunk_size):
            gp, gq = _kl_grad_block(p_logits[rows, cols], q_logits[rows, cols], g[rows, cols],
                                    ctx.dtype, need_p, need_q)
            if need_p:
                grad_p[rows, cols] = gp
            if need_q:
                grad_q[rows, cols] = gq
            del gp, gq  # free before the next block
        return grad_p, grad_q, None, None


def per_position_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor,
                    chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """KL(p‖q) of the next-token distributions at every shifted position.

        kl[n, t] = Σ_v softmax(p)_v (log_softmax(p)_v − log_softmax(q)_v),  logits at position t

    p_logits, q_logits [N, T, V]; mask [N, T-1] (as returned by token_logps) or [N, T]
    aligned with the labels (then mask[:, 1:] is used) -> [N, T-1] float32, 0 where masked.
    Differentiable w.r.t. both logits. Which direction each loss wants:
      TDPO (and TI-DPO base=tdpo2): KL(π_ref‖π_θ) = per_position_kl(ref_logits, policy_logits)
      TIS-DPO η:                    KL(π_θ‖π_ref) = per_position_kl(policy_logits, ref_logits)
    """
    if p_logits.dim() != 3:
        raise ValueError(f"p_logits must be [N, T, V], got {tuple(p_logits.shape)}")
    if q_logits.shape != p_logits.shape:
        raise ValueError(f"q_logits has shape {tuple(q_logits.shape)}, expected "
                         f"{tuple(p_logits.shape)} (the shape of p_logits)")
    n, t, _ = p_logits.shape
    if mask.shape == (n, t):
        mask = mask[:, 1:]
    elif mask.shape != (n, t - 1):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(n, t - 1)} "
                         f"(or {(n, t)} aligned with the labels)")
    return _PositionKL.apply(p_logits, q_logits, mask.bool(), chunk_size)


# ---------------------------------------------------------------------------------------
# From hidden states through the output head: the [N, T, V] logits never exist
# ---------------------------------------------------------------------------------------
# The chunked linear-cross-entropy idea of Liger's fused linear losses and Cut Cross-Entropy
# (Wijmans et al. 2024): logits are made one block of rows at a time from the last hidden states and
# the head's weight, reduced to what the loss needs (log-prob of the label, or the KL), and dropped;
# backward remakes each block and writes the gradients of the hidden states and of the head weight.
# Neither library runs here: Liger's kernels and CCE's are Triton (CUDA) only, and the project trains
# on CPUs as well as GPUs, with a KL term neither offers; so the few lines below are ours, checked
# against the full-logits kernels above (tests/test_memory_head.py).

def _head_block(h, weight, dtype):
    return (h.to(dtype) @ weight.to(dtype).t())


class _HeadTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, index, rows):
        dtype = _compute_dtype(hidden, weight)
        out = hidden.new_empty(hidden.shape[0], dtype=dtype)
        lse = hidden.new_empty(hidden.shape[0], dtype=dtype)
        for start in range(0, hidden.shape[0], rows):
            block = slice(start, start + rows)
            lse[block], picked = _logps_block(_head_block(hidden[block], weight, dtype), index[block], dtype)
            out[block] = picked - lse[block]
        ctx.save_for_backward(hidden, weight, index, lse)
        ctx.rows, ctx.dtype = rows, dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, index, lse = ctx.saved_tensors
        grad_h, grad_w = _head_grad_buffers(hidden, weight, *ctx.needs_input_grad[:2], ctx.dtype)
        for start in range(0, hidden.shape[0], ctx.rows):
            block = slice(start, start + ctx.rows)
            h = hidden[block]
            d = _logps_grad_block(_head_block(h, weight, ctx.dtype), index[block], lse[block],
                                  grad_out[block, None].to(ctx.dtype))
            _backprop_head(d, h, weight, block, grad_h, grad_w, ctx.dtype)
            del d
        return grad_h, _as_weight_grad(grad_w, weight), None, None


def _head_grad_buffers(hidden, weight, need_h: bool, need_w: bool, dtype):
    """Zeroed gradient buffers of one head's (hidden, weight), None where no gradient is needed; the
    weight's accumulates in the compute dtype over the blocks."""
    return (torch.zeros_like(hidden) if need_h else None,
            torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None)


def _backprop_head(d, h, weight, block, grad_h, grad_w, dtype) -> None:
    """The chain rule through ``logits = h @ weight.T`` for one block of rows, given d = dL/dlogits:
    grad_h[block] = d @ weight, grad_w += d.T @ h (each only where its buffer exists)."""
    if grad_h is not None:
        grad_h[block] = (d @ weight.to(dtype)).to(grad_h.dtype)
    if grad_w is not None:
        grad_w.addmm_(d.t(), h.to(dtype))


def _as_weight_grad(grad_w, weight):
    return None if grad_w is None else grad_w.to(weight.dtype)


def _head_rows(vocab: int, chunk_size: int) -> int:
    """Rows per head block: about ``chunk_size`` x V float32 logits at a time (at least one row)."""
    return max(1, chunk_size)


def head_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                     ignore_index: int = IGNORE_INDEX, chunk_size: int = DEFAULT_CHUNK):
    """:func:`token_logps` of ``logits = hidden @ weight.T`` without the logits.

    hidden [N, T, H] (the model's last hidden states), weight [V, H] (its output head; no bias),
    labels [N, T] -> (logps [N, T-1], mask [N, T-1]) exactly as ``token_logps(hidden @ weight.T,
    labels)``. Only the labelled positions get a logit row, ``chunk_size`` rows at a time, forward and
    backward; gradients reach ``hidden`` and ``weight``. Peak extra memory: one chunk_size x V block.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden [N, T, H] and labels [N, T] expected, got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    mask = labels[:, 1:] != ignore_index
    selected = hidden[:, :-1][mask]  # position t predicts label t+1
    picked = _HeadTokenLogps.apply(selected, weight, labels[:, 1:][mask], _head_rows(weight.shape[0], chunk_size))
    out = picked.new_zeros(mask.shape)
    return out.masked_scatter(mask, picked), mask


class _HeadKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p_hidden, p_weight, q_hidden, q_weight, rows):
        dtype = _compute_dtype(p_hidden, q_hidden, p_weight, q_weight)
        kl = p_hidden.new_empty(p_hidden.shape[0], dtype=dtype)
        for start in range(0, p_hidden.shape[0], rows):
            block = slice(start, start + rows)
            kl[block] = _kl_block(_head_block(p_hidden[block], p_weight, dtype),
                                  _head_block(q_hidden[block], q_weight, dtype), dtype)
        ctx.save_for_backward(p_hidden, p_weight, q_hidden, q_weight)
        ctx.rows, ctx.dtype = rows, dtype
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        p_hidden, p_weight, q_hidden, q_weight = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        dtype = ctx.dtype
        grad_ph, grad_pw = _head_grad_buffers(p_hidden, p_weight, need[0], need[1], dtype)
        grad_qh, grad_qw = _head_grad_buffers(q_hidden, q_weight, need[2], need[3], dtype)
        for start in range(0, p_hidden.shape[0], ctx.rows):
            block = slice(start, start + ctx.rows)
            ph, qh = p_hidden[block], q_hidden[block]
            gp, gq = _kl_grad_block(_head_block(ph, p_weight, dtype), _head_block(qh, q_weight, dtype),
                                    grad_out[block, None].to(dtype), dtype, need[0] or need[1], need[2] or need[3])
            if gp is not None:
                _backprop_head(gp, ph, p_weight, block, grad_ph, grad_pw, dtype)
            if gq is not None:
                _backprop_head(gq, qh, q_weight, block, grad_qh, grad_qw, dtype)
            del gp, gq
        return grad_ph, _as_weight_grad(grad_pw, p_weight), grad_qh, _as_weight_grad(grad_qw, q_weight), None


def head_position_kl(p_hidden: torch.Tensor, p_weight: torch.Tensor, q_hidden: torch.Tensor, q_weight: torch.Tensor,
                     mask: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """:func:`per_position_kl` of ``p_hidden @ p_weight.T`` and ``q_hidden @ q_weight.T`` without the
    logits: hidden [N, T, H], weights [V, H], mask [N, T-1] (or [N, T]) -> [N, T-1], 0 where masked.
    Only the masked-in positions are computed; gradients reach every input that requires them."""
    n, t, _ = p_hidden.shape
    if mask.shape == (n, t):
        mask = mask[:, 1:]
    mask = mask.bool()
    kl = _HeadKL.apply(p_hidden[:, :-1][mask], p_weight, q_hidden[:, :-1][mask], q_weight,
                       _head_rows(p_weight.shape[0], chunk_size))
    return kl.new_zeros(mask.shape).masked_scatter(mask, kl)
