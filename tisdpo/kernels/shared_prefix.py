"""Shared-prefix forward: a pair's chosen and rejected responses share its prompt, so the prompt
goes through the model once.

The standard forward runs [2B, T] rows (prompt + chosen, prompt + rejected). Packed, each pair is
ONE row ``[prompt | chosen | rejected]`` with

* an attention mask in which the rejected tokens see the prompt and themselves, never the
  chosen ones (causal otherwise; padding sees only itself, so that no softmax row is empty);
* position ids that restart the rejected response where the prompt ends (as if it followed the
  prompt directly);
* logits computed only at the positions whose next token is a response token (the last prompt
  position predicts both responses' first token).

The per-token log-probs come back in the standard layout ([2B, T-1], shifted like the labels, 0
off the responses), equal to the standard forward's up to float rounding, so every loss that
needs only log-probs (DPO, cDPO, IPO, KTO, TIS-DPO without η, TI-DPO base=dpo) is unchanged.
With a prompt as long as the responses the backbone sees 3/4 of the tokens and the LM head half.
Losses with a per-position KL (TDPO, TIS-DPO's η) need full logits and keep the standard forward.

Relies on the model honouring a 4D boolean ``attention_mask`` and ``position_ids`` (transformers'
causal LMs with sdpa/eager attention), and uses a boolean ``logits_to_keep`` where the model takes
one (transformers >= 5.21; before, every position's logits are computed and the kept ones selected);
:func:`packing_matches` checks that on a batch, and the preference module falls back to the
standard forward when it does not hold.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from tisdpo.constants import IGNORE_INDEX
from tisdpo.data.collate import concat_pair
from tisdpo.kernels.logprobs import token_logps


@dataclass
class PackedPairs:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, 1, L, L] bool, True = may attend
    position_ids: torch.Tensor  # [B, L]
    keep: torch.Tensor  # [B, L] bool: positions whose logits are needed
    rows: torch.Tensor  # [M] index into the kept positions (row-major), one per response token
    targets: torch.Tensor  # [M] the response token each of those positions predicts
    mask: torch.Tensor  # [2B, T-1] bool: the standard layout's response positions (M of them)


def pack_pairs(batch: dict[str, torch.Tensor], pad_token_id: int = 0) -> PackedPairs | None:
    """One packed row per pair, or None when some pair's two sequences do not share their prompt."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_lab, r_lab = batch["chosen_labels"], batch["rejected_labels"]
    c_att, r_att = batch["chosen_attention_mask"].bool(), batch["rejected_attention_mask"].bool()
    if c_ids.shape != r_ids.shape:
        return None
    device = c_ids.device
    size, width = c_ids.shape
    # prompt = the leading label -100 run; the collator right-pads, so tokens are a prefix
    prompt = ((c_lab == IGNORE_INDEX) & c_att).sum(1)
    n_chosen, n_rejected = c_att.sum(1), r_att.sum(1)
    col = torch.arange(width, device=device)[None]
    in_prompt = col < prompt[:, None]
    same_prompt = (((r_lab == IGNORE_INDEX) & r_att).sum(1) == prompt) & ((c_ids == r_ids) | ~in_prompt).all(1)
    # responses follow the prompt without gaps (labels set exactly on the non-prompt tokens)
    contiguous = (((c_lab != IGNORE_INDEX) == (c_att & ~in_prompt)).all(1)
                  & ((r_lab != IGNORE_INDEX) == (r_att & ~in_prompt)).all(1))
    if not bool((same_prompt & contiguous & (prompt > 0)).all()):
        return None
    chosen_len, rejected_len = n_chosen - prompt, n_rejected - prompt
    total = prompt + chosen_len + rejected_len
    length = int(total.max())

    j = torch.arange(length, device=device)[None]  # packed position
    end_chosen = (prompt + chosen_len)[:, None]
    from_chosen = c_ids.gather(1, j.clamp(max=width - 1).expand(size, -1))
    from_rejected = r_ids.gather(1, (j - chosen_len[:, None]).clamp(0, width - 1))
    valid = j < total[:, None]
    input_ids = torch.where(j < end_chosen, from_chosen, torch.where(valid, from_rejected, pad_token_id))
    # segments: 0 prompt, 1 chosen, 2 rejected, -1 padding
    segment = torch.where(j < prompt[:, None], 0, torch.where(j < end_chosen, 1, torch.where(valid, 2, -1)))
    position_ids = torch.where(j < end_chosen, j, j - chosen_len[:, None]).where(valid, 0)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal & (key >= 0) & ~((query == 2) & (key == 1))
    allowed |= torch.eye(length, dtype=torch.bool, device=device)

    # standard layout: position t of a row predicts labels[t + 1]
    c_mask, r_mask = c_lab[:, 1:] != IGNORE_INDEX, r_lab[:, 1:] != IGNORE_INDEX
    c_row, c_t = c_mask.nonzero(as_tuple=True)
    r_row, r_t = r_mask.nonzero(as_tuple=True)
    # packed column: chosen positions are unchanged; rejected ones move past the chosen tokens,
    # except the last prompt position (shared: it predicts both first tokens)
    r_col = torch.where(r_t >= prompt[r_row], r_t + chosen_len[r_row], r_t)
    rows_i, cols = torch.cat([c_row, r_row]), torch.cat([c_t, r_col])
    targets = torch.cat([c_lab[:, 1:][c_mask], r_lab[:, 1:][r_mask]])
    keep = torch.zeros(size, length, dtype=torch.bool, device=device)
    keep[rows_i, cols] = True
    rank = keep.flatten().cumsum(0) - 1  # row-major rank of each kept position
    rows = rank[rows_i * length + cols]
    return PackedPairs(input_ids, allowed[:, None], position_ids, keep, rows, targets,
                       torch.cat([c_mask, r_mask], dim=0))


class _RowLogps(torch.autograd.Function):
    """logps[m] = logits[rows[m], targets[m]] − logsumexp(logits[rows[m]]), logits [N, V].

    One logsumexp per kept row (a row shared by two targets is normalised once), float32 blocks
    of at most ``chunk`` rows; backward writes one gradient buffer of the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, rows, targets, chunk):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            lse[start: start + chunk] = torch.logsumexp(logits[start: start + chunk].to(dtype), -1)
        picked = logits[rows, targets].to(dtype)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.chunk = chunk
        return picked - lse[rows]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        logits, rows, targets, lse = ctx.saved_tensors
        total = torch.zeros_like(lse).index_add_(0, rows, grad_out.to(lse.dtype))  # Σ g over a row's targets
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            block = slice(start, start + ctx.chunk)
            grad[block] = (logits[block].to(lse.dtype) - lse[block, None]).exp_().mul_(-total[block, None])
        grad.index_put_((rows, targets), grad_out.to(grad.dtype), accumulate=True)  # + g at each target
        return grad, None, None, None


# Model classes whose forward rejects a [B, L] boolean ``logits_to_keep``: transformers before 5.21
# slices ``hidden_states[:, logits_to_keep, :]``, an IndexError for a 2D mask. They get every
# position's logits, and the kept ones are selected here (more memory, same values).
_NO_BOOLEAN_KEEP: set[type] = set()


def _kept_logits(model, kwargs: dict, keep: torch.Tensor) -> torch.Tensor:
    if type(model) not in _NO_BOOLEAN_KEEP:
        try:
            return model(**kwargs, logits_to_keep=keep).logits
        except IndexError:
            _NO_BOOLEAN_KEEP.add(type(model))
    return model(**kwargs).logits


def packed_logps(model, packed: PackedPairs, chunk_size: int = 256) -> torch.Tensor:
    """Per-token log-probs [2B, T-1] (float32; 0 off the responses) from one packed forward."""
    kwargs = dict(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                  position_ids=packed.position_ids, use_cache=False)
    logits = _kept_logits(model, kwargs, packed.keep)
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep returns every position
        logits = logits[packed.keep] if logits.shape[:2] == packed.keep.shape else logits.flatten(0, 1)
    values = _RowLogps.apply(logits, packed.rows, packed.targets, max(1, int(chunk_size)))
    out = torch.zeros(packed.mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(packed.mask, values)


def packing_supported(model) -> bool:
    """False for what is known not to honour a custom 4D mask: flash-attention kernels (they take
    no mask) and active sliding windows (a custom mask replaces the window)."""
    config = getattr(model, "config", None)
    if config is None:
        return True
    implementation = str(getattr(config, "_attn_implementation", None) or "")
    if implementation.startswith(("flash", "paged", "flex")):
        return False
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True))


@torch.no_grad()
def packing_matches(model, batch: dict[str, torch.Tensor], packed: PackedPairs, chunk_size: int = 256,
                    atol: float | None = None) -> tuple[bool, float]:
    """(ok, max abs difference): packed log-probs against the standard [2B, T] forward on this batch."""
    ids, attention, labels = (concat_pair(batch, key) for key in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    standard, _ = token_logps(logits, labels, chunk_size=chunk_size)
    low_precision = logits.dtype in (torch.bfloat16, torch.float16)
    diff = (packed_logps(model, packed, chunk_size) - standard).abs().max().item()
    tolerance = atol if atol is not None else (0.1 if low_precision else 1e-3)
    return diff <= tolerance, diff
