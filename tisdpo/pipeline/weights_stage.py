"""Token-weight stage: estimator models -> per-token scores -> transform -> weights on the examples.

Offline estimators (prompt, sft_pair, dpo_pair, random, uniform) attach ``chosen_weights`` /
``rejected_weights`` (aligned with ``*_input_ids``, 1.0 on prompt positions) to every tokenised
training example. The estimator models and the scores are cached artifacts; the transform is
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
from tisdpo.pipeline.cache import ArtifactCache
from tisdpo.pipeline.data_stage import PreparedData
from tisdpo.pipeline.estimator_models import train_pair
from tisdpo.pipeline.loaders import tokenize_pairs
from tisdpo.pipeline.models import initial_model_identity, stage_device
from tisdpo.weights.estimators import PAIR_ESTIMATORS, contrast_scores, contrastive_rows, response_lengths
from tisdpo.weights.gradient import GradientWeights
from tisdpo.weights.scoring import response_logps
from tisdpo.weights.transforms import TRANSFORMS
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


def apply_transform(scores: list[torch.Tensor], side: str, transform_cfg: DictConfig) -> list[torch.Tensor]:
    name = transform_cfg.name
    if name not in TRANSFORMS:
        raise ValueError(f"estimator.transform.name={name!r} is not one of {sorted(TRANSFORMS)}")
    params = OmegaConf.to_container(transform_cfg.get(name) or {}, resolve=True)
    fn = TRANSFORMS[name]
    return [fn(r, sign=SIGN[side], **params) if len(r) else r for r in scores]


def attach_weights(examples: list[dict], weights: dict[str, list[torch.Tensor]]) -> list[dict]:
    """Copies of the examples with per-position weights (1.0 on prompt positions)."""
    out = []
    for i, example in enumerate(examples):
        example = dict(example)
        for side in SIDES:
            w = iter(weights[side][i].tolist())
            example[f"{side}_weights"] = [1.0 if label == IGNORE_INDEX else next(w) for label in example[f"{side}_labels"]]
        out.append(example)
    return out


def weight_summary(weights: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    metrics = {}
    for side in SIDES:
        flat = torch.cat([w for w in weights[side] if len(w)]) if weights[side] else torch.zeros(0)
        if len(flat):
            metrics[f"weights/mean_{side}"] = float(flat.mean())
            metrics[f"weights/std_{side}"] = float(flat.std()) if len(flat) > 1 else 0.0
    return metrics


def weights_stage(cfg: DictConfig, data: PreparedData, sft_dir: Path | None, cache: ArtifactCache,
                  output_dir: Path, train_examples: list[dict]) -> TokenWeighting:
    name = cfg.estimator.name
    if name == "none":
        return TokenWeighting(train_examples)
    if name == "gradient":
        return gradient_weighting(cfg, data, train_examples)

    lengths = {side: response_lengths(train_examples, side) for side in SIDES}
    scores = None
    if name == "uniform":
        weights = {side: [torch.ones(n) for n in lengths[side]] for side in SIDES}
    elif name == "random":
        generator = torch.Generator().manual_seed(cfg.seed)
        low, high = float(cfg.estimator.low), float(cfg.estimator.high)
        weights = {side: [low + (high - low) * torch.rand(n, generator=generator) for n in lengths[side]] for side in SIDES}
    else:
        scores = estimator_scores(cfg, data, sft_dir, cache, train_examples)
        weights = {side: apply_transform(scores[side], side, cfg.estimator.transform) for side in SIDES}

    metrics = weight_summary(weights)
    # Weight quality against the true token rewards: the estimator's raw scores when it has
    # them; for random/uniform the weights themselves (signed by side, as the loss sees them).
    signed = scores or {side: [SIGN[side] * (w - 1.0) for w in weights[side]] for side in SIDES}
    metrics.update(quality_metrics(data.train_rows, train_examples, signed))
    for key, value in metrics.items():
        log.info("%s = %.4f", key, value)

    write_weight_views(output_dir, data.tokenizer, train_examples, weights, scores,
                       true_rewards={s: true_token_rewards(data.train_rows, train_examples, s) for s in SIDES})
    return TokenWeighting(attach_weights(train_examples, weights), metrics)


def gradient_weighting(cfg: DictConfig, data: PreparedData, train_examples: list[dict]) -> TokenWeighting:
    """TI-DPO: weights computed online from the current policy (estimator=gradient), monitored
    against the true token rewards on the built-in task."""
    est = cfg.estimator
    weights = GradientWeights(lam=float(est.lam), normalize=str(est.normalize))
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
                          if k not in ("transform", "score_batch_size")},
            "upstream": upstream, "data": data.fingerprint, "tokenization": tokenization_key(cfg),
            "trainer": {"precision": cfg.trainer.get("precision")}, "seed": cfg.seed,
        }
        models_dir = cache.get_or_build(
            "estimator", models_key,
            lambda out: train_pair(cfg, out=out, sft_dir=sft_dir, train_rows=data.train_rows,
                                   train_examples=train_examples, tokenizer=data.tokenizer),
            device=stage_device(cfg),
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
