"""TI-DPO online token weights: gradient attribution mixed with a Gaussian prior.

Attribution, per sequence, from the CURRENT policy at every step:
    L_target = max_v logits[last valid position, v]
    I_t      = || dL_target / de_t ||_1          (e_t: input embedding of token t)
I is normalised to sum 1 over the response tokens (or over the whole sequence, as the authors'
code, with ``normalize=sequence``), mixed with the Gaussian prior and scaled to mean 1:
    W_t = T * (lambda * I_t + (1 - lambda) * P_t)                     (tisdpo.weights.prior)
Only the input embeddings receive gradient in this pass (``torch.autograd.grad``), so nothing
leaks into the parameters' ``.grad``; the weights are constants in the loss.

The triplet term is a loss term: ``tisdpo.modules.triplet``.
"""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX
from tisdpo.data.collate import concat_pair
from tisdpo.weights.prior import gaussian_prior, mix_importance


def embedding_attribution(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, T] L1 norm of d(max logit at the last valid position)/d(input embedding of each token)."""
    embeddings = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False).logits
    last = attention_mask.sum(-1) - 1  # right padding: the last real token
    target = logits[torch.arange(len(last), device=logits.device), last].max(-1).values
    # Each row's target depends only on its own embeddings, so one backward of the sum gives
    # every row's gradient at once.
    (grad,) = torch.autograd.grad(target.sum(), embeddings)
    return grad.abs().sum(-1).float() * attention_mask


def importance_weights(importance: torch.Tensor, response_mask: torch.Tensor, attention_mask: torch.Tensor, *,
                       lam: float, normalize: str = "response") -> torch.Tensor:
    """Per-position weights [N, T]: W on response tokens, 1.0 elsewhere (ignored by the loss)."""
    if normalize == "sequence":
        # As the authors' code: I sums to 1 over the whole sequence, so the response's share of
        # it (and the mean response weight) is below 1.
        share = importance / importance.sum(-1, keepdim=True).clamp(min=1e-30)
        n = response_mask.sum(-1, keepdim=True).float()
        weights = n * (lam * share + (1 - lam) * gaussian_prior(response_mask))
        weights = weights.masked_fill(~response_mask, 0.0)
    elif normalize == "response":
        weights = mix_importance(importance, response_mask, lam)
    else:
        raise ValueError(f"estimator.normalize={normalize!r} is not one of response, sequence")
    return torch.where(response_mask, weights, torch.ones_like(weights))


class GradientWeights:
    """Callable hook: (module, batch) -> (chosen_weights, rejected_weights) aligned with input_ids."""

    def __init__(self, lam: float = 0.7, normalize: str = "response", kind: str = "gradient"):
        self.lam, self.normalize, self.kind = lam, normalize, kind
        self.last_importance: torch.Tensor | None = None  # kept for weight-quality logging

    def __call__(self, module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention = concat_pair(batch, "input_ids"), concat_pair(batch, "attention_mask")
        response_mask = concat_pair(batch, "labels") != IGNORE_INDEX
        with torch.enable_grad():
            importance = embedding_attribution(module.policy, input_ids, attention)
        self.last_importance = importance.detach()
        weights = importance_weights(importance, response_mask, attention.bool(), lam=self.lam, normalize=self.normalize)
        half = batch["chosen_input_ids"].shape[0]
        return weights[:half], weights[half:]
