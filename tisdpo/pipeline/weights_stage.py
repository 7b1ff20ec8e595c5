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

from tisdpo.pipeline.cache import ArtifactCache
from tisdpo.pipeline.data import PreparedData
from tisdpo.weights.estimators import PAIR_ESTIMATORS, response_lengths, score_examples, train_pair
from tisdpo.weights.transforms import TRANSFORMS

log = logging.getLogger(__name__)
SIDES = ("chosen", "rejected")
SIGN = {"chosen": 1, "rejected": -1}


@dataclass
class WeightedData:
    train_examples: list[dict]
    metrics: dict[str, Any] = field(default_factory=dict)
    callbacks: list = field(default_factory=list)
    online_weights: Callable | None = None
    auxiliary_loss: Callable | None = None


def tokenization_spec(cfg: DictConfig) -> dict[str, Any]:
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
            example[f"{side}_weights"] = [1.0 if label == -100 else next(w) for label in example[f"{side}_labels"]]
        out.append(example)
    return out


def true_token_rewards(rows: list[dict], examples: list[dict], side: str) -> list[list[float]] | None:
    """The built-in task's true reward of each response token (None on real data)."""
    rewards = []
    for example in examples:
        meta = rows[example["index"]].get("meta") or {}
        key = f"{side}_token_rewards"
        if meta.get("label_flipped"):  # the rows were swapped after generation; the meta was not
            key = f"{'rejected' if side == 'chosen' else 'chosen'}_token_rewards"
        if key not in meta:
            return None
        rewards.append(list(meta[key]))
    return rewards


def quality_metrics(rows, examples, scores: dict[str, list[torch.Tensor]], prefix: str = "weights",
                    target: str = "signed") -> dict[str, float]:
    from tisdpo.eval.weight_quality import weight_quality

    metrics: dict[str, float] = {}
    for side in SIDES:
        truth = true_token_rewards(rows, examples, side)
        if truth is None:
            return {}
        metrics.update(weight_quality([s.tolist() for s in scores[side]], truth, prefix=prefix, side=side, target=target))
    return metrics


def weight_summary(weights: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    metrics = {}
    for side in SIDES:
        flat = torch.cat([w for w in weights[side] if len(w)]) if weights[side] else torch.zeros(0)
        if len(flat):
            metrics[f"weights/mean_{side}"] = float(flat.mean())
            metrics[f"weights/std_{side}"] = float(flat.std()) if len(flat) > 1 else 0.0
    return metrics


def _save_scores(path: Path, scores: dict[str, list[torch.Tensor]]) -> None:
    torch.save(scores, path / "scores.pt")


def weights_stage(cfg: DictConfig, data: PreparedData, sft_dir: Path | None, cache: ArtifactCache,
                  output_dir: Path, train_examples: list[dict]) -> WeightedData:
    weighted = token_weights(cfg, data, sft_dir, cache, output_dir, train_examples)
    if cfg.loss.name == "tidpo":
        from tisdpo.weights.gradient import build_triplet

        weighted.auxiliary_loss = build_triplet(cfg, data.tokenizer)
    return weighted


def token_weights(cfg: DictConfig, data: PreparedData, sft_dir: Path | None, cache: ArtifactCache,
                  output_dir: Path, train_examples: list[dict]) -> WeightedData:
    name = cfg.estimator.name
    if name == "none":
        return WeightedData(train_examples)
    if name == "gradient":
        from tisdpo.weights.gradient import gradient_weight_hooks

        return gradient_weight_hooks(cfg, data, train_examples)

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

    from tisdpo.weights.views import write_weight_views

    write_weight_views(output_dir, data.tokenizer, train_examples, weights, scores,
                       true_rewards={s: true_token_rewards(data.train_rows, train_examples, s) for s in SIDES})
    return WeightedData(attach_weights(train_examples, weights), metrics)


def estimator_scores(cfg: DictConfig, data: PreparedData, sft_dir: Path | None, cache: ArtifactCache,
                     train_examples: list[dict]) -> dict[str, list[torch.Tensor]]:
    """Train (or reuse) the estimator's models, then score (or reuse) every training response."""
    est = cfg.estimator
    upstream = {"sft": sft_dir.name if sft_dir is not None else None,
                "base": cfg.model.get("name_or_path"), "model_config": OmegaConf.to_container(cfg.model.config, resolve=True)
                if cfg.model.get("config") else None}
    models_dir = None
    if est.name in PAIR_ESTIMATORS:
        model_spec = {
            "estimator": {k: v for k, v in OmegaConf.to_container(est, resolve=True).items()
                          if k not in ("transform", "score_batch_size")},
            "upstream": upstream, "data": data.fingerprint, "tokenization": tokenization_spec(cfg),
            "trainer": {"precision": cfg.trainer.get("precision")}, "seed": cfg.seed,
        }
        models_dir = cache.get_or_build(
            "estimator",
            model_spec,
            lambda out: train_pair(cfg, out=out, sft_dir=sft_dir, train_rows=data.train_rows,
                                   train_examples=train_examples, tokenizer=data.tokenizer),
        ).path
    score_spec = {
        "estimator": est.name,
        "models": models_dir.name if models_dir else upstream,
        "prompts": [est.get("positive_prompt"), est.get("negative_prompt"), est.get("template")] if est.name == "prompt" else None,
        "data": data.fingerprint, "tokenization": tokenization_spec(cfg), "seed": cfg.seed,
    }

    def build(out: Path) -> None:
        _save_scores(out, score_examples(cfg, models_dir=models_dir, sft_dir=sft_dir, train_rows=data.train_rows,
                                         train_examples=train_examples, tokenizer=data.tokenizer, task=data.task))

    artifact = cache.get_or_build("scores", score_spec, build)
    return torch.load(artifact.path / "scores.pt")
