"""The metric keys each eval config writes, declared without running it.

``metric_keys(eval_cfg)`` is what a run with that config puts in ``results.json`` (the keys it
always writes; judges may add detail such as MT-Bench's per-category means). The paper tables
read their columns from these keys, so a test can check, for every experiment, that its eval
config produces every column of its table (tests/test_eval_coverage.py). Each judge's declaration
is tested against what the judge actually returns (tests/test_judges.py).
"""
from __future__ import annotations

from typing import Any, Callable

from hydra.utils import get_class
from omegaconf import DictConfig

from tisdpo.eval.benchmarks import benchmark_metric_keys
from tisdpo.eval.judges import MTBenchJudge, PairwiseJudge, RewardModelJudge, SafetyJudge
from tisdpo.eval.judges.common import sanitize_name
from tisdpo.eval.judges.mt_bench import METRIC_KEYS as MT_BENCH_KEYS
from tisdpo.eval.judges.pairwise import METRIC_NAMES as PAIRWISE_NAMES
from tisdpo.eval.run_judges import temperature_suffixes

SYNTHETIC_KEYS = ("true_reward", "safe_rate", "helpfulness", "good_rate", "harmful_rate", "invalid_rate",
                  "length", "finished_rate", "kl_ref", "win_rate", "true_reward_per_token", "true_reward_lc",
                  "length_slope", "n_counted")


def with_temperatures(keys: set[str], temperatures) -> set[str]:
    """Every key under each suffix its temperature is written with (run_judges' convention)."""
    return {key + suffix for suffixes in temperature_suffixes(temperatures).values()
            for suffix in suffixes for key in keys}


def _reward_model_keys(node) -> set[str]:
    key = f"eval/{sanitize_name(node.get('name', 'help'), 'name')}"
    return {key, f"{key}_std", f"{key}_n"}


def _safety_keys(node) -> set[str]:
    return {"eval/safe_rate", "eval/safe_unparsed", "eval/safe_n"}


def _pairwise_keys(node) -> set[str]:
    baseline = sanitize_name(node.get("baseline", "dpo"), "baseline")
    return {f"eval/{name}_vs_{baseline}" for name in PAIRWISE_NAMES}


def _mt_bench_keys(node) -> set[str]:
    return set(MT_BENCH_KEYS)


# Every judge class and the keys it writes (a judge class not listed here is an error, not silence).
JUDGE_KEYS: dict[type, Callable[[Any], set[str]]] = {
    RewardModelJudge: _reward_model_keys, SafetyJudge: _safety_keys, PairwiseJudge: _pairwise_keys,
    MTBenchJudge: _mt_bench_keys,
}


def judge_keys(node, option: str) -> set[str]:
    """The keys of one judge node (``_target_`` + options), at one temperature."""
    target = node.get("_target_") if node is not None else None
    if not target:
        raise ValueError(f"{option}: a judge needs a _target_")
    cls = get_class(str(target))
    for known, declare in JUDGE_KEYS.items():
        if issubclass(cls, known):
            return declare(node)
    raise ValueError(f"{option}: {target} declares no metric keys; add it to tisdpo.eval.keys")


def _synthetic_keys(eval_cfg) -> set[str]:
    names = set(SYNTHETIC_KEYS)
    names |= {"win_rate_n"} if eval_cfg.get("reference_samples") else {"ref_true_reward"}
    return with_temperatures({f"eval/{n}" for n in names}, eval_cfg.get("temperatures") or [1.0])


def _judges_config_keys(eval_cfg) -> set[str]:
    per_sample: set[str] = set()
    for name, node in (eval_cfg.get("judges") or {}).items():
        if node:
            per_sample |= judge_keys(node, f"eval.judges.{name}")
    if eval_cfg.get("pairwise"):
        per_sample |= judge_keys(eval_cfg.pairwise, "eval.pairwise")
    keys = with_temperatures(per_sample, eval_cfg.get("temperatures") or [1.0])
    if eval_cfg.get("mt_bench"):
        keys |= judge_keys(eval_cfg.mt_bench, "eval.mt_bench")
    return keys


KINDS: dict[str, Callable[[Any], set[str]]] = {
    "synthetic": _synthetic_keys,
    "judges": _judges_config_keys,
    "benchmarks": benchmark_metric_keys,
}


def metric_keys(eval_cfg: DictConfig) -> set[str]:
    """The metric keys a run with ``eval_cfg`` writes (empty when evaluation is off)."""
    if not eval_cfg.get("enabled", False):
        return set()
    kind = eval_cfg.get("name")
    if kind not in KINDS:
        raise ValueError(f"eval.name={kind!r} is not one of {sorted(KINDS)} (or set eval.enabled=false)")
    return KINDS[kind](eval_cfg)
