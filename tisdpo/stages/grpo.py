"""GRPO training stage (online): the policy, initialised from the SFT model, samples G completions per
training prompt every step and learns from their group-relative rewards against a frozen reference.

The reward (``loss.reward``; ``auto``, the default: ``task`` on the built-in task, else ``reward_model``):
- ``task``: the built-in task's TRUE sequence reward Σ_t r(topic, y_t) (``SyntheticTask.sequence_reward``),
  the quantity the eval stage reports as ``eval/true_reward`` (dataset=synthetic only);
- ``reward_model``: a reward-model judge (``tisdpo.eval.judges.RewardModelJudge``) built from
  ``loss.reward_model`` (its keyword arguments: ``model_name_or_path``, ``template``, ...), for real data.
Training prompts are the training pairs' prompts (deduplicated, in order), formatted and tokenised as
the preference stages see them (prompt template, chat template, truncation to ``dataset.max_prompt_length``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.checks import ConfigError
from tisdpo.eval.judges.reward_model import RewardModelJudge
from tisdpo.losses.record import BoundLoss
from tisdpo.modules.grpo import GRPOModule, PromptCollator
from tisdpo.runtime.callbacks import RNGStateCallback, SignalCheckpoint, VerifiedCheckpoint
from tisdpo.runtime.checkpoints import CHECKPOINT_DIR
from tisdpo.runtime.fit import accumulation, fit_stage, optimizer_steps, world_size
from tisdpo.runtime.run_dir import train_checkpoint
from tisdpo.runtime.sharded import reference_placement
from tisdpo.stages.context import RunContext
from tisdpo.stages.loaders import ResumableDataLoader, format_prompt

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[float]]


def task_reward(task) -> RewardFn:
    """The built-in task's true sequence reward of each response (words split on whitespace; a
    special or non-response token costs the task's ``invalid_token_reward``, as in evaluation)."""
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(task.sequence_reward(task.topic_of(p), r.split())) for p, r in zip(prompts, responses)]
    return reward


def build_reward(loss_cfg: DictConfig, task) -> tuple[RewardFn, bool]:
    """(reward function, whether responses are decoded without special tokens) from ``loss.reward``."""
    kind = str(loss_cfg.get("reward", "auto"))
    if kind == "auto":  # the true reward where there is one (the built-in task), else the reward model
        kind = "task" if task is not None else "reward_model"
    if kind == "task":
        if task is None:
            raise ConfigError("loss.reward=task scores completions with the built-in task's true reward: it needs "
                              "dataset=synthetic (for real data: loss.reward=reward_model)")
        return task_reward(task), False  # special tokens stay in the text: the task scores them as gibberish
    if kind == "reward_model":
        options: dict[str, Any] = OmegaConf.to_container(loss_cfg.reward_model, resolve=True)
        options.pop("_target_", None)
        judge = RewardModelJudge(**options)
        return judge.score, True
    raise ConfigError(f"loss.reward={kind!r} is not one of auto, task, reward_model")


def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def tokenize_prompts(prompts: Sequence[str], tokenizer, dataset_cfg: DictConfig) -> list[dict]:
    """``{"prompt" (as given: the reward scores it), "prompt_input_ids", "index"}`` per prompt, tokenised
    as generation sees a prompt: template applied, special tokens added (BOS for Llama-style
    tokenizers), cut to ``dataset.max_prompt_length`` from the side ``dataset.truncation_mode`` drops."""
    limit = int(dataset_cfg.max_prompt_length)
    keep_end = str(dataset_cfg.get("truncation_mode", "keep_end")) == "keep_end"
    chat = bool(dataset_cfg.get("chat_template", False))
    examples = []
    for index, prompt in enumerate(prompts):
        text = format_prompt(prompt, dataset_cfg)
        if chat:  # the template writes any BOS it wants as text
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
        ids = list(tokenizer(text, add_special_tokens=not chat)["input_ids"])
        if len(ids) > limit:
            bos = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
            ids = bos + ids[len(ids) - (limit - len(bos)):] if keep_end else ids[:limit]
        if ids:
            examples.append({"prompt": prompt, "prompt_input_ids": ids, "index": index})
    return examples


def grpo_stage(
    ctx: RunContext,
    loss: BoundLoss,
    *,
    policy,
    reference,
    logger=None,
    callbacks: list | None = None,
    max_new_tokens: int | None = None,
) -> tuple[GRPOModule, dict[str, float]]:
    """Fit the GRPO module on the run's training prompts; returns it and its last training metrics
    (``train/reward/mean``, ``train/kl``, ...). ``max_new_tokens``: the sampling cap when
    ``loss.max_new_tokens`` is null (the runner passes the eval stage's: the longest training
    response, EOS included)."""
    cfg, tokenizer, output_dir = ctx.cfg, ctx.tokenizer, ctx.output_dir
    prompts: Sequence[str] = [row["prompt"] for row in ctx.data.train_rows]
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    lc = cfg.loss
    reward_fn, skip_special = build_reward(lc, ctx.data.task)
    cap = lc.get("max_new_tokens") or max_new_tokens
    if not cap:
        raise ConfigError("loss.max_new_tokens=null and no default cap was given: set loss.max_new_tokens")
    examples = tokenize_prompts(unique(prompts), tokenizer, cfg.dataset)
    if not examples:
        raise ConfigError("GRPO has no training prompts (every prompt was empty after tokenisation)")
    world = world_size(cfg.trainer)
    batch_size = int(cfg.train.batch_size)  # prompts per micro-batch; x loss.group_size completions
    accumulate = accumulation(batch_size, int(cfg.train.grad_accum), cfg.train.get("global_batch_size"), world)
    max_steps = optimizer_steps(cfg.train.get("max_steps"), cfg.train.get("epochs"), len(examples), batch_size,
                                world, accumulate)
    group = int(lc.group_size)
    log.info("GRPO: %d optimiser steps of %d prompts x %d completions (%d prompts per device x %d device(s) x %d "
             "accumulated), up to %d new tokens, reward=%s", max_steps, batch_size * world * accumulate, group,
             batch_size, world, accumulate, int(cap), lc.get("reward", "auto"))
    module = GRPOModule(
        policy, reference, loss, cfg.optim, tokenizer, reward_fn, group_size=group, max_new_tokens=int(cap),
        temperature=float(lc.get("temperature", 1.0)), top_k=lc.get("top_k"), top_p=lc.get("top_p"),
        advantage_eps=float(lc.get("advantage_eps", 1e-4)), unfinished=str(lc.get("unfinished", "keep")),
        unfinished_reward=float(lc.get("unfinished_reward", -3.0)),
        skip_special_tokens=skip_special, total_steps=max_steps,
        logits_chunk_size=int(cfg.train.logits_chunk_size), check_finite=bool(cfg.train.check_finite),
    )
    loader = ResumableDataLoader(
        examples, batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(int(cfg.seed)), num_workers=int(cfg.train.num_workers),
        collate_fn=PromptCollator(module.pad_token_id), drop_last=len(examples) >= batch_size,
    )
    checkpoint = VerifiedCheckpoint(
        dirpath=output_dir / CHECKPOINT_DIR, every_n_train_steps=int(cfg.checkpoint.every_n_steps),
        save_last=True, save_top_k=-1 if cfg.checkpoint.get("keep_all") else 1, save_weights_only=False,
    )
    trainer = fit_stage(
        cfg.trainer, module, loader, max_steps=max_steps, val_loader=None,
        ckpt_path=train_checkpoint(cfg, output_dir), logger=logger, default_root_dir=str(output_dir),
        callbacks=[checkpoint, RNGStateCallback(), SignalCheckpoint(output_dir / CHECKPOINT_DIR),
                   *reference_placement(cfg, reference), *(callbacks or [])],
        accumulate_grad_batches=accumulate, model=policy,
        gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing")),
    )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return module, metrics
