"""TIS-DPO token-weight estimators: contrastive model pairs and their per-token scores.

    prompt   (TIS-DPO(P)): r_t = log pi(y_t | p+, x, y<t) - log pi(y_t | p-, x, y<t), one model
    sft_pair (TIS-DPO(S)): r_t = log pi+(y_t | x, y<t) - log pi-(y_t | x, y<t),
                           pi+ = SFT on chosen, pi- = SFT on rejected (from the base model)
    dpo_pair (TIS-DPO(D)): same r_t, pi+ = DPO on the data, pi- = DPO on the swapped data (from SFT)
    random / uniform     : no models; w ~ U(low, high) or w = 1

Scores are ragged: one 1-D tensor per response with one value per response token (EOS included),
in the order of the tokenised training examples.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.losses import dpo_loss
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import LossSpec, PreferenceModule
from tisdpo.weights.scoring import response_logps

log = logging.getLogger(__name__)

PAIR_ESTIMATORS = ("sft_pair", "dpo_pair")
MODEL_ESTIMATORS = ("prompt", *PAIR_ESTIMATORS)


def swap_pair(example: dict) -> dict:
    """The example with chosen and rejected exchanged (the data pi- is trained on)."""
    swapped = dict(example)
    for key in ("input_ids", "labels", "attention_mask", "weights"):
        if f"chosen_{key}" in example:
            swapped[f"chosen_{key}"], swapped[f"rejected_{key}"] = example[f"rejected_{key}"], example[f"chosen_{key}"]
    return swapped


def train_dpo_model(cfg: DictConfig, init_dir: Path, examples: list[dict], tokenizer, *, seed: int,
                    checkpoint_dir: Path | None = None):
    """A DPO model trained from ``init_dir`` on ``examples`` with the estimator's settings
    (checkpointed in, and resumed from, ``checkpoint_dir`` when given)."""
    from tisdpo.pipeline.loaders import build_trainer, preference_loader
    from tisdpo.pipeline.resume import stage_checkpointing, stage_every_n_steps

    est = cfg.estimator
    L.seed_everything(seed, workers=True, verbose=False)
    policy = build_model(name_or_path=str(init_dir), dtype=cfg.model.get("dtype"))
    spec = LossSpec("dpo", functools.partial(dpo_loss, beta=float(est.beta)))
    module = PreferenceModule(policy, frozen_copy(policy), spec, est.optim, total_steps=int(est.max_steps),
                              logits_chunk_size=int(cfg.train.logits_chunk_size))
    callbacks, resume_from = stage_checkpointing(checkpoint_dir, stage_every_n_steps(cfg))
    trainer = build_trainer(cfg.trainer, max_steps=int(est.max_steps), logger=False,
                            enable_checkpointing=bool(callbacks), callbacks=callbacks,
                            limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, preference_loader(examples, tokenizer, int(est.batch_size), shuffle=True, seed=seed),
                ckpt_path=resume_from)
    return policy


def train_sft_model(cfg: DictConfig, init, rows: list[dict], tokenizer, *, seed: int,
                    checkpoint_dir: Path | None = None):
    """An SFT model trained from ``init`` on {prompt, response} rows with the estimator's settings."""
    from tisdpo.pipeline.loaders import tokenize_sft
    from tisdpo.pipeline.sft_stage import train_sft

    est = cfg.estimator
    sft_cfg = OmegaConf.merge(cfg, {"sft": {"optim": OmegaConf.to_container(est.optim, resolve=True),
                                            "batch_size": int(est.batch_size)}})
    examples = tokenize_sft(rows, tokenizer, cfg.dataset, int(cfg.sft.max_length))
    return train_sft(init, examples, tokenizer, sft_cfg, max_steps=int(est.max_steps), seed=seed,
                     checkpoint_dir=checkpoint_dir)


def train_pair(cfg: DictConfig, *, out: Path, sft_dir: Path | None, train_rows: list[dict],
               train_examples: list[dict], tokenizer) -> None:
    """Write pi+ to out/positive and pi- to out/negative.

    ``out`` is the artifact's stable build dir: each model checkpoints in out/_resume/<side> and is
    marked done once saved, so a killed build resumes where it stopped (pi+ is not trained again)."""
    from tisdpo.pipeline.cache import RESUME_SUBDIR

    name = cfg.estimator.name
    work = out / RESUME_SUBDIR
    if name == "dpo_pair":
        if sft_dir is None:
            raise ValueError("estimator=dpo_pair starts from an SFT model: the SFT stage was skipped and no checkpoint is on disk")
        trainers = {
            "positive": lambda: train_dpo_model(cfg, sft_dir, train_examples, tokenizer, seed=cfg.seed,
                                                checkpoint_dir=work / "positive"),
            "negative": lambda: train_dpo_model(cfg, sft_dir, [swap_pair(e) for e in train_examples], tokenizer,
                                                seed=cfg.seed + 1, checkpoint_dir=work / "negative"),
        }
    elif name == "sft_pair":
        from tisdpo.pipeline.sft_stage import base_model

        def init():
            if cfg.estimator.init == "sft" and sft_dir is not None:
                return build_model(name_or_path=str(sft_dir), dtype=cfg.model.get("dtype"))
            return base_model(cfg, tokenizer)

        def sft_side(side: str, key: str, offset: int):
            rows = [{"prompt": r["prompt"], "response": r[key]} for r in train_rows]
            return lambda: train_sft_model(cfg, init(), rows, tokenizer, seed=cfg.seed + offset,
                                           checkpoint_dir=work / side)

        trainers = {side: sft_side(side, key, offset)
                    for side, key, offset in (("positive", "chosen", 0), ("negative", "rejected", 1))}
    else:
        raise ValueError(f"estimator={name} trains no model pair")
    for side, train in trainers.items():
        done = work / f"{side}.done"
        if done.is_file():
            log.info("estimator %s: pi %s already trained by the interrupted build", name, side)
            continue
        train().save_pretrained(out / side)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()


def _difference(positive: list[torch.Tensor], negative: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """r = positive - negative, cut or zero-padded to each training response's length.

    Lengths differ only for the prompt estimator, where a longer system prompt can truncate
    the response further; the missing tail then carries no evidence (r = 0)."""
    scores = []
    for pos, neg, n in zip(positive, negative, lengths):
        m = min(len(pos), len(neg), n)
        r = torch.zeros(n)
        r[:m] = pos[:m] - neg[:m]
        scores.append(r)
    return scores


def response_lengths(examples: list[dict], side: str) -> list[int]:
    return [sum(1 for label in e[f"{side}_labels"] if label != -100) for e in examples]


def contrastive_rows(cfg: DictConfig, rows: list[dict], task) -> tuple[list[dict], list[dict]]:
    """The training rows with the positive and with the negative system prompt."""
    est = cfg.estimator
    if task is not None:
        pairs = [task.contrastive_prompts(r["prompt"]) for r in rows]
    else:
        pairs = [(est.template.format(system=est.positive_prompt, prompt=r["prompt"]),
                  est.template.format(system=est.negative_prompt, prompt=r["prompt"])) for r in rows]
    positive = [{**r, "prompt": p} for r, (p, _) in zip(rows, pairs)]
    negative = [{**r, "prompt": n} for r, (_, n) in zip(rows, pairs)]
    return positive, negative


def score_examples(cfg: DictConfig, *, models_dir: Path | None, sft_dir: Path | None, train_rows: list[dict],
                   train_examples: list[dict], tokenizer, task) -> dict[str, list[torch.Tensor]]:
    """{"chosen": [...], "rejected": [...]} per-token scores r_t for every training response."""
    from tisdpo.pipeline.loaders import tokenize_pairs

    est = cfg.estimator
    batch = int(est.score_batch_size)
    pad = tokenizer.pad_token_id
    lengths = {s: response_lengths(train_examples, s) for s in ("chosen", "rejected")}
    if est.name == "prompt":
        if sft_dir is None and not cfg.model.get("name_or_path"):
            raise ValueError("estimator=prompt needs a trained model: enable the SFT stage or give model.name_or_path")
        model = build_model(name_or_path=str(sft_dir or cfg.model.name_or_path), dtype=cfg.model.get("dtype"))
        pos_rows, neg_rows = contrastive_rows(cfg, train_rows, task)
        pos_examples, _ = tokenize_pairs(pos_rows, tokenizer, cfg.dataset, "prompt+")
        neg_examples, _ = tokenize_pairs(neg_rows, tokenizer, cfg.dataset, "prompt-")
        if len(pos_examples) != len(train_examples) or len(neg_examples) != len(train_examples):
            raise ValueError(
                "estimator=prompt: adding the system prompts made some responses fully truncated; "
                "raise dataset.max_length or shorten estimator.positive_prompt/negative_prompt"
            )
        positive = response_logps(model, pos_examples, pad, batch)
        negative = response_logps(model, neg_examples, pad, batch)
    else:
        positive = response_logps(build_model(name_or_path=str(models_dir / "positive")), train_examples, pad, batch)
        negative = response_logps(build_model(name_or_path=str(models_dir / "negative")), train_examples, pad, batch)
    return {side: _difference(positive[i], negative[i], lengths[side]) for i, side in enumerate(("chosen", "rejected"))}
