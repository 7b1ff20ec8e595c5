"""Evaluation of real runs: sample from the policy on test prompts, score with the configured judges."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from tisdpo.eval.generation import sample_responses

log = logging.getLogger(__name__)


def _suffix(temperature: float, temperatures: list[float]) -> str:
    """The first temperature keeps the plain metric names; the others get '@T<t>'."""
    return "" if temperature == temperatures[0] else f"@T{temperature:g}"


def _baseline(path: str | None) -> dict[tuple[str, float], str]:
    if not path:
        return {}
    return {(s["prompt"], float(s["temperature"])): s["response"] for s in json.loads(Path(path).read_text())}


def evaluate_with_judges(eval_cfg: DictConfig, policy, tokenizer, prompts: list[str], seed: int,
                         output_dir: Path) -> dict[str, Any]:
    prompts = prompts[: int(eval_cfg.n_prompts)]
    temperatures = [float(t) for t in eval_cfg.temperatures]
    judges = {name: instantiate(node) for name, node in (eval_cfg.get("judges") or {}).items() if node}
    pairwise = instantiate(eval_cfg.pairwise) if eval_cfg.get("pairwise") else None
    baseline = _baseline(eval_cfg.get("baseline_samples"))
    if pairwise is not None and not baseline:
        raise ValueError("eval.pairwise needs eval.baseline_samples: the samples.json of the run to compare against")
    metrics: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    for temperature in temperatures:
        ids = sample_responses(policy, tokenizer, prompts, temperature=temperature, top_p=eval_cfg.get("top_p"),
                               max_new_tokens=int(eval_cfg.max_new_tokens), batch_size=int(eval_cfg.batch_size), seed=seed)
        responses = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        samples += [{"prompt": p, "response": r, "temperature": temperature} for p, r in zip(prompts, responses)]
        suffix = _suffix(temperature, temperatures)
        for name, judge in judges.items():
            log.info("judge %s at T=%g on %d samples", name, temperature, len(responses))
            metrics.update({k + suffix: v for k, v in judge(prompts, responses).items()})
        if pairwise is not None:
            missing = [p for p in prompts if (p, temperature) not in baseline]
            if missing:
                raise ValueError(f"eval.baseline_samples has no sample for {len(missing)} prompt(s) at T={temperature:g}, "
                                 f"e.g. {missing[0][:80]!r}")
            metrics.update(pairwise(prompts, responses, [baseline[(p, temperature)] for p in prompts], metric_suffix=suffix))
    if eval_cfg.get("mt_bench"):
        judge = instantiate(eval_cfg.mt_bench)

        def generate(conversations):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     if getattr(tokenizer, "chat_template", None) else "\n\n".join(m["content"] for m in c)
                     for c in conversations]
            ids = sample_responses(policy, tokenizer, texts, temperature=0.0, max_new_tokens=int(eval_cfg.max_new_tokens),
                                   batch_size=int(eval_cfg.batch_size), seed=seed)
            return [tokenizer.decode(r, skip_special_tokens=True) for r in ids]

        metrics.update(judge(generate))
    (output_dir / "samples.json").write_text(json.dumps(samples, indent=1))
    return metrics
