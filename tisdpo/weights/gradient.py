"""TI-DPO online token weights (gradient attribution + Gaussian prior) and the triplet term.

Attribution, per sequence, from the CURRENT policy at every step:
    L_target = max_v logits[last valid position, v]
    I_t      = || dL_target / de_t ||_1          (e_t: input embedding of token t)
I is normalised to sum 1 over the response tokens (or over the whole sequence, as the authors'
code, with ``normalize=sequence``), mixed with the Gaussian prior and scaled to mean 1:
    W_t = T * (lambda * I_t + (1 - lambda) * P_t)                     (tisdpo.weights.prior)
Only the input embeddings receive gradient in this pass (``torch.autograd.grad``), so nothing
leaks into the parameters' ``.grad``; the weights are constants in the loss.

Triplet term: anchors y ~ pi_theta(.|x) (top-k/top-p sampling), per-token implicit rewards
rho_t = log pi_theta - log pi_ref, and ``tisdpo.losses.triplet_loss`` on (y, y_w, y_l).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from tisdpo.losses import triplet_loss
from tisdpo.losses.logprobs import token_logps
from tisdpo.modules.preference import concat_pair
from tisdpo.weights.prior import gaussian_prior, mix_importance

log = logging.getLogger(__name__)


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
        response_mask = concat_pair(batch, "labels") != -100
        with torch.enable_grad():
            importance = embedding_attribution(module.policy, input_ids, attention)
        self.last_importance = importance.detach()
        weights = importance_weights(importance, response_mask, attention.bool(), lam=self.lam, normalize=self.normalize)
        half = batch["chosen_input_ids"].shape[0]
        return weights[:half], weights[half:]


class TripletTerm:
    """gamma * triplet loss on policy-sampled anchors; anchors resampled per example every `anchor_every` steps."""

    def __init__(self, tokenizer, *, gamma: float = 0.1, margin: float = 0.1, anchor_every: int = 1,
                 max_new_tokens: int = 64, top_k: int = 50, top_p: float = 0.95, temperature: float = 0.8,
                 chunk_size: int = 256):
        self.tokenizer = tokenizer
        self.gamma, self.margin, self.anchor_every = gamma, margin, max(1, int(anchor_every))
        self.generation = dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature,
                               max_new_tokens=max_new_tokens)
        self.chunk = chunk_size
        self.anchors: dict[int, tuple[list[int], int]] = {}  # example index -> (anchor ids, step sampled)

    @torch.no_grad()
    def _sample(self, module, batch, rows: list[int]) -> None:
        policy = module.policy
        was_training = policy.training
        policy.eval()
        prompt_ids = batch["prompt_input_ids"][rows]
        prompt_mask = batch["prompt_attention_mask"][rows]
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, pad_token_id=self.tokenizer.pad_token_id,
                              eos_token_id=self.tokenizer.eos_token_id, **self.generation)
        policy.train(was_training)
        new = out[:, prompt_ids.shape[1]:].tolist()
        for row, tokens in zip(rows, new):
            if self.tokenizer.eos_token_id in tokens:  # keep EOS: chosen/rejected end with it too
                tokens = tokens[: tokens.index(self.tokenizer.eos_token_id) + 1]
            tokens = [t for t in tokens if t != self.tokenizer.pad_token_id] or [self.tokenizer.eos_token_id]
            self.anchors[int(batch["index"][row])] = (tokens, module.global_step)

    def anchor_batch(self, module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = module.global_step
        stale = [i for i, idx in enumerate(batch["index"].tolist())
                 if idx not in self.anchors or step - self.anchors[idx][1] >= self.anchor_every]
        if stale:
            self._sample(module, batch, stale)
        sequences, label_rows = [], []
        for i, idx in enumerate(batch["index"].tolist()):
            prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
            anchor = self.anchors[idx][0]
            sequences.append(prompt + anchor)
            label_rows.append([-100] * len(prompt) + anchor)
        width = max(map(len, sequences))
        pad = self.tokenizer.pad_token_id
        device = batch["chosen_input_ids"].device
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
        labels = torch.tensor([s + [-100] * (width - len(s)) for s in label_rows], device=device)
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
        return ids, attention, labels

    def __call__(self, module, batch, policy_logps, reference_logps, mask) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.gamma == 0:
            return policy_logps.new_zeros(()), {}
        ids, attention, labels = self.anchor_batch(module, batch)
        anchor_policy, anchor_mask = token_logps(module.policy(input_ids=ids, attention_mask=attention, use_cache=False).logits,
                                                 labels, chunk_size=self.chunk)
        with torch.no_grad():
            anchor_reference, _ = token_logps(module.reference(input_ids=ids, attention_mask=attention, use_cache=False).logits,
                                              labels, chunk_size=self.chunk)
        half = batch["chosen_input_ids"].shape[0]
        loss = triplet_loss(
            anchor_policy, anchor_reference, anchor_mask.to(anchor_policy.dtype),
            policy_logps[:half], reference_logps[:half], mask[:half],
            policy_logps[half:], reference_logps[half:], mask[half:],
            margin=self.margin,
        )
        return self.gamma * loss, {"triplet/loss": loss.detach(), "triplet/anchor_length": anchor_mask.sum(-1).float().mean()}


def build_triplet(cfg: DictConfig, tokenizer) -> TripletTerm:
    """The triplet term from ``loss.triplet`` (loss=tidpo)."""
    t = cfg.loss.triplet
    return TripletTerm(
        tokenizer, gamma=float(t.gamma), margin=float(t.margin), anchor_every=int(t.anchor_every),
        max_new_tokens=int(t.max_new_tokens), top_k=int(t.top_k), top_p=float(t.top_p),
        temperature=float(t.temperature), chunk_size=int(cfg.train.logits_chunk_size),
    )


def gradient_weight_hooks(cfg: DictConfig, data, train_examples: list[dict]):
    """WeightedData whose weights come online from the current policy (estimator=gradient)."""
    from tisdpo.pipeline.weights_stage import WeightedData

    est = cfg.estimator
    weights = GradientWeights(lam=float(est.lam), normalize=str(est.normalize))
    callbacks = []
    if data.task is not None and int(est.get("quality_every_n_steps") or 0) > 0:
        from tisdpo.weights.gradient_quality import GradientWeightQuality

        callbacks.append(GradientWeightQuality(weights, data, train_examples, every_n_steps=int(est.quality_every_n_steps)))
    return WeightedData(train_examples, online_weights=weights, callbacks=callbacks)
