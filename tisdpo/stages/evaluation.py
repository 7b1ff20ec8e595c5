"""Evaluation stage: the built-in task's true-reward metrics (real-data judges: `eval=judges`),
and the evaluations that run during preference training (the reward-vs-KL curve)."""
from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from tisdpo.eval.benchmarks import run_benchmarks
from tisdpo.eval.curve import SCHEDULES, EvalCurve
from tisdpo.eval.optimal_frontier import frontier_at, optimal_frontier
from tisdpo.eval.run_judges import evaluate_with_judges
from tisdpo.eval.synthetic_metrics import UNFINISHED_MODES, UNFINISHED_REWARD, evaluate_policy
from tisdpo.stages.data import PreparedData
from tisdpo.stages.export import POLICY_DIR
from tisdpo.stages.loaders import format_prompt
from tisdpo.runtime.validate import ConfigError

log = logging.getLogger(__name__)


def longest_response_tokens(data: PreparedData) -> int:
    """The longest chosen or rejected training response in tokens, EOS included (as training saw
    it: responses tokenised without special tokens, then EOS appended)."""
    texts = [r[side] for r in data.train_rows for side in ("chosen", "rejected")]
    if not texts:
        raise ConfigError("eval.max_new_tokens=null takes the longest training response, but there are no "
                          "training pairs; set eval.max_new_tokens")
    ids = data.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return max(len(i) for i in ids) + 1


def eval_max_new_tokens(cfg: DictConfig, data: PreparedData) -> int:
    """``eval.max_new_tokens``, or (null) the training data's longest response incl. EOS: a policy
    that writes longer than anything it was trained on cannot win by length (reward is a sum)."""
    value = cfg.eval.get("max_new_tokens")
    if value is not None:
        return int(value)
    cap = longest_response_tokens(data)
    log.info("eval.max_new_tokens=null: sampling up to %d tokens (the longest training response, EOS included)", cap)
    return cap


def _unfinished_rules(cfg: DictConfig) -> dict[str, Any]:
    mode = str(cfg.eval.get("unfinished") or "exclude")
    if mode not in UNFINISHED_MODES:
        raise ConfigError(f"eval.unfinished={mode!r} is not one of {', '.join(UNFINISHED_MODES)}")
    reward = cfg.eval.get("unfinished_reward")
    return {"unfinished": mode, "unfinished_reward": UNFINISHED_REWARD if reward is None else float(reward)}


def _whole(cfg: DictConfig, option: str, default: int, low: int) -> int:
    value = cfg.eval.get(option, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"eval.{option}={value!r} must be a whole number >= {low}")
    return value


def _curve_schedule(cfg: DictConfig) -> str:
    value = str(cfg.eval.get("curve_schedule") or "dense_start")
    if value not in SCHEDULES:
        raise ConfigError(f"eval.curve_schedule={value!r} is not one of {', '.join(SCHEDULES)}")
    return value


def check_eval_options(cfg: DictConfig) -> None:
    """The eval options config validation does not know yet (ConfigError naming the option)."""
    if cfg.get("eval") is None or not cfg.eval.get("enabled", False):
        return
    _whole(cfg, "every_n_steps", 0, 0)
    _whole(cfg, "curve_n_prompts", 256, 1)
    _curve_schedule(cfg)
    if cfg.eval.name == "synthetic":
        _unfinished_rules(cfg)


def training_evaluators(cfg: DictConfig, data: PreparedData, reference) -> list[Callback]:
    """Callbacks that evaluate the policy during preference training: the reward-vs-KL curve
    (``eval.every_n_steps`` > 0, built-in task only; see tisdpo/eval/curve.py)."""
    every = _whole(cfg, "every_n_steps", 0, 0) if cfg.get("eval") is not None else 0
    if every == 0:
        return []
    if cfg.eval.name != "synthetic" or not cfg.eval.get("enabled", False) or data.task is None:
        # Judges per training step would cost more than the training: real data gets no curve.
        log.warning("eval.every_n_steps=%d: no eval curve with eval=%s (the curve needs the built-in task's true "
                    "rewards: eval=synthetic with dataset=synthetic)", every, cfg.eval.name)
        return []
    return [EvalCurve(data.task, data.tokenizer, reference, every_n_steps=every,
                      n_prompts=_whole(cfg, "curve_n_prompts", 256, 1), seed=int(cfg.seed),
                      max_new_tokens=eval_max_new_tokens(cfg, data), batch_size=int(cfg.eval.get("batch_size") or 64),
                      schedule=_curve_schedule(cfg), **_unfinished_rules(cfg))]


def frontier_metrics(cfg: DictConfig, task, metrics: dict[str, Any]) -> dict[str, Any]:
    """``eval/optimal_frontier`` (the best expected true reward at each KL to the task's generating
    process, exact: tisdpo/eval/optimal_frontier.py) for the prompts the curve reads (the first
    ``curve_n_prompts`` test prompts; with no curve the final evaluation's), thinned to the points a
    plot needs; ``eval/reference_reward_gap``: the reference's reward minus the frontier at KL 0 (how far
    the SFT reference is from the process the frontier is exact for, in reward)."""
    every = int(cfg.eval.get("every_n_steps") or 0)
    n = int(cfg.eval.get("curve_n_prompts") or 256) if every else int(cfg.eval.n_prompts)
    frontier = optimal_frontier(task, topics=[task.prompt_topic(i, "test") for i in range(n)])
    out: dict[str, Any] = {"eval/optimal_frontier": [{k: round(p[k], 6) for k in ("kl", "true_reward", "length")}
                                                     for p in frontier[::4] + frontier[-1:]]}
    ref = metrics.get("eval/ref_true_reward")
    if ref is not None and n == int(cfg.eval.n_prompts):
        out["eval/reference_reward_gap"] = float(ref) - float(frontier_at(frontier, 0.0)[0])
    return out


def _samples_with_vllm(cfg: DictConfig) -> bool:
    return (cfg.eval.get("generation") or {}).get("backend", "hf") == "vllm"


def offload_to_cpu(*models) -> None:
    """Move the in-memory models off the GPU and return torch's cached blocks, so that a vLLM engine
    (which sizes its KV cache from the free memory it finds) gets the GPU; the judges load after it closes."""
    for model in models:
        if model is not None:
            model.to("cpu")  # in place (the LoRA reference is a view of the policy: a no-op)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def eval_stage(cfg: DictConfig, data: PreparedData, policy, reference, output_dir: Path) -> dict[str, Any]:
    if not cfg.eval.get("enabled", False):
        return {}
    if cfg.eval.name == "synthetic":
        if data.task is None:
            raise ValueError("eval=synthetic needs dataset=synthetic (the true token rewards); use eval=judges or eval=none")
        metrics = evaluate_policy(
            data.task, policy.eval(), reference.eval(), data.tokenizer,
            n_prompts=int(cfg.eval.n_prompts), temperatures=tuple(cfg.eval.temperatures),
            samples_per_prompt=int(cfg.eval.samples_per_prompt), seed=cfg.seed,
            max_new_tokens=eval_max_new_tokens(cfg, data), samples_path=output_dir / "samples.json",
            reference_samples=cfg.eval.get("reference_samples"), **_unfinished_rules(cfg),
        )
        metrics.update(frontier_metrics(cfg, data.task, metrics))
        return metrics
    if cfg.eval.name == "judges":
        rows = data.test_rows
        policy_dir = output_dir / POLICY_DIR
        if _samples_with_vllm(cfg):
            if not policy_dir.is_dir():
                raise ConfigError(f"eval.generation.backend=vllm samples from the exported policy {policy_dir}, which is "
                                  "not there: keep export.enabled=true (the run exports before evaluating for vllm)")
            offload_to_cpu(policy, reference)  # vLLM takes eval.generation.gpu_memory_utilization of the GPU
        # references: the test set's chosen responses (TL;DR's win rate against the reference summaries)
        return evaluate_with_judges(cfg.eval, policy.eval(), data.tokenizer, [r["prompt"] for r in rows], cfg.seed,
                                    output_dir, references=[r["chosen"] for r in rows], policy_dir=policy_dir,
                                    format_prompt=lambda prompt: format_prompt(prompt, cfg.dataset))
    if cfg.eval.name == "benchmarks":
        policy_dir = output_dir / POLICY_DIR
        if not policy_dir.is_dir():
            raise ValueError(f"eval=benchmarks reads the exported policy {policy_dir}: keep export.enabled=true")
        return run_benchmarks(policy_dir, cfg.eval, output_dir)
    raise ValueError(f"eval={cfg.eval.name!r} is not one of synthetic, judges, benchmarks, none")
