"""Harder variants of the built-in task: options of SyntheticTaskConfig; the default task is unchanged."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.conftest import CONF, compose_config
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

# sha256 of the default task's generated data (pairs, SFT rows, contrastive pairs, category mix,
# vocabulary, fingerprint) as generated before the variants existed: committed results depend on it.
DEFAULT_DIGEST = "f3d8e9537f5c885c56f6d87ed56decf4afca9d875c5a4496672cb079edf58eb6"
BIGRAM_NOISE_DIGEST = "8ba38f86b7f0e6922739ebe5e29d1c664e4d54494660de0e546c01f9830923a2"


def _digest(**options) -> str:
    task = SyntheticTask(SyntheticTaskConfig(n_sft=300, n_train_pairs=300, n_test_pairs=50, **options))
    blob = json.dumps([task.preference_pairs("train"), task.preference_pairs("test"), task.sft_examples(),
                       task.contrastive_pairs("train"), task.category_mix(n=200), task.vocab, task.fingerprint()],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def test_the_default_task_generates_exactly_the_same_data_as_before():
    assert _digest() == DEFAULT_DIGEST
    assert _digest(bigram_per_topic=True, label_noise=0.1) == BIGRAM_NOISE_DIGEST


@pytest.fixture(scope="module")
def context_task():
    return SyntheticTask(context_negators=8, negator_decisive_share=0.8, n_train_pairs=400, n_sft=50)


def test_context_rewards_are_per_position_and_negated_after_a_negator(context_task):
    task = context_task
    harm, good, negator, neutral = "harm0", "t0_good0", "w0", "w30"
    r_harm, r_good = task.token_reward(0, harm), task.token_reward(0, good)
    assert r_harm < -1 and r_good > 1
    assert task.token_rewards(0, [negator, harm, harm]) == pytest.approx(
        [task.token_reward(0, negator), -r_harm, r_harm])
    assert task.token_rewards(0, [neutral, good, negator, good]) == pytest.approx(
        [task.token_reward(0, neutral), r_good, task.token_reward(0, negator), -r_good])
    # an invalid word costs its price and negates nothing
    assert task.token_rewards(0, [negator, "<pad>", harm])[1:] == pytest.approx([-1.0, r_harm])


def test_context_meta_rewards_are_the_ones_the_policy_metrics_use(context_task):
    task = context_task
    rows = task.preference_pairs("train")
    negated = 0
    for row in rows:
        k = row["meta"]["topic"]
        for side in ("chosen", "rejected"):
            truth = row["meta"][f"{side}_token_rewards"]
            assert truth == pytest.approx(task.token_rewards(k, row[side]))  # eval/synthetic_metrics scores samples so
            assert row["meta"][f"{side}_reward"] == pytest.approx(task.sequence_reward(k, row[side]))
            free = [task.token_reward(k, w) for w in row[side].split()]
            negated += sum(abs(a - b) > 1 for a, b in zip(truth, free))
    assert negated > 0.05 * sum(len(r[s].split()) for r in rows for s in ("chosen", "rejected"))
    assert 0.75 < task.premise_stats(rows)["label_agreement"] < 1.0


def test_context_system_prefixes_tilt_by_the_contextual_reward(context_task):
    """The ideal TIS-DPO(P) score log p+(y_t) - log p-(y_t) has the sign of the CONTEXTUAL reward."""
    task = context_task

    def score(words, t):
        return task.response_logprob(0, words, "harmless")[t] - task.response_logprob(0, words, "harmful")[t]

    assert score(["harm0"], 0) < 0 < score(["w0", "harm0"], 1)
    assert score(["t0_good1"], 0) > 0 > score(["w1", "t0_good1"], 1)


def test_sparse_responses_have_exactly_the_decisive_words_asked_for():
    task = SyntheticTask(decisive_tokens=1, min_response_length=32, max_response_length=64, n_train_pairs=200, n_sft=100)
    rows = task.preference_pairs("train")
    for row in rows:
        k = row["meta"]["topic"]
        for side in ("chosen", "rejected"):
            words = row[side].split()
            assert 32 <= len(words) <= 64
            assert sum(task.word_category(k, w) in ("good", "harmful") for w in words) == 1
    for row in task.sft_examples():
        k = task.topic_of(row["prompt"])
        assert sum(task.word_category(k, w) in ("good", "harmful") for w in row["response"].split()) == 1
    assert 0.7 < task.premise_stats(rows)["label_agreement"] < 1.0
    two = SyntheticTask(decisive_tokens=2, n_train_pairs=50, n_sft=10)
    assert all(sum(two.word_category(r["meta"]["topic"], w) in ("good", "harmful") for w in r["chosen"].split()) == 2
               for r in two.preference_pairs("train"))


def test_hard_contrastive_pairs_are_not_perfectly_separable():
    def share_misordered(task):
        rows = task.contrastive_pairs("train")
        return np.mean([r["meta"]["chosen_reward"] <= r["meta"]["rejected_reward"] for r in rows])

    assert share_misordered(SyntheticTask(n_train_pairs=500)) == 0.0
    hard = SyntheticTask(contrastive_shift=0.25, n_train_pairs=500)
    assert 0.05 < share_misordered(hard) < 0.3
    rows = hard.contrastive_pairs("train")
    assert all(r["meta"]["chosen_token_rewards"] == pytest.approx(hard.token_rewards(r["meta"]["topic"], r["chosen"]))
               for r in rows[:50])


@pytest.mark.parametrize("options,message", [
    ({"context_negators": 99}, "context_negators=99"),
    ({"negator_decisive_share": 1.0}, "negator_decisive_share=1.0"),
    ({"decisive_tokens": 7}, "decisive_tokens=7"),
])
def test_bad_variant_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        SyntheticTaskConfig(**options)


def test_fingerprint_changes_only_with_a_variant():
    base = SyntheticTask(n_sft=10).fingerprint()
    assert SyntheticTask(n_sft=10, decisive_tokens=0, contrastive_shift=None).fingerprint() == base
    assert SyntheticTask(n_sft=10, context_negators=2).fingerprint() != base


@pytest.mark.parametrize("variant", ["context", "sparse", "small", "noisy", "contrastive_hard", "default", "credit"])
def test_every_variant_dataset_and_experiment_compose(variant, tmp_path):
    from omegaconf import OmegaConf
    from tisdpo.runtime.validate import validate_config

    cfg = compose_config([f"experiment=variant_{variant}", "method=tisdpo_oracle"], tmp_path, tiny=False)
    validate_config(cfg)
    assert cfg.dataset.name == "synthetic" and cfg.label == "TIS-DPO(oracle)"
    params = OmegaConf.load(CONF / "experiment" / f"variant_{variant}.yaml").hydra.sweeper.params
    methods = params.method.split(",")
    # TI-DPO as released and as the paper writes it, beside the oracle and the random-weight control
    assert {"dpo", "tisdpo_d", "tisdpo_oracle", "tisdpo_random", "tidpo", "tidpo_paper"} <= set(methods)
    assert "every_n_steps" not in cfg.eval or cfg.eval.every_n_steps == 10  # the dense default curve, not a coarse grid
    SyntheticTaskConfig(**OmegaConf.to_container(cfg.dataset.task))  # every option is a task field
