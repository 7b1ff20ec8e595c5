"""TI-DPO online token weights: gradient attribution mixed with a Gaussian prior.

Attribution, per sequence, from the CURRENT policy at every step:
    L_target = max_v logits[last valid position, v]
    I_t      = || dL_target / de_t ||_1          (e_t: input embedding of token t)
I is normalised to sum 1 over a span, mixed with the Gaussian prior over that span and scaled
to mean 1 over it:
    W_t = n * (lambda * I_t + (1 - lambda) * P_t)                     (tisdpo.weights.prior)
``normalize=sequence`` (the authors' released code, trainers.py ``_compute_token_importance_weights``
on the TDPO path, which passes no labels): the span is the whole sequence, prompt + response + EOS
(n = its length, the prior centred on its middle); the loss then uses the response positions only,
whose mean weight is not 1. ``normalize=response``: the span is the response (mean weight 1 there).
The released code weights EOS like any token; ``weight_eos=False`` takes EOS out of the span and
gives it weight 0 (the attribution of the max logit at the last position puts much of its mass on
the EOS embedding itself).
Only the input embeddings receive gradient in this pass (``torch.autograd.grad``), so nothing
leaks into the parameters' ``.grad``; the weights are constants in the loss.

The triplet term is a loss term: ``tisdpo.losses.tidpo_triplet``.
"""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX
from tisdpo.data.collate import concat_pair
from tisdpo.kernels.scoring import chunked_head
from tisdpo.losses.record import StepContext
from tisdpo.weights.prior import mix_importance


def embedding_attribution(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, T] L1 norm of d(max logit at the last valid position)/d(input embedding of each token)."""
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    last = attention_mask.sum(-1) - 1  # right padding: the last real token
    rows = torch.arange(len(last), device=input_ids.device)
    head = chunked_head(model, input_ids)
    if head is not None:  # bounded memory: one [V] logit row per sequence, never the [N, T, V] logits
        hidden = model.base_model(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False).last_hidden_state
        target = (hidden[rows, last] @ head.t().to(hidden.dtype)).max(-1).values
    else:
        logits = model(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False).logits
        target = logits[rows, last].max(-1).values
    # Each row's target depends only on its own embeddings, so one backward of the sum gives
    # every row's gradient at once.
    (grad,) = torch.autograd.grad(target.sum(), embeddings)
    return grad.abs().sum(-1).float() * attention_mask


def importance_weights(importance: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor, *,
                       lam: float, normalize: str = "response") -> torch.Tensor:
    """Per-position weights [N, T]: W on response tokens, 1.0 elsewhere (ignored by the loss).

    normalize="response": W = mix_importance over the response (mean 1 on it);
    normalize="sequence" (released code): mix_importance over every attended position
    (prompt + response), W read at the response positions.
    """
    if normalize == "sequence":
        weights = mix_importance(importance, attention_mask.bool(), lam)
    elif normalize == "response":
        weights = mix_importance(importance, response_mask, lam)
    else:
        raise ValueError(f"estimator.normalize={normalize!r} is not one of response, sequence")
    return torch.where(response_mask, weights, torch.ones_like(weights))


def final_eos_mask(input_ids: torch.Tensor, response_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[N, T] bool: the last response position of each row when it holds EOS."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device).expand_as(response_mask)
    last = positions.masked_fill(~response_mask, -1).max(-1).values
    out = torch.zeros_like(response_mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    out[rows, last[rows]] = input_ids[rows, last[rows]] == eos_token_id
    return out


class GradientWeights:
    """Callable hook: (step context) -> (chosen_weights, rejected_weights) aligned with input_ids."""

    def __init__(self, lam: float = 0.7, normalize: str = "response", kind: str = "gradient",
                 weight_eos: bool = True, eos_token_id: int | None = None):
        if not weight_eos and eos_token_id is None:
            raise ValueError("estimator.weight_eos=false needs the tokenizer's eos_token_id")
        self.lam, self.normalize, self.kind = lam, normalize, kind
        self.weight_eos, self.eos_token_id = weight_eos, eos_token_id
        self.last_importance: torch.Tensor | None = None  # kept for weight-quality logging

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        batch = ctx.batch
        input_ids, attention = concat_pair(batch, "input_ids"), concat_pair(batch, "attention_mask")
        response_mask = concat_pair(batch, "labels") != IGNORE_INDEX
        with torch.enable_grad():
            importance = embedding_attribution(ctx.policy, input_ids, attention)
        self.last_importance = importance.detach()
        span_attention, span_response = attention.bool(), response_mask
        eos = None
        if not self.weight_eos:  # EOS out of the span (no share of I, no prior mass), weight 0
            eos = final_eos_mask(input_ids, response_mask, self.eos_token_id)
            span_attention, span_response = span_attention & ~eos, response_mask & ~eos
        weights = importance_weights(importance, span_response, span_attention, lam=self.lam, normalize=self.normalize)
        if eos is not None:
            weights = weights.masked_fill(eos, 0.0)
        half = batch["chosen_input_ids"].shape[0]
        return weights[:half], weights[half:]
