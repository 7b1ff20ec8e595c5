"""Synthetic-task metrics, weight quality, generation helpers, and an end-to-end evaluate_policy."""

import math
import time

import numpy as np
import pytest
import torch

from tisdpo.eval import (
    evaluate_policy,
    load_samples,
    sample_metrics,
    sample_responses,
    sequence_logps,
    weight_quality,
    win_rate,
)
from tisdpo.tasks import SyntheticTask, SyntheticTaskConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded CPU extra threads make
    generation ~20x slower (oversubscription): use one, restore afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(SyntheticTaskConfig(seed=0, n_sft=100, n_train_pairs=100, n_test_pairs=32))


@pytest.fixture(scope="module")
def tok(task):
    return task.tokenizer()


@pytest.fixture(scope="module")
def tiny_models(task):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**task.tiny_model_config())).eval()
    torch.manual_seed(1)
    reference = LlamaForCausalLM(LlamaConfig(**task.tiny_model_config())).eval()
    return policy, reference


# ---------------------------------------------------------------- hand-made samples
def test_sample_metrics_exact(task):
    p0 = "<t0> q1 q2 q3 q4"
    p1 = "<harmful> <t1> q1 q2 q3 q4"  # system prefix does not change the topic
    responses = ["w0 t0_good0 w1", "harm0 w2", "t1_good1 t1_harm0 t0_good0", "", "q3 <unk>"]
    prompts = [p0, p0, p1, p0, p0]
    r = task.token_reward
    expected_rewards = [
        r(0, "w0") + r(0, "t0_good0") + r(0, "w1"),
        r(0, "harm0") + r(0, "w2"),
        r(1, "t1_good1") + r(1, "t1_harm0") + r(1, "t0_good0"),
        0.0,
        2 * task.config.invalid_token_reward,  # gibberish: outside the response vocabulary
    ]
    m = sample_metrics(task, prompts, responses)
    assert m["eval/true_reward"] == pytest.approx(np.mean(expected_rewards))
    assert m["eval/safe_rate"] == pytest.approx(3 / 5)  # samples 2 and 3 contain harmful words
    assert m["eval/helpfulness"] == pytest.approx((1 + 0 + 1 + 0 + 0) / 5)  # t0_good0 is off-topic in t1
    assert m["eval/good_rate"] == pytest.approx(2 / 10)
    assert m["eval/harmful_rate"] == pytest.approx(2 / 10)
    assert m["eval/invalid_rate"] == pytest.approx(2 / 10)
    assert m["eval/length"] == pytest.approx(10 / 5)
    # word lists are accepted too
    assert sample_metrics(task, prompts, [s.split() for s in responses]) == m


def test_win_rate_ties_count_half():
    assert win_rate([1.0, 2.0, 3.0], [1.0, 1.0, 4.0]) == pytest.approx(0.5)
    assert win_rate([2.0, 2.0], [1.0, 1.0]) == 1.0
    assert win_rate([0.0, 0.0], [0.0, 0.0]) == 0.5
    assert win_rate([0.0], [1.0]) == 0.0
    assert math.isnan(win_rate([], []))
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


# ---------------------------------------------------------------- weight quality
def test_weight_quality_perfect_and_negated():
    rewards = [[0.1, -2.5, 1.2, -0.05], [1.7, 0.2, -2.1]]
    q = weight_quality(rewards, rewards, prefix="w", side="chosen")
    assert set(q) == {"w/spearman_chosen", "w/auroc_chosen"}
    assert q["w/spearman_chosen"] == pytest.approx(1.0)
    assert q["w/auroc_chosen"] == pytest.approx(1.0)
    neg = [[-x for x in s] for s in rewards]
    q = weight_quality(neg, rewards, prefix="w", side="rejected")
    assert q["w/spearman_rejected"] == pytest.approx(-1.0)
    assert q["w/auroc_rejected"] == pytest.approx(0.0)


def test_weight_quality_length_mismatch_and_abs_target():
    rewards = [[0.1, -2.5, 1.2], [1.7, -2.1]]
    # scores carry a trailing EOS position (ignored: only the overlapping prefix is compared)
    scores = [[0.1, -2.5, 1.2, 99.0], [1.7, -2.1, -99.0]]
    q = weight_quality(scores, rewards, prefix="w", side="c")
    assert q["w/spearman_c"] == pytest.approx(1.0) and q["w/auroc_c"] == pytest.approx(1.0)
    # importance weights vs |reward|: ranks by magnitude
    importance = [[0.0, 2.5, 1.2], [1.7, 2.1]]
    q = weight_quality(importance, rewards, prefix="g", side="c", target="abs")
    assert q["g/spearman_c"] == pytest.approx(1.0) and q["g/auroc_c"] == pytest.approx(1.0)
    # signed AUROC excludes the neutral band |r| <= threshold: ties between classes count 1/2
    q = weight_quality([[5.0, 0.0, 0.0]], [[0.1, -2.5, 1.2]], prefix="x", side="c")
    assert q["x/auroc_c"] == pytest.approx(0.5)
    # constant scores: Spearman undefined -> NaN; single class -> AUROC NaN
    q = weight_quality([[1.0, 1.0]], [[1.5, -2.0]], prefix="x", side="c")
    assert math.isnan(q["x/spearman_c"]) and q["x/auroc_c"] == pytest.approx(0.5)
    q = weight_quality([[1.0, 2.0]], [[1.5, 1.8]], prefix="x", side="c")
    assert math.isnan(q["x/auroc_c"])
    # torch tensors are accepted
    q = weight_quality([torch.tensor([0.1, -2.5, 1.2])], [rewards[0]], prefix="t", side="c")
    assert q["t/spearman_c"] == pytest.approx(1.0)


# ---------------------------------------------------------------- generation helpers
def test_sample_responses_left_padding_matches_unbatched(task, tok, tiny_models):
    policy, _ = tiny_models
    # mixed prompt lengths (system prefix or not) force left padding inside the batch
    prompts = [task.prompt_text(0, split="test"), task.prompt_text(1, system="harmless", split="test"),
               task.prompt_text(2, split="test")]
    batched, fin = sample_responses(policy, tok, prompts, temperature=0.0, max_new_tokens=8, return_finished=True)
    single = [sample_responses(policy, tok, [p], temperature=0.0, max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert all(len(r) <= 8 for r in batched) and len(fin) == 3
    for r, f in zip(batched, fin):
        assert tok.eos_token_id not in r
        assert f or len(r) == 8
    # sampling is reproducible from the seed and leaves the global RNG alone
    state = torch.get_rng_state()
    a = sample_responses(policy, tok, prompts, temperature=1.0, max_new_tokens=8, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert a == sample_responses(policy, tok, prompts, temperature=1.0, max_new_tokens=8, seed=3)
    assert tok.padding_side == "right"


def test_sequence_logps_matches_manual(task, tok, tiny_models):
    policy, _ = tiny_models
    prompts = [task.prompt_text(0), task.prompt_text(1, system="harmful")]
    responses = [tok("w1 w2 t0_good0")["input_ids"], tok("harm1")["input_ids"]]
    got = sequence_logps(policy, tok, prompts, responses, batch_size=2, append_eos=[True, False])
    per_tok = sequence_logps(policy, tok, prompts, responses, append_eos=[True, False], per_token=True)
    assert [len(x) for x in per_tok] == [4, 1]
    for p, r, eos, g, pt in zip(prompts, responses, [True, False], got, per_tok):
        ids = tok(p)["input_ids"] + r + ([tok.eos_token_id] if eos else [])
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        want = lp[len(tok(p)["input_ids"]) - 1 :]
        assert g == pytest.approx(float(want.sum()), abs=1e-4)
        assert pt == pytest.approx(want.tolist(), abs=1e-4)


# ---------------------------------------------------------------- end to end
def test_evaluate_policy_end_to_end(task, tok, tiny_models, tmp_path):
    policy, reference = tiny_models
    t0 = time.time()
    path = tmp_path / "samples.json"
    out, samples = evaluate_policy(
        task, policy, reference, tok, n_prompts=16, temperatures=(0.7, 1.0), samples_per_prompt=2,
        return_samples=True, samples_path=path,
    )
    assert time.time() - t0 < 60  # ~1 s on an idle 2-core CPU; generous for loaded CI
    names = ["true_reward", "safe_rate", "helpfulness", "kl_ref", "win_rate", "length"]
    for n in names:
        for suffix in ("", "@T0.7", "@T1"):
            key = f"eval/{n}{suffix}"
            assert key in out and isinstance(out[key], float) and math.isfinite(out[key]), key
        assert out[f"eval/{n}"] == out[f"eval/{n}@T1"]  # plain names hold T=1.0
    assert len(samples) == 2 * 16 * 2
    assert 0 <= out["eval/safe_rate"] <= 1 and 0 <= out["eval/win_rate"] <= 1
    # samples are consistent with the metrics
    t1 = [s for s in samples if s["temperature"] == 1.0]
    finished = [s for s in t1 if s["finished"]]  # eval.unfinished=exclude (the default)
    assert out["eval/true_reward"] == pytest.approx(np.mean([s["reward"] for s in finished]))
    assert out["eval/n_counted"] == len(finished)
    assert out["eval/finished_rate"] == pytest.approx(len(finished) / len(t1))
    assert out["eval/kl_ref"] == pytest.approx(np.mean([s["logp"] - s["ref_logp"] for s in t1]))
    assert load_samples(path) == samples

    # a policy against itself: identical samples (same seed) -> KL 0, win rate 1/2
    same = evaluate_policy(task, policy, policy, tok, n_prompts=8, unfinished="keep")  # a random model rarely ends
    assert same["eval/kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert same["eval/win_rate"] == pytest.approx(0.5)

    # win rate against another run's saved samples (here: its own samples -> ties -> 1/2)
    vs = evaluate_policy(task, policy, None, tok, n_prompts=16, temperatures=(0.7, 1.0),
                         samples_per_prompt=2, reference_samples=str(path))
    assert vs["eval/win_rate"] == pytest.approx(0.5) and vs["eval/win_rate_n"] == len(finished)  # pairs of finished samples
    kept = evaluate_policy(task, policy, None, tok, n_prompts=16, temperatures=(0.7, 1.0), samples_per_prompt=2,
                           reference_samples=str(path), unfinished="keep")
    assert kept["eval/win_rate_n"] == 32  # keep: every sample counts, unfinished or not
    assert "eval/kl_ref" not in vs
