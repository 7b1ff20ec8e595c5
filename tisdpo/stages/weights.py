"""Token-weight stage: estimator models -> per-token scores -> transform -> weights on the examples.

Offline estimators (prompt, sft_pair, dpo_pair, oracle, random, uniform) attach ``chosen_weights`` /
``rejected_weights`` (aligned with ``*_input_ids``) to every tokenised training example. As the
authors' released code, prompt positions and the final EOS get weight 0 (``estimator.weight_eos``:
true estimates EOS like any token); the transform ranks/rescales the other response tokens only.

Diagnostics, on the weights the loss sees: ``weights/mean_{side}`` and ``weights/std_{side}`` over
the response tokens that carry weight, ``weights/bound_fraction`` (share of those at a transform
bound), ``weights/spearman_{side}`` / ``weights/auroc_{side}`` of the final weights signed as the
loss uses them (chosen w − 1, rejected 1 − w) against the true token rewards; the raw scores'
versions under ``weights/raw/``. The estimator models and the scores are cached artifacts; the transform is
cheap and recomputed, so a sweep over transforms reuses the scores. The gradient estimator
(TI-DPO) is online: it returns a hook the training step calls instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.eval.gradient_weight_quality import GradientWeightQuality
from tisdpo.eval.weight_quality import quality_metrics, true_token_rewards
from tisdpo.models.loading import build_model
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages.data import PreparedData
from tisdpo.stages.estimator_models import train_pair
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.stages.start_models import initial_model_identity, stage_device
from tisdpo.weights.estimators import (PAIR_ESTIMATORS, contrast_scores, contrastive_rows, oracle_scores,
                                      response_lengths, weighted_token_masks)
from tisdpo.weights.gradient import GradientWeights
from tisdpo.kernels.scoring import response_logps
from tisdpo.weights.transforms import TRANSFORMS, at_bound
from tisdpo.weights.views import write_weight_views

log = logging.getLogger(__name__)
SIGN = {"chosen": 1, "rejected": -1}


@dataclass
class TokenWeighting:
    """What the weights stage hands to training: the examples (with offline weights attached), or
    the online hook that weights each batch (TI-DPO); its metrics; callbacks that monitor the
    online weights during training."""

    train_examples: list[dict]
    metrics: dict[str, Any] = field(default_factory=dict)
    online_weights: Callable | None = None
    monitors: list = field(default_factory=list)


def tokenization_key(cfg: DictConfig) -> dict[str, Any]:
    keys = ("max_length", "max_prompt_length", "truncation_mode", "chat_template")
    return {k: cfg.dataset.get(k) for k in keys}


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


def weights_stage(cfg: DictConfig, data: PreparedData, sft_dir: Path | None, cache: ArtifactCache,
                  output_dir: Path, train_examples: list[dict]) -> TokenWeighting:
    name = cfg.estimator.name
    if name == "none":
        return TokenWeighting(train_examples)
    if name == "gradient":
        return gradient_weighting(cfg, data, train_examples)

    est = cfg.estimator
    lengths = {side: response_lengths(train_examples, side) for side in SIDES}
    masks = {side: weighted_token_masks(train_examples, side, data.tokenizer.eos_token_id,
                                        weight_eos=bool(est.get("weight_eos", False))) for side in SIDES}
    scores = None
    if name == "uniform":
        weights = {side: [m.float() for m in masks[side]] for side in SIDES}
    elif name == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        low, high = float(est.low), float(est.high)
        weights = {side: [(low + (high - low) * torch.rand(n, generator=generator)) * m
                          for n, m in zip(lengths[side], masks[side])] for side in SIDES}
    else:
        scores = oracle_weight_scores(data, train_examples, lengths) if name == "oracle" else \
            estimator_scores(cfg, data, sft_dir, cache, train_examples)
        weights = {side: apply_transform(scores[side], side, est.transform, masks[side]) for side in SIDES}

    metrics = weight_summary(weights, masks)
    metrics["weights/bound_fraction"] = bound_fraction(scores, masks, est.transform) if scores is not None else 0.0
    # Weight quality against the true token rewards, on the weights the loss sees; the estimator's
    # raw scores (before the transform) under weights/raw/.
    metrics.update(quality_metrics(data.train_rows, train_examples, signed_weights(weights)))
    if scores is not None:
        metrics.update(quality_metrics(data.train_rows, train_examples, scores, prefix="weights/raw"))
    for key, value in metrics.items():
        log.info("%s = %.4f", key, value)

    write_weight_views(output_dir, data.tokenizer, train_examples, weights, scores,
                       true_rewards={s: true_token_rewards(data.train_rows, train_examples, s) for s in SIDES})
    return TokenWeighting(attach_weights(train_examples, weights), metrics)


def oracle_weight_scores(data: PreparedData, train_examples: list[dict],
                         lengths: dict[str, list[int]]) -> dict[str, list[torch.Tensor]]:
    """estimator=oracle: the built-in task's true token rewards as the scores (refuses on real data)."""
    truth = {side: true_token_rewards(data.train_rows, train_examples, side) for side in SIDES}
    if data.task is None or any(t is None for t in truth.values()):
        raise ValueError("estimator=oracle needs true token rewards, which only the built-in task has "
                         "(dataset=synthetic or a synthetic_* variant); use prompt, sft_pair or dpo_pair on real data")
    return {side: oracle_scores(truth[side], lengths[side]) for side in SIDES}


def gradient_weighting(cfg: DictConfig, data: PreparedData, train_examples: list[dict]) -> TokenWeighting:
    """TI-DPO: weights computed online from the current policy (estimator=gradient), monitored
    against the true token rewards on the built-in task."""
    est = cfg.estimator
    weights = GradientWeights(lam=float(est.lam), normalize=str(est.normalize),
                              weight_eos=bool(est.get("weight_eos", True)), eos_token_id=data.tokenizer.eos_token_id)
    monitors = []
    if data.task is not None and int(est.get("quality_every_n_steps") or 0) > 0:
        monitors.append(GradientWeightQuality(weights, data.train_rows, train_examples, data.tokenizer.pad_token_id,
                                              every_n_steps=int(est.quality_every_n_steps)))
    return TokenWeighting(train_examples, online_weights=weights, monitors=monitors)


def estimator_scores(cfg: DictConfig, data: PreparedData, sft_dir: Path | None, cache: ArtifactCache,
                     train_examples: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Train (or reuse) the estimator's models, then score (or reuse) every training response."""
    est = cfg.estimator
    upstream = initial_model_identity(cfg, sft_dir)
    models_dir = None
    if est.name in PAIR_ESTIMATORS:
        models_key = {
            "estimator": {k: v for k, v in OmegaConf.to_container(est, resolve=True).items()
                          if k not in ("transform", "score_batch_size", "weight_eos")},
            "upstream": upstream, "data": data.fingerprint, "tokenization": tokenization_key(cfg),
            "trainer": {"precision": cfg.trainer.get("precision")}, "seed": cfg.seed,
        }
        models_dir = cache.get_or_build(
            "estimator", models_key,
            lambda out: train_pair(cfg, out=out, sft_dir=sft_dir, train_rows=data.train_rows,
                                   train_examples=train_examples, tokenizer=data.tokenizer),
            device=stage_device(cfg), collective=True,  # pi+/pi- train with the run's strategy, on every rank
        ).path
    scores_key = {
        "estimator": est.name,
        "models": models_dir.name if models_dir else upstream,
        "prompts": [est.get("positive_prompt"), est.get("negative_prompt"), est.get("template")] if est.name == "prompt" else None,
        "data": data.fingerprint, "tokenization": tokenization_key(cfg), "seed": cfg.seed,
    }

    def build(out: Path) -> None:
        torch.save(score_examples(cfg, models_dir, sft_dir, data, train_examples), out / "scores.pt")

    artifact = cache.get_or_build("scores", scores_key, build, device=stage_device(cfg))
    return torch.load(artifact.path / "scores.pt")


def score_examples(cfg: DictConfig, models_dir: Path | None, sft_dir: Path | None, data: PreparedData,
                   train_examples: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Load the estimator's model(s) and inputs, then score every training response (``contrast_scores``)."""
    est = cfg.estimator
    lengths = {s: response_lengths(train_examples, s) for s in SIDES}
    pad, batch = data.tokenizer.pad_token_id, int(est.score_batch_size)
    device = stage_device(cfg)  # scoring is a batched no-grad forward: on the accelerator
    if est.name == "prompt":
        if sft_dir is None and not cfg.model.get("name_or_path"):
            raise ValueError("estimator=prompt needs a trained model: enable the SFT stage or give model.name_or_path")
        model = build_model(name_or_path=str(sft_dir or cfg.model.name_or_path), dtype=cfg.model.get("dtype")).to(device)
        pos_rows, neg_rows = contrastive_rows(data.train_rows, task=data.task, template=est.get("template"),
                                              positive_prompt=est.get("positive_prompt"),
                                              negative_prompt=est.get("negative_prompt"))
        pos_examples, _ = tokenize_pairs(pos_rows, data.tokenizer, cfg.dataset, "prompt+")
        neg_examples, _ = tokenize_pairs(neg_rows, data.tokenizer, cfg.dataset, "prompt-")
        if len(pos_examples) != len(train_examples) or len(neg_examples) != len(train_examples):
            raise ValueError(
                "estimator=prompt: adding the system prompts made some responses fully truncated; "
                "raise dataset.max_length or shorten estimator.positive_prompt/negative_prompt"
            )
        positive = response_logps(model, pos_examples, pad, batch)
        negative = response_logps(model, neg_examples, pad, batch)
        return contrast_scores(positive, negative, lengths)
    # One model in memory at a time (two 7B models would not fit beside each other on many hosts).
    def load(side: str):
        return build_model(name_or_path=str(models_dir / side), dtype=cfg.model.get("dtype")).to(device)

    positive = response_logps(load("positive"), train_examples, pad, batch)
    negative = response_logps(load("negative"), train_examples, pad, batch)
    return contrast_scores(positive, negative, lengths)
