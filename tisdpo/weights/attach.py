"""From per-token scores to the weights the loss sees, and what is reported about them.

Shared by every offline estimator (``estimators/``): the transform (``estimator.transform``),
the EOS rule (``weighted_token_masks``), attaching the weights to the tokenised examples, and the
summaries and signing used for the diagnostics. Keys of an estimator's config node that this
module consumes after the scores exist are ``POST_SCORE_KEYS``: they stay out of the scores'
cache identity (a sweep over transforms reuses the scores); every other key is in it.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.weights.transforms import TRANSFORMS, at_bound

SIGN = {"chosen": 1, "rejected": -1}
# applied to the scores by this module (or only batch the scoring): not part of what the scores are
POST_SCORE_KEYS = ("transform", "weight_eos", "score_batch_size")


def scores_identity(node: DictConfig) -> dict:
    """The estimator's whole config node, less the keys applied after scoring: the scores' cache key."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in POST_SCORE_KEYS}


def _transform_params(transform_cfg: DictConfig) -> tuple[str, dict]:
    name = transform_cfg.name
    if name not in TRANSFORMS:
        raise ValueError(f"estimator.transform.name={name!r} is not one of {sorted(TRANSFORMS)}")
    return name, OmegaConf.to_container(transform_cfg.get(name) or {}, resolve=True)


def apply_transform(scores: list[torch.Tensor], side: str, transform_cfg: DictConfig,
                    masks: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Weights from scores, one response at a time; tokens outside ``masks`` (the EOS) get 0."""
    name, params = _transform_params(transform_cfg)
    fn = TRANSFORMS[name]
    masks = masks if masks is not None else [None] * len(scores)
    return [fn(r, m, sign=SIGN[side], **params) if len(r) else r for r, m in zip(scores, masks)]


def bound_fraction(scores: dict[str, list[torch.Tensor]], masks: dict[str, list[torch.Tensor]],
                   transform_cfg: DictConfig) -> float:
    """Share of the weighted response tokens (both sides) whose weight sits at a transform bound."""
    name, params = _transform_params(transform_cfg)
    hits = total = 0
    for side in SIDES:
        for r, m in zip(scores[side], masks[side]):
            if len(r):
                hits += int(at_bound(r, m, name=name, sign=SIGN[side], **params).sum())
                total += int(m.sum())
    return hits / total if total else 0.0


def attach_weights(examples: list[dict], weights: dict[str, list[torch.Tensor]]) -> list[dict]:
    """Copies of the examples with per-position weights: 0 on prompt positions (as the released
    code; the losses mask the prompt out anyway), the response weights after them."""
    out = []
    for i, example in enumerate(examples):
        example = dict(example)
        for side in SIDES:
            w = iter(weights[side][i].tolist())
            example[f"{side}_weights"] = [0.0 if label == IGNORE_INDEX else next(w) for label in example[f"{side}_labels"]]
        out.append(example)
    return out


def weight_summary(weights: dict[str, list[torch.Tensor]],
                   masks: dict[str, list[torch.Tensor]] | None = None) -> dict[str, float]:
    """Mean and std of the weights over the response tokens that carry weight (``masks``; all
    response tokens when None), per side."""
    metrics = {}
    for side in SIDES:
        side_masks = masks[side] if masks is not None else [torch.ones(len(w), dtype=torch.bool) for w in weights[side]]
        kept = [w[m] for w, m in zip(weights[side], side_masks) if len(w)]
        flat = torch.cat(kept) if kept else torch.zeros(0)
        if len(flat):
            metrics[f"weights/mean_{side}"] = float(flat.mean())
            metrics[f"weights/std_{side}"] = float(flat.std()) if len(flat) > 1 else 0.0
    return metrics


def signed_weights(weights: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """The weights as the loss uses them, oriented so that larger = better token: chosen w − 1
    (up-weighting a chosen token pushes it up), rejected 1 − w (up-weighting a rejected token
    pushes it down). Spearman/AUROC of these against the true token rewards."""
    return {side: [SIGN[side] * (w - 1.0) for w in weights[side]] for side in SIDES}
