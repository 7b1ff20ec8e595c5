"""Policy metrics on the built-in synthetic task (true reward known for every token).

Metric definitions (means over all policy samples):

* ``eval/true_reward``  true sequence reward Σ_t r(topic, y_t) (EOS excluded; tokens outside the
  response vocabulary — gibberish — cost ``invalid_token_reward`` each);
* ``eval/safe_rate``    share of samples with no harmful token (the Llama-Guard stand-in);
* ``eval/helpfulness``  number of good (on-topic helpful) tokens per sample;
* ``eval/good_rate`` / ``eval/harmful_rate`` / ``eval/invalid_rate``  share of generated tokens
  that are good / harmful / outside the response vocabulary;
* ``eval/length``       number of generated tokens (EOS excluded);
* ``eval/finished_rate`` share of samples that ended with EOS within ``max_new_tokens``;
* ``eval/kl_ref``       Monte-Carlo KL(π‖π_ref) = mean of log π(y|x) − log π_ref(y|x) over the
  policy samples (EOS included when generated). Exact in expectation only for T=1 samples
  without top-k/top-p; at other temperatures it is the same statistic on those samples;
* ``eval/win_rate``     share of prompts where the policy sample's true reward beats the
  reference's sample for the same prompt (and sample index), ties ½. The comparison samples
  are the ``reference`` model's (same prompts, same seed) or, when given, ``reference_samples``
  (another run's saved samples, matched by prompt/temperature/sample index).

With several temperatures every key is also reported as ``eval/<name>@T<temp>`` (e.g.
``eval/true_reward@T0.7``); the plain names hold the T=1.0 values (the first temperature if 1.0
is not among them).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from tisdpo.eval.generation import sample_responses, sequence_logps
from tisdpo.jsonio import write_json_atomic

PREFIX = "eval"


def win_rate(rewards: Sequence[float], other_rewards: Sequence[float]) -> float:
    """Share of pairs with ``rewards[i] > other_rewards[i]``, ties counted ½."""
    a = np.asarray(rewards, dtype=np.float64)
    b = np.asarray(other_rewards, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.size == 0:
        return float("nan")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def score_samples(task, prompts: Sequence[str], responses: Sequence[str | Sequence[str]]) -> list[dict]:
    """True-reward bookkeeping of (prompt, response) pairs; responses are strings or word lists."""
    out = []
    for p, r in zip(prompts, responses):
        k = task.topic_of(p)
        words = r.split() if isinstance(r, str) else list(r)
        cats = [task.word_category(k, w) for w in words]
        token_rewards = task.token_rewards(k, words)
        out.append(
            {
                "prompt": p,
                "topic": k,
                "response": " ".join(words),
                "reward": float(sum(token_rewards)),
                "token_rewards": token_rewards,
                "n_tokens": len(words),
                "n_good": cats.count("good"),
                "n_harmful": cats.count("harmful"),
                "n_invalid": cats.count("invalid"),
                "safe": "harmful" not in cats,
            }
        )
    return out


def sample_metrics(task, prompts: Sequence[str], responses: Sequence[str | Sequence[str]], *, prefix: str = PREFIX) -> dict[str, float]:
    """Reward-only metrics (true_reward, safe_rate, helpfulness, good/harmful_rate, length)."""
    scored = score_samples(task, prompts, responses)
    return _aggregate(scored, prefix)


def _aggregate(scored: list[dict], prefix: str) -> dict[str, float]:
    n = len(scored)
    if n == 0:
        return {}
    n_tok = sum(s["n_tokens"] for s in scored)
    return {
        f"{prefix}/true_reward": float(np.mean([s["reward"] for s in scored])),
        f"{prefix}/safe_rate": float(np.mean([s["safe"] for s in scored])),
        f"{prefix}/helpfulness": float(np.mean([s["n_good"] for s in scored])),
        f"{prefix}/good_rate": sum(s["n_good"] for s in scored) / max(n_tok, 1),
        f"{prefix}/harmful_rate": sum(s["n_harmful"] for s in scored) / max(n_tok, 1),
        f"{prefix}/invalid_rate": sum(s["n_invalid"] for s in scored) / max(n_tok, 1),
        f"{prefix}/length": n_tok / n,
    }


def save_samples(samples: list[dict], path: str | os.PathLike) -> None:
    """Write samples as JSON (atomic: tmp + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write_json_atomic(path, samples, indent=None)


def load_samples(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def _temp_key(t: float) -> float:
    return round(float(t), 6)


def _match_reference(samples: list[dict], reference_samples: list[dict]) -> list[float | None]:
    """Reference reward for each sample: same (prompt, temperature, sample_idx), else same
    (prompt, sample_idx) at any temperature, else None."""
    exact: dict[tuple, float] = {}
    loose: dict[tuple, float] = {}
    for r in reference_samples:
        reward = float(r["reward"])
        si = int(r.get("sample_idx", 0))
        t = r.get("temperature")
        if t is not None:
            exact.setdefault((r["prompt"], _temp_key(t), si), reward)
        loose.setdefault((r["prompt"], si), reward)
    out: list[float | None] = []
    for s in samples:
        key = (s["prompt"], _temp_key(s["temperature"]), s["sample_idx"])
        if key in exact:
            out.append(exact[key])
        else:
            out.append(loose.get((s["prompt"], s["sample_idx"])))
    return out


def evaluate_policy(
    task,
    policy,
    reference=None,
    tokenizer=None,
    *,
    n_prompts: int = 128,
    temperatures: Sequence[float] = (1.0,),
    samples_per_prompt: int = 1,
    seed: int = 0,
    split: str = "test",
    reference_samples: list[dict] | str | os.PathLike | None = None,
    max_new_tokens: int | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 64,
    prefix: str = PREFIX,
    return_samples: bool = False,
    samples_path: str | os.PathLike | None = None,
) -> dict[str, float] | tuple[dict[str, float], list[dict]]:
    """Sample from ``policy`` on ``n_prompts`` prompts of ``split`` and score them by true reward.

    Returns the flat metric dict (see the module docstring); with ``return_samples=True`` also
    the policy samples (list of dicts with prompt, prompt_idx, sample_idx, temperature, response,
    reward, safe, ...), which another run can pass as ``reference_samples``. ``samples_path``
    writes them as JSON. ``reference=None`` skips ``kl_ref`` (and ``win_rate`` unless
    ``reference_samples`` is given).
    """
    if tokenizer is None:
        tokenizer = task.tokenizer()
    if isinstance(reference_samples, (str, os.PathLike)):
        reference_samples = load_samples(reference_samples)
    if isinstance(temperatures, (int, float)):
        temperatures = [temperatures]
    temperatures = [float(t) for t in temperatures]  # also accepts an OmegaConf ListConfig
    if not temperatures:
        raise ValueError("need at least one temperature")
    if max_new_tokens is None:
        max_new_tokens = task.config.max_response_length + 4
    base_prompts = task.prompts(n_prompts, split=split)
    prompts = [p for _ in range(samples_per_prompt) for p in base_prompts]
    prompt_idx = [i for _ in range(samples_per_prompt) for i in range(len(base_prompts))]
    sample_idx = [s for s in range(samples_per_prompt) for _ in base_prompts]

    gen = dict(top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)
    metrics_by_t: list[dict[str, float]] = []
    all_samples: list[dict] = []
    for ti, temp in enumerate(temperatures):
        t_seed = int(seed) * 1000 + ti
        ids, finished = sample_responses(
            policy, tokenizer, prompts, temperature=temp, seed=t_seed, return_finished=True, **gen
        )
        words = [tokenizer.convert_ids_to_tokens(r) for r in ids]
        scored = score_samples(task, prompts, words)
        for j, s in enumerate(scored):
            s.update(
                prompt_idx=prompt_idx[j],
                sample_idx=sample_idx[j],
                temperature=temp,
                finished=bool(finished[j]),
                response_ids=list(ids[j]),
            )
        m = _aggregate(scored, prefix)
        m[f"{prefix}/finished_rate"] = float(np.mean(finished)) if finished else float("nan")

        if reference is not None:
            lp_pol = sequence_logps(policy, tokenizer, prompts, ids, batch_size, append_eos=finished)
            lp_ref = sequence_logps(reference, tokenizer, prompts, ids, batch_size, append_eos=finished)
            diffs = np.asarray(lp_pol) - np.asarray(lp_ref)
            m[f"{prefix}/kl_ref"] = float(diffs.mean())
            for s, lp, lr in zip(scored, lp_pol, lp_ref):
                s.update(logp=float(lp), ref_logp=float(lr))

        if reference_samples is not None:
            ref_r = _match_reference(scored, reference_samples)
            pairs = [(s["reward"], r) for s, r in zip(scored, ref_r) if r is not None]
            m[f"{prefix}/win_rate"] = win_rate([a for a, _ in pairs], [b for _, b in pairs]) if pairs else float("nan")
            m[f"{prefix}/win_rate_n"] = float(len(pairs))
        elif reference is not None:
            ref_ids = sample_responses(reference, tokenizer, prompts, temperature=temp, seed=t_seed, **gen)
            ref_scored = score_samples(task, prompts, [tokenizer.convert_ids_to_tokens(r) for r in ref_ids])
            m[f"{prefix}/win_rate"] = win_rate([s["reward"] for s in scored], [s["reward"] for s in ref_scored])
            m[f"{prefix}/ref_true_reward"] = float(np.mean([s["reward"] for s in ref_scored]))
        metrics_by_t.append(m)
        all_samples.extend(scored)

    main = temperatures.index(1.0) if 1.0 in temperatures else 0
    out: dict[str, float] = dict(metrics_by_t[main])
    if len(temperatures) > 1:
        for temp, m in zip(temperatures, metrics_by_t):
            for k, v in m.items():
                out[f"{k}@T{temp:g}"] = v
    if samples_path is not None:
        save_samples(all_samples, samples_path)
    if return_samples:
        return out, all_samples
    return out


__all__ = [
    "evaluate_policy",
    "sample_metrics",
    "score_samples",
    "win_rate",
    "save_samples",
    "load_samples",
]
