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
cheap and recomputed, so a sweep over transforms reuses the scores. An online estimator (TI-DPO's
gradient) returns a hook the training step calls instead. Which estimator does what is its record
(``tisdpo/weights/estimators/<name>.py``); this stage only serves and caches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from tisdpo.constants import SIDES
from tisdpo.eval.gradient_weight_quality import GradientWeightQuality
from tisdpo.eval.weight_quality import quality_metrics, true_token_rewards
from tisdpo.kernels.scoring import response_logps
from tisdpo.models.loading import build_model
from tisdpo.registry import estimator_record
from tisdpo.stages.context import RunContext
from tisdpo.stages.estimator_models import train_pair
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.weights.attach import apply_transform, attach_weights, bound_fraction, scores_identity, signed_weights, weight_summary
from tisdpo.weights.contrast import response_lengths, weighted_token_masks
from tisdpo.weights.estimators.record import ONLINE, EstimatorInputs, EstimatorRecord
from tisdpo.weights.views import write_weight_views

log = logging.getLogger(__name__)


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


def estimator_inputs(ctx: RunContext, train_examples: list[dict]) -> EstimatorInputs:
    """The estimator's inputs, with the stage's services: load a model, tokenise rows, score examples."""
    cfg, data, sft_dir = ctx.cfg, ctx.data, ctx.sft_dir
    est, device = cfg.estimator, ctx.device  # scoring is a batched no-grad forward: on the accelerator
    pad, batch = data.tokenizer.pad_token_id, int(est.get("score_batch_size") or 64)

    def load_model(path: Path | None):
        if path is None:  # the model training starts from: our SFT model, or the given one
            if sft_dir is None and not cfg.model.get("name_or_path"):
                raise ValueError(f"estimator={est.name} needs a trained model: enable the SFT stage or give model.name_or_path")
            path = sft_dir or cfg.model.name_or_path
        return build_model(name_or_path=str(path), dtype=cfg.model.get("dtype")).to(device)

    return EstimatorInputs(
        node=est, rows=data.train_rows, examples=train_examples, tokenizer=data.tokenizer, task=data.task, seed=int(cfg.seed),
        masks={side: weighted_token_masks(train_examples, side, data.tokenizer.eos_token_id,
                                          weight_eos=bool(est.get("weight_eos", False))) for side in SIDES},
        lengths={side: response_lengths(train_examples, side) for side in SIDES},
        load_model=load_model,
        tokenize=lambda rows, split: tokenize_pairs(rows, data.tokenizer, cfg.dataset, split)[0],
        response_logps=lambda model, examples: response_logps(model, examples, pad, batch),
    )


def weights_stage(ctx: RunContext, train_examples: list[dict]) -> TokenWeighting:
    cfg, data = ctx.cfg, ctx.data
    est = cfg.estimator
    record: EstimatorRecord = estimator_record(est.name)
    if record.kind is None:
        return TokenWeighting(train_examples)
    if record.kind == ONLINE:
        return online_weighting(ctx, record, train_examples)

    inputs = estimator_inputs(ctx, train_examples)
    scores = None
    if record.weights is not None:
        weights = record.weights(inputs)
    else:
        scores = estimator_scores(ctx, record, train_examples, inputs)
        weights = {side: apply_transform(scores[side], side, est.transform, inputs.masks[side]) for side in SIDES}

    masks = inputs.masks
    metrics = weight_summary(weights, masks)
    metrics["weights/bound_fraction"] = bound_fraction(scores, masks, est.transform) if scores is not None else 0.0
    # Weight quality against the true token rewards, on the weights the loss sees; the estimator's
    # raw scores (before the transform) under weights/raw/.
    metrics.update(quality_metrics(data.train_rows, train_examples, signed_weights(weights)))
    if scores is not None:
        metrics.update(quality_metrics(data.train_rows, train_examples, scores, prefix="weights/raw"))
    for key, value in metrics.items():
        log.info("%s = %.4f", key, value)

    write_weight_views(ctx.output_dir, data.tokenizer, train_examples, weights, scores,
                       true_rewards={s: true_token_rewards(data.train_rows, train_examples, s) for s in SIDES})
    return TokenWeighting(attach_weights(train_examples, weights), metrics)


def online_weighting(ctx: RunContext, record: EstimatorRecord, train_examples: list[dict]) -> TokenWeighting:
    """Weights computed online from the current policy (TI-DPO), monitored against the true token
    rewards on the built-in task every ``estimator.quality_every_n_steps``."""
    data = ctx.data
    hook = record.online(estimator_inputs(ctx, train_examples))
    monitors = []
    every = int(ctx.cfg.estimator.get("quality_every_n_steps") or 0)
    if data.task is not None and every > 0:
        monitors.append(GradientWeightQuality(hook, data.train_rows, train_examples, data.tokenizer.pad_token_id,
                                              every_n_steps=every))
    return TokenWeighting(train_examples, online_weights=hook, monitors=monitors)


def estimator_scores(ctx: RunContext, record: EstimatorRecord, train_examples: list[dict],
                     inputs: EstimatorInputs) -> dict[str, list[torch.Tensor]]:
    """Train (or reuse) the estimator's model pair, then score (or reuse) every training response.

    The scores' key is the estimator's whole config node (less the keys applied after scoring), so
    no option of a new estimator can be left out of it."""
    cfg, data, cache = ctx.cfg, ctx.data, ctx.cache
    est = cfg.estimator
    upstream = ctx.start_identity()
    if record.pair_models is not None:
        # keyed by what trains them (the pair kind and the training options), not by the estimator's
        # name: two estimators that score the same pi+/pi- (dpo_pair, dpo_reward) share one artifact
        models_key = {
            "pair_models": record.pair_models,
            "estimator": {k: v for k, v in scores_identity(est).items() if k != "name"},
            "upstream": upstream, "data": data.fingerprint, "tokenization": tokenization_key(cfg),
            "trainer": {"precision": cfg.trainer.get("precision")}, "seed": cfg.seed,
        }
        inputs.models_dir = cache.get_or_build(
            "estimator", models_key,
            lambda out: train_pair(cfg, record.pair_models, out=out, sft_dir=ctx.sft_dir, train_rows=data.train_rows,
                                   train_examples=train_examples, tokenizer=data.tokenizer),
            device=ctx.device, collective=True,  # pi+/pi- train with the run's strategy, on every rank
        ).path
    if not record.cache_scores:
        return record.scores(inputs)
    scores_key = {
        "estimator": scores_identity(est),
        "models": inputs.models_dir.name if inputs.models_dir else upstream,
        "data": data.fingerprint, "tokenization": tokenization_key(cfg), "seed": cfg.seed,
    }

    def build(out: Path) -> None:
        torch.save(record.scores(inputs), out / "scores.pt")

    artifact = cache.get_or_build("scores", scores_key, build, device=ctx.device)
    return torch.load(artifact.path / "scores.pt")
