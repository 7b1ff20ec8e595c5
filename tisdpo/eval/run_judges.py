"""Evaluation of real runs: sample from the policy on test prompts, score with the configured judges.

For each temperature in ``eval.temperatures`` (0 = greedy decoding) the policy answers
``eval.n_prompts`` test prompts; every judge in ``eval.judges`` scores the answers, and
``eval.pairwise`` compares them with a baseline's answers to the same prompts. Metric names follow
the built-in task's convention: with one temperature the plain names (``eval/safe_rate``); with
several, every name also as ``<name>@T<t>`` (``eval/win_rate_vs_reference@T0.25``) and the plain
names hold the T=1 values (the first temperature's when 1 is not among them). MT-Bench
(``eval.mt_bench``) asks its own questions once, at its own temperatures.

The pairwise baseline (``eval.baseline_from``): ``samples`` = another run's ``samples.json``
(``eval.baseline_samples``, e.g. the DPO run of the same seed: the TIS-DPO paper's "win rate vs
DPO"); ``dataset`` = the test set's reference responses (the chosen ones; TL;DR's win rate vs the
reference summaries). Without a baseline the win rate is skipped with a warning
(``eval.require_baseline: true`` makes that an error), so the baseline run itself can go first.

Sampling (``eval.generation``): ``backend: hf`` samples with the in-memory policy's ``generate``;
``backend: vllm`` starts a vLLM engine on the exported policy (``<run dir>/policy/``; about 10x
faster at paper scale, see ``tisdpo/eval/vllm_backend.py``) with the same sampling parameters.
Every answer is sampled first, then the engine is closed and the judges score.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig

from tisdpo.eval.generation import model_stop_ids, sample_responses
from tisdpo.eval.vllm_backend import open_sampler

log = logging.getLogger(__name__)


def temperature_suffixes(temperatures: Sequence[float]) -> dict[float, list[str]]:
    """For each temperature, the suffixes its metrics are written under ('' = the plain names)."""
    temperatures = [float(t) for t in temperatures]
    if len(temperatures) == 1:
        return {temperatures[0]: [""]}
    main = 1.0 if 1.0 in temperatures else temperatures[0]
    return {t: ([""] if t == main else []) + [f"@T{t:g}"] for t in temperatures}


def _baseline_from_samples(path: str | None) -> dict[tuple[str, float], str]:
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"eval.baseline_samples={path!r}: no such file (a run's samples.json)")
    return {(s["prompt"], float(s["temperature"])): s["response"] for s in json.loads(file.read_text())}


def _baseline_responses(eval_cfg: DictConfig, prompts: list[str], temperature: float,
                        samples: dict[tuple[str, float], str], references: Sequence[str] | None) -> list[str] | None:
    source = eval_cfg.get("baseline_from") or "samples"
    if source == "dataset":
        if references is None:
            return None
        return list(references[: len(prompts)])
    if source != "samples":
        raise ValueError(f"eval.baseline_from={source!r} is not one of samples, dataset")
    if not samples:
        return None
    missing = [p for p in prompts if (p, temperature) not in samples]
    if missing:
        raise ValueError(f"eval.baseline_samples has no sample for {len(missing)} prompt(s) at T={temperature:g}, "
                         f"e.g. {missing[0][:80]!r}")
    return [samples[(p, temperature)] for p in prompts]


def _chat_texts(tokenizer, conversations: list[list[dict[str, str]]]) -> list[str]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    return ["\n\n".join(m["content"] for m in c) for c in conversations]


def generation_options(eval_cfg: DictConfig) -> dict[str, Any]:
    """``eval.generation``: the sampling backend (``hf``: the in-memory policy's ``generate``;
    ``vllm``: a vLLM engine on the exported policy) and the vLLM engine's options."""
    given = dict(eval_cfg.get("generation") or {})
    backend = given.pop("backend", None) or "hf"
    return {"backend": backend, **given}


def evaluate_with_judges(eval_cfg: DictConfig, policy, tokenizer, prompts: list[str], seed: int,
                         output_dir: Path, references: Sequence[str] | None = None,
                         format_prompt: Callable[[str], str] | None = None,
                         policy_dir: Path | None = None) -> dict[str, Any]:
    """Flat metrics of ``policy`` under every judge of ``eval_cfg``; writes ``samples.json``.

    ``format_prompt``: how the policy saw prompts in training (``dataset.prompt_template``); the
    policy samples from formatted prompts, the judges read the plain ones.

    ``references``: the test set's reference responses, aligned with ``prompts`` (used when
    ``eval.baseline_from=dataset``).

    ``policy_dir``: the exported policy, which ``eval.generation.backend=vllm`` samples from (the
    in-memory ``policy`` is then not used, and should be off the GPU: vLLM takes
    ``eval.generation.gpu_memory_utilization`` of it). Every sample (all temperatures, MT-Bench's
    answers) is drawn first, then the engine is closed, then the judges load and score.
    """
    prompts = prompts[: int(eval_cfg.n_prompts)]
    if references is not None and len(references) < len(prompts):
        raise ValueError(f"references: {len(references)} for {len(prompts)} prompts")
    temperatures = [float(t) for t in eval_cfg.temperatures]
    judges = {name: instantiate(node) for name, node in (eval_cfg.get("judges") or {}).items() if node}
    pairwise = instantiate(eval_cfg.pairwise) if eval_cfg.get("pairwise") else None
    baseline_samples = _baseline_from_samples(eval_cfg.get("baseline_samples"))
    metrics: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    policy_prompts = [format_prompt(p) for p in prompts] if format_prompt else prompts
    options = generation_options(eval_cfg)
    eos = model_stop_ids(policy, tokenizer) if policy is not None else None  # the exact stop set of the HF path
    with open_sampler(options.pop("backend"), policy, model_dir=policy_dir, tokenizer=tokenizer, seed=seed,
                      option="eval.generation.backend", eos_token_ids=eos, **options) as sampler:
        answers: dict[float, list[str]] = {}
        for temperature in temperature_suffixes(temperatures):
            ids = sample_responses(sampler, tokenizer, policy_prompts, temperature=temperature, top_p=eval_cfg.get("top_p"),
                                   max_new_tokens=int(eval_cfg.max_new_tokens), batch_size=int(eval_cfg.batch_size),
                                   seed=seed)
            answers[temperature] = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        if eval_cfg.get("mt_bench"):  # MT-Bench asks its own questions, graded over HTTP: before the engine closes
            metrics.update(_mt_bench(eval_cfg, sampler, tokenizer, seed))
    for temperature, suffixes in temperature_suffixes(temperatures).items():
        responses = answers[temperature]
        samples += [{"prompt": p, "response": r, "temperature": temperature} for p, r in zip(prompts, responses)]
        found: dict[str, Any] = {}
        for name, judge in judges.items():
            log.info("judge %s at T=%g on %d samples", name, temperature, len(responses))
            found.update(judge(prompts, responses))
        if pairwise is not None:
            baseline = _baseline_responses(eval_cfg, prompts, temperature, baseline_samples, references)
            if baseline is None:
                problem = ("eval.pairwise needs a baseline: eval.baseline_samples (the samples.json of the run "
                           "to compare against) or eval.baseline_from=dataset with the test references")
                if eval_cfg.get("require_baseline", False):
                    raise ValueError(problem)
                log.warning("%s; win rate at T=%g skipped", problem, temperature)
            else:
                log.info("pairwise judge vs %s at T=%g on %d pairs", pairwise.baseline, temperature, len(prompts))
                found.update(pairwise(prompts, responses, baseline))
        for suffix in suffixes:
            metrics.update({k + suffix: v for k, v in found.items()})
    (output_dir / "samples.json").write_text(json.dumps(samples, indent=1))
    return metrics


def _mt_bench(eval_cfg: DictConfig, sampler, tokenizer, seed: int) -> dict[str, Any]:
    """MT-Bench's metrics, its answers sampled by ``sampler`` (the policy, or the vLLM engine)."""
    judge = instantiate(eval_cfg.mt_bench)

    def generate(conversations, temperature: float = 0.0, max_new_tokens: int | None = None):
        # temperature 0 is greedy decoding (sample_responses)
        ids = sample_responses(sampler, tokenizer, _chat_texts(tokenizer, conversations), temperature=temperature,
                               max_new_tokens=int(max_new_tokens or eval_cfg.max_new_tokens),
                               batch_size=int(eval_cfg.batch_size), seed=seed)
        return [tokenizer.decode(r, skip_special_tokens=True) for r in ids]

    return judge(generate)
