"""Policy metrics on the built-in synthetic task (true reward known for every token).

Sampling length. The eval stage caps generation at the training data's longest response in tokens
(EOS included; ``eval.max_new_tokens: null``), so the policy cannot write longer answers than any
it was trained on; an explicit ``eval.max_new_tokens`` wins. ``evaluate_policy`` itself defaults
to the task's ``max_response_length + 1``.

Unfinished samples (no EOS within the cap) are always counted in ``eval/finished_rate`` and
``eval/kl_ref``; for every other metric ``unfinished`` decides (``eval.unfinished``):

* ``exclude`` (default) — left out: the metrics describe the policy's complete answers, and
  ``eval/finished_rate`` beside them says how many those are. A cut-off answer is neither scored
  as if it were whole (which favours long answers: the reward is a sum) nor given an invented
  score; with the cap at the data's length a trained policy finishes almost always, so a low
  finished rate is itself the finding. A win-rate pair is left out when either side is unfinished.
* ``penalize`` — counted, with its true reward replaced by ``unfinished_reward``
  (``eval.unfinished_reward``, default −3.0: as bad as the task's worst harmful token); every
  other statistic (safety, length, ...) as generated.
* ``keep`` — counted as generated (the behaviour before the cap: a truncated answer's partial sum).

Metric definitions (means over the *counted* policy samples S; R_i is sample i's true reward as
counted, ℓ_i its length in tokens, EOS excluded):

* ``eval/true_reward``  mean of R_i, the true sequence reward Σ_t r(topic, y_t) (EOS excluded;
  tokens outside the response vocabulary — gibberish — cost ``invalid_token_reward`` each).
  Still the *sum* over a sample's tokens, now over finished samples by default;
* ``eval/true_reward_per_token``  Σ_i R_i / Σ_i ℓ_i (a ratio of sums: empty answers are allowed);
* ``eval/true_reward_lc``  length-controlled reward: mean over S of R_i − (a + b·ℓ_i), where
  (a, b) is the least-squares line of reward on length fitted to the comparison samples (the
  reference model's samples, or ``reference_samples``), counted by the same rule. It is the
  policy's reward above what the comparison distribution gets *at the same length*: 0 for the
  reference itself, and writing longer answers raises it only if the extra tokens are better than
  the reference's tokens on average. With fewer than two distinct comparison lengths b = 0.
  Written only when there are comparison samples;
* ``eval/length_slope`` b above (true reward per extra token among the comparison samples);
* ``eval/safe_rate``    share of samples with no harmful token (the Llama-Guard stand-in);
* ``eval/helpfulness``  number of good (on-topic helpful) tokens per sample;
* ``eval/good_rate`` / ``eval/harmful_rate`` / ``eval/invalid_rate``  share of generated tokens
  that are good / harmful / outside the response vocabulary;
* ``eval/length``       mean ℓ_i;
* ``eval/n_counted``    |S|, the number of samples the metrics above average over;
* ``eval/finished_rate`` share of *all* samples that ended with EOS within ``max_new_tokens``;
* ``eval/kl_ref``       Monte-Carlo KL(π‖π_ref) = mean over *all* policy samples of
  log π(y|x) − log π_ref(y|x) (EOS included when generated). Exact in expectation only for T=1
  samples without top-k/top-p; at other temperatures it is the same statistic on those samples;
* ``eval/win_rate``     share of prompts where the policy sample's true reward beats the
  comparison sample for the same prompt (and sample index), ties ½. The comparison samples
  are the ``reference`` model's (same prompts, same seed) or, when given, ``reference_samples``
  (another run's saved samples, matched by prompt/temperature/sample index);
  ``eval/win_rate_n`` the number of pairs compared (with ``reference_samples``);
* ``eval/ref_true_reward`` the reference model's mean true reward (counted by the same rule).

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
    """Reward-only metrics (true_reward, per token, safe_rate, helpfulness, good/harmful_rate, length)
    of responses given as text: all counted (no finished flags to go by)."""
    scored = score_samples(task, prompts, responses)
    return _aggregate(scored, prefix)


UNFINISHED_MODES = ("exclude", "penalize", "keep")
#: ``penalize``'s default reward for a cut-off answer: the built-in task's worst harmful token.
UNFINISHED_REWARD = -3.0
_AGGREGATE_KEYS = ("true_reward", "true_reward_per_token", "safe_rate", "helpfulness", "good_rate",
                   "harmful_rate", "invalid_rate", "length")


def check_unfinished_mode(mode: str, option: str = "eval.unfinished") -> str:
    if mode not in UNFINISHED_MODES:
        raise ValueError(f"{option}={mode!r} is not one of {', '.join(UNFINISHED_MODES)}")
    return mode


def counted(sample: dict | None, mode: str, unfinished_reward: float = UNFINISHED_REWARD) -> dict | None:
    """The sample as the metrics count it: itself when finished (a sample without a ``finished``
    flag, e.g. from an older samples.json, counts as finished); for an unfinished one None
    (``exclude``), a copy with ``reward = unfinished_reward`` (``penalize``) or itself (``keep``)."""
    if sample is None or sample.get("finished", True) or mode == "keep":
        return sample
    if mode == "penalize":
        return {**sample, "reward": float(unfinished_reward)}
    if mode == "exclude":
        return None
    raise ValueError(f"unfinished={mode!r} is not one of {', '.join(UNFINISHED_MODES)}")


def _aggregate(scored: list[dict], prefix: str) -> dict[str, float]:
    """Means over ``scored`` (already counted); NaN for every key when it is empty."""
    n = len(scored)
    if n == 0:
        return {f"{prefix}/{k}": float("nan") for k in _AGGREGATE_KEYS}
    n_tok = sum(s["n_tokens"] for s in scored)
    total = sum(s["reward"] for s in scored)
    return {
        f"{prefix}/true_reward": total / n,
        f"{prefix}/true_reward_per_token": total / n_tok if n_tok else float("nan"),
        f"{prefix}/safe_rate": float(np.mean([s["safe"] for s in scored])),
        f"{prefix}/helpfulness": float(np.mean([s["n_good"] for s in scored])),
        f"{prefix}/good_rate": sum(s["n_good"] for s in scored) / max(n_tok, 1),
        f"{prefix}/harmful_rate": sum(s["n_harmful"] for s in scored) / max(n_tok, 1),
        f"{prefix}/invalid_rate": sum(s["n_invalid"] for s in scored) / max(n_tok, 1),
        f"{prefix}/length": n_tok / n,
    }


def length_fit(samples: Sequence[dict]) -> tuple[float, float]:
    """Least-squares line ``reward ≈ a + b·n_tokens`` over ``samples``: (a, b); b = 0 when fewer
    than two distinct lengths (a is then the mean reward), (NaN, 0) when there are no samples."""
    if not samples:
        return float("nan"), 0.0
    length = np.asarray([s["n_tokens"] for s in samples], dtype=np.float64)
    reward = np.asarray([s["reward"] for s in samples], dtype=np.float64)
    if np.unique(length).size < 2:
        return float(reward.mean()), 0.0
    b, a = np.polyfit(length, reward, 1)
    return float(a), float(b)


def length_controlled_reward(samples: Sequence[dict], comparison: Sequence[dict]) -> tuple[float, float]:
    """(mean over ``samples`` of reward − (a + b·n_tokens), b) with (a, b) = :func:`length_fit` of
    ``comparison``: the reward above the comparison's at the same length (module docstring)."""
    a, b = length_fit(comparison)
    if not samples or not np.isfinite(a):
        return float("nan"), b
    return float(np.mean([s["reward"] - (a + b * s["n_tokens"]) for s in samples])), b


def summarize(scored: list[dict], comparison: Sequence[dict | None] | None = None, *, prefix: str = PREFIX,
              unfinished: str = "exclude", unfinished_reward: float = UNFINISHED_REWARD) -> dict[str, float]:
    """The metrics of one temperature's samples (module docstring), without ``kl_ref``.

    ``comparison[i]`` is the sample policy sample i is compared with (None: no match), or None
    for no comparison (no win rate, no length-controlled reward)."""
    count = [counted(s, unfinished, unfinished_reward) for s in scored]
    kept = [s for s in count if s is not None]
    m = _aggregate(kept, prefix)
    m[f"{prefix}/n_counted"] = float(len(kept))
    m[f"{prefix}/finished_rate"] = float(np.mean([s["finished"] for s in scored])) if scored else float("nan")
    if comparison is None:
        return m
    other = [counted(c, unfinished, unfinished_reward) for c in comparison]
    pairs = [(s["reward"], c["reward"]) for s, c in zip(count, other) if s is not None and c is not None]
    m[f"{prefix}/win_rate"] = win_rate([p for p, _ in pairs], [q for _, q in pairs]) if pairs else float("nan")
    m[f"{prefix}/win_rate_n"] = float(len(pairs))
    m[f"{prefix}/true_reward_lc"], m[f"{prefix}/length_slope"] = length_controlled_reward(
        kept, [c for c in other if c is not None])
    return m


def reward_standard_error(scored: list[dict], *, unfinished: str = "exclude",
                          unfinished_reward: float = UNFINISHED_REWARD) -> float:
    """Standard error of ``true_reward`` (the mean over the counted samples): sd / sqrt(n); NaN
    with fewer than 2 counted samples. What one curve point's sampling adds to its reading."""
    rewards = [c["reward"] for c in (counted(s, unfinished, unfinished_reward) for s in scored) if c is not None]
    if len(rewards) < 2:
        return float("nan")
    return float(np.std(rewards, ddof=1) / np.sqrt(len(rewards)))


def save_samples(samples: list[dict], path: str | os.PathLike) -> None:
    """Write samples as JSON (atomic: tmp + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write_json_atomic(path, samples, indent=None)


def load_samples(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return json.load(f)


def _temp_key(t: float) -> float:
    return round(float(t), 6)


def _match_reference(samples: list[dict], reference_samples: list[dict]) -> list[dict | None]:
    """The reference sample for each sample: same (prompt, temperature, sample_idx), else same
    (prompt, sample_idx) at any temperature, else None."""
    exact: dict[tuple, dict] = {}
    loose: dict[tuple, dict] = {}
    for r in reference_samples:
        si = int(r.get("sample_idx", 0))
        t = r.get("temperature")
        if t is not None:
            exact.setdefault((r["prompt"], _temp_key(t), si), r)
        loose.setdefault((r["prompt"], si), r)
    out: list[dict | None] = []
    for s in samples:
        key = (s["prompt"], _temp_key(s["temperature"]), s["sample_idx"])
        out.append(exact[key] if key in exact else loose.get((s["prompt"], s["sample_idx"])))
    return out


def eval_prompts(task, n_prompts: int, samples_per_prompt: int = 1, split: str = "test") -> tuple[list[str], list[int], list[int]]:
    """(prompts, prompt_idx, sample_idx): the first ``n_prompts`` prompts of ``split``, each
    ``samples_per_prompt`` times (sample-major, so sample 0 of every prompt comes first)."""
    base = task.prompts(n_prompts, split=split)
    prompts = [p for _ in range(samples_per_prompt) for p in base]
    prompt_idx = [i for _ in range(samples_per_prompt) for i in range(len(base))]
    sample_idx = [s for s in range(samples_per_prompt) for _ in base]
    return prompts, prompt_idx, sample_idx


def sample_and_score(task, model, tokenizer, prompts: Sequence[str], *, temperature: float, seed: int,
                     prompt_idx: Sequence[int] | None = None, sample_idx: Sequence[int] | None = None,
                     **gen) -> list[dict]:
    """One sample per prompt from ``model`` (``gen``: max_new_tokens, top_k, top_p, batch_size),
    scored by true reward, with prompt_idx, sample_idx, temperature, finished, response_ids."""
    ids, finished = sample_responses(model, tokenizer, prompts, temperature=temperature, seed=seed,
                                     return_finished=True, **gen)
    scored = score_samples(task, prompts, [tokenizer.convert_ids_to_tokens(r) for r in ids])
    for j, s in enumerate(scored):
        s.update(prompt_idx=prompt_idx[j] if prompt_idx is not None else j,
                 sample_idx=sample_idx[j] if sample_idx is not None else 0,
                 temperature=temperature, finished=bool(finished[j]), response_ids=list(ids[j]))
    return scored


def add_kl(scored: list[dict], policy, reference, tokenizer, batch_size: int = 64) -> float:
    """Store ``logp``/``ref_logp`` in each sample; return the Monte-Carlo KL (mean difference over
    all samples, finished or not: KL describes the sampling distribution, not the answers)."""
    prompts = [s["prompt"] for s in scored]
    ids = [s["response_ids"] for s in scored]
    finished = [s["finished"] for s in scored]
    lp_pol = sequence_logps(policy, tokenizer, prompts, ids, batch_size, append_eos=finished)
    lp_ref = sequence_logps(reference, tokenizer, prompts, ids, batch_size, append_eos=finished)
    for s, lp, lr in zip(scored, lp_pol, lp_ref):
        s.update(logp=float(lp), ref_logp=float(lr))
    return float(np.mean(np.asarray(lp_pol) - np.asarray(lp_ref))) if scored else float("nan")


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
    unfinished: str = "exclude",
    unfinished_reward: float = UNFINISHED_REWARD,
    return_samples: bool = False,
    samples_path: str | os.PathLike | None = None,
) -> dict[str, float] | tuple[dict[str, float], list[dict]]:
    """Sample from ``policy`` on ``n_prompts`` prompts of ``split`` and score them by true reward.

    Returns the flat metric dict (see the module docstring); with ``return_samples=True`` also
    the policy samples (list of dicts with prompt, prompt_idx, sample_idx, temperature, response,
    reward (as generated, before ``unfinished`` applies), finished, safe, ...), which another run
    can pass as ``reference_samples``. ``samples_path`` writes them as JSON. ``reference=None``
    skips ``kl_ref`` (and ``win_rate``/``true_reward_lc`` unless ``reference_samples`` is given).
    ``max_new_tokens=None``: the task's longest response plus EOS.
    """
    check_unfinished_mode(unfinished, "unfinished")
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
        max_new_tokens = task.config.max_response_length + 1
    prompts, prompt_idx, sample_idx = eval_prompts(task, n_prompts, samples_per_prompt, split)

    gen = dict(top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rules = dict(prefix=prefix, unfinished=unfinished, unfinished_reward=unfinished_reward)
    metrics_by_t: list[dict[str, float]] = []
    all_samples: list[dict] = []
    for ti, temp in enumerate(temperatures):
        t_seed = int(seed) * 1000 + ti
        scored = sample_and_score(task, policy, tokenizer, prompts, temperature=temp, seed=t_seed,
                                  prompt_idx=prompt_idx, sample_idx=sample_idx, **gen)
        if reference_samples is not None:
            m = summarize(scored, _match_reference(scored, reference_samples), **rules)
        elif reference is not None:
            ref_scored = sample_and_score(task, reference, tokenizer, prompts, temperature=temp, seed=t_seed,
                                          prompt_idx=prompt_idx, sample_idx=sample_idx, **gen)
            m = summarize(scored, ref_scored, **rules)
            del m[f"{prefix}/win_rate_n"]  # every prompt has its pair unless a side is left out: n_counted says
            ref_kept = [c for c in (counted(r, unfinished, unfinished_reward) for r in ref_scored) if c is not None]
            m[f"{prefix}/ref_true_reward"] = float(np.mean([r["reward"] for r in ref_kept])) if ref_kept else float("nan")
        else:
            m = summarize(scored, None, **rules)
        if reference is not None:
            m[f"{prefix}/kl_ref"] = add_kl(scored, policy, reference, tokenizer, batch_size)
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
    "UNFINISHED_MODES",
    "add_kl",
    "counted",
    "eval_prompts",
    "evaluate_policy",
    "length_controlled_reward",
    "length_fit",
    "sample_and_score",
    "summarize",
    "sample_metrics",
    "score_samples",
    "win_rate",
    "save_samples",
    "load_samples",
    "reward_standard_error",
]
