"""Evaluation that length cannot game: the sampling cap, unfinished samples, per-token and
length-controlled true reward (tisdpo/eval/synthetic_metrics.py, pipeline/eval_stage.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import compose_config
from tisdpo.eval.synthetic_metrics import counted, evaluate_policy, length_controlled_reward, length_fit, summarize
from tisdpo.stages.data import prepare_data
from tisdpo.stages.evaluation import eval_max_new_tokens, longest_response_tokens
from tisdpo.runtime.validate import ConfigError
from tisdpo.tasks import SyntheticTask, SyntheticTaskConfig


def sample(reward: float, n_tokens: int, finished: bool = True, **extra) -> dict:
    return {"reward": reward, "n_tokens": n_tokens, "finished": finished, "safe": True, "n_good": 0,
            "n_harmful": 0, "n_invalid": 0, **extra}


# ---------------------------------------------------------------- unfinished samples
def test_unfinished_rules():
    cut = sample(9.0, 17, finished=False)
    assert counted(cut, "exclude") is None
    assert counted(cut, "penalize", -3.0)["reward"] == -3.0 and cut["reward"] == 9.0  # a copy
    assert counted(cut, "keep") is cut
    whole = sample(2.0, 5)
    assert all(counted(whole, mode) is whole for mode in ("exclude", "penalize", "keep"))
    assert counted({"reward": 1.0, "n_tokens": 3}, "exclude") is not None  # old samples.json: no flag = finished
    with pytest.raises(ValueError, match="unfinished='drop'"):
        counted(cut, "drop")


def test_summary_by_rule():
    scored = [sample(2.0, 4), sample(4.0, 8), sample(20.0, 17, finished=False)]
    exclude = summarize(scored, unfinished="exclude")
    assert exclude["eval/true_reward"] == 3.0 and exclude["eval/n_counted"] == 2
    assert exclude["eval/true_reward_per_token"] == pytest.approx(6.0 / 12)
    assert exclude["eval/length"] == 6.0
    assert exclude["eval/finished_rate"] == pytest.approx(2 / 3)  # always over all samples
    penalize = summarize(scored, unfinished="penalize", unfinished_reward=-3.0)
    assert penalize["eval/true_reward"] == pytest.approx(1.0) and penalize["eval/n_counted"] == 3
    keep = summarize(scored, unfinished="keep")
    assert keep["eval/true_reward"] == pytest.approx(26.0 / 3)
    # nothing finished: every averaged metric is NaN (null in results.json), not a missing key
    none = summarize([sample(1.0, 17, finished=False)], unfinished="exclude")
    assert math.isnan(none["eval/true_reward"]) and none["eval/finished_rate"] == 0.0


def test_win_rate_leaves_out_unfinished_pairs():
    policy = [sample(3.0, 5), sample(9.0, 17, finished=False), sample(1.0, 5)]
    other = [sample(2.0, 5), sample(1.0, 5), sample(1.0, 17, finished=False)]
    m = summarize(policy, other, unfinished="exclude")
    assert m["eval/win_rate"] == 1.0 and m["eval/win_rate_n"] == 1
    m = summarize(policy, other, unfinished="penalize", unfinished_reward=-3.0)
    assert m["eval/win_rate"] == pytest.approx((1 + 0 + 1) / 3)


# ---------------------------------------------------------------- length-controlled reward
def test_length_fit_and_controlled_reward():
    comparison = [sample(1.0 + 0.5 * n, n) for n in (4, 8, 12)]  # reward = 1 + 0.5 * length exactly
    a, b = length_fit(comparison)
    assert (a, b) == pytest.approx((1.0, 0.5))
    # the comparison itself, and a longer policy that is exactly as good per extra token: 0
    assert length_controlled_reward(comparison, comparison)[0] == pytest.approx(0.0, abs=1e-12)
    longer = [sample(1.0 + 0.5 * 16, 16)]
    assert length_controlled_reward(longer, comparison) == pytest.approx((0.0, 0.5), abs=1e-12)
    # ... while the raw sum prefers the longer answers
    assert longer[0]["reward"] > max(s["reward"] for s in comparison)
    better = [sample(2.0 + 0.5 * 6, 6)]
    assert length_controlled_reward(better, comparison)[0] == pytest.approx(1.0)
    # one comparison length: no slope, the comparison's mean is the baseline
    assert length_fit([sample(2.0, 5), sample(4.0, 5)]) == (3.0, 0.0)
    assert math.isnan(length_controlled_reward(better, [])[0])


def test_lc_and_per_token_from_evaluate_policy():
    task = SyntheticTask(SyntheticTaskConfig(seed=0, n_sft=32, n_train_pairs=16, n_test_pairs=16))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**task.tiny_model_config())).eval()
    out, samples = evaluate_policy(task, model, model, n_prompts=16, unfinished="keep", return_samples=True)
    # the policy against itself: same samples, so no length-controlled gain and a win rate of 1/2
    assert out["eval/true_reward_lc"] == pytest.approx(0.0, abs=1e-9) and out["eval/win_rate"] == 0.5
    assert out["eval/true_reward_per_token"] == pytest.approx(
        sum(s["reward"] for s in samples) / sum(s["n_tokens"] for s in samples))
    # the default cap: the task's longest response plus EOS: a finished answer is never longer than
    # the data's, an unfinished one is cut one token past them
    longest = task.config.max_response_length
    assert all(s["n_tokens"] <= longest for s in samples if s["finished"])
    assert all(s["n_tokens"] == longest + 1 for s in samples if not s["finished"])


# ---------------------------------------------------------------- the sampling cap
@pytest.fixture(scope="module")
def tiny_data():
    return prepare_data(compose_config([]))


def test_cap_is_the_longest_training_response(tiny_data):
    longest = max(len(r[side].split()) for r in tiny_data.train_rows for side in ("chosen", "rejected"))
    assert longest_response_tokens(tiny_data) == longest + 1  # word-level tokenizer; + EOS
    cfg = compose_config(["eval.max_new_tokens=null"])
    assert eval_max_new_tokens(cfg, tiny_data) == longest + 1
    assert eval_max_new_tokens(compose_config(["eval.max_new_tokens=9"]), tiny_data) == 9  # explicit wins
    # the default is the data's own cap (null), never above the task's longest response + EOS
    assert compose_config([], tiny=False).eval.max_new_tokens is None
    # (the default task is dataset=synthetic_credit since issue #22: its own longest response, not the old default's)
    assert longest_response_tokens(tiny_data) <= tiny_data.task.config.max_response_length + 1


def test_no_training_pairs_no_null_cap():
    data = SimpleNamespace(train_rows=[], tokenizer=None)
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        longest_response_tokens(data)
