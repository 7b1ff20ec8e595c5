"""Evaluation stage: the built-in task's true-reward metrics (real-data judges: `eval=judges`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from tisdpo.eval.benchmarks import run_benchmarks
from tisdpo.eval.run_judges import evaluate_with_judges
from tisdpo.eval.synthetic_metrics import evaluate_policy
from tisdpo.pipeline.data_stage import PreparedData
from tisdpo.pipeline.export import POLICY_DIR
from tisdpo.pipeline.loaders import format_prompt

log = logging.getLogger(__name__)


def training_evaluators(cfg: DictConfig, data: PreparedData, reference) -> list[Callback]:
    """Callbacks that evaluate the policy during preference training (none yet)."""
    return []


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
            max_new_tokens=int(cfg.eval.max_new_tokens), samples_path=output_dir / "samples.json",
            reference_samples=cfg.eval.get("reference_samples"),
        )
        return metrics
    if cfg.eval.name == "judges":
        rows = data.test_rows
        # references: the test set's chosen responses (TL;DR's win rate against the reference summaries)
        return evaluate_with_judges(cfg.eval, policy.eval(), data.tokenizer, [r["prompt"] for r in rows], cfg.seed,
                                    output_dir, references=[r["chosen"] for r in rows],
                                    format_prompt=lambda prompt: format_prompt(prompt, cfg.dataset))
    if cfg.eval.name == "benchmarks":
        policy_dir = output_dir / POLICY_DIR
        if not policy_dir.is_dir():
            raise ValueError(f"eval=benchmarks reads the exported policy {policy_dir}: keep export.enabled=true")
        return run_benchmarks(policy_dir, cfg.eval, output_dir)
    raise ValueError(f"eval={cfg.eval.name!r} is not one of synthetic, judges, benchmarks, none")
