"""dataset=synthetic_credit (issue #22) and experiments/credit_check.py, the done-when checker."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import credit_check
from tests.conftest import compose_config
from tisdpo.tasks import SyntheticTask


def test_credit_task_is_what_its_config_says():
    cfg = compose_config(["dataset=synthetic_credit"], tiny=False)
    task = SyntheticTask(dict(cfg.dataset.task))
    c = task.config
    assert (c.n_train_pairs, c.min_response_length, c.max_response_length, c.decisive_tokens) == (300, 16, 24, 0)
    assert task.fingerprint() != SyntheticTask().fingerprint()
    mix = task.category_mix(n=1500)
    decisive_per_response = (mix["good_share"] + mix["harmful_share"]) * 20  # mean length 20
    assert 0.8 < decisive_per_response < 1.5  # one or two decisive words among ~20
    pairs = task.preference_pairs("train", n=200)
    assert all(16 <= len(r["chosen"].split()) <= 24 for r in pairs)
    assert cfg.eval.every_n_steps == 10 and cfg.eval.curve_n_prompts == 256


def _curve(kls, rewards, per_token, se=0.1):
    return [{"step": 10 * i, "kl_ref": k, "true_reward": r, "true_reward_per_token": p, "true_reward_se": se,
             "safe_rate": 0.8, "length": 20.0, "finished_rate": 1.0}
            for i, (k, r, p) in enumerate(zip(kls, rewards, per_token))]


def _write(root, name, label, seed, curve, frontier, every=10):
    d = root / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps({
        "eval/curve": curve, "eval/optimal_frontier": frontier, "time/total_s": 60.0,
        "config": {"label": label, "seed": seed, "eval": {"every_n_steps": every}}}))


def test_reading_follows_step_order_not_sorted_kl():
    # KL dips at step 20: the first crossing of 0.5 is between steps 10 and 30 (KL 0.4 -> 0.8 at 10/20/30)
    curve = _curve([0.0, 0.4, 0.3, 0.8], [0.0, 1.0, 5.0, 2.0], [0, 0, 0, 0])
    assert credit_check.reading(curve, 0.2, "true_reward") == pytest.approx(0.5)
    assert credit_check.reading(curve, 0.6, "true_reward") == pytest.approx(3.2)   # KL 0.3 -> 0.8: 60% of 5.0 -> 2.0
    assert np.isnan(credit_check.reading(curve, 2.0, "true_reward"))


def test_credit_check_criteria(tmp_path):
    frontier = [{"kl": k, "true_reward": 3 * np.sqrt(k)} for k in np.linspace(0, 4, 41)]
    kls = [0.0, 0.5, 1.0, 2.0, 3.0]
    for seed in (0, 1, 2):
        _write(tmp_path, f"dpo{seed}", "DPO", seed, _curve(kls, [0, 0.3, 0.6, 0.9, 1.1], [0, .01, .02, .03, .04]), frontier)
        _write(tmp_path, f"or{seed}", "TIS-DPO(oracle)", seed,
               _curve(kls, [0, 0.6, 1.2, 1.8, 2.2], [0, .03, .05, .07, .09]), frontier)
        _write(tmp_path, f"rnd{seed}", "random weight", seed,
               _curve(kls, [0, 0.3, 0.6, 0.9, 1.1], [0, .011, .021, .031, .041]), frontier)
    dense = tmp_path / "dense"
    dense.mkdir()
    _write(dense, "dpo", "DPO", 0, _curve([0, .25, .5, .75, 1, 1.5, 2, 2.5, 3],
                                          [0, .15, .3, .45, .6, .75, .9, 1.0, 1.1], [0] * 9), frontier, every=2)
    _write(dense, "or", "TIS-DPO(oracle)", 0, _curve([0, .5, 1, 2, 3], [0, .6, 1.2, 1.8, 2.2], [0] * 5), frontier, 2)
    result = credit_check.check(credit_check.load_runs([tmp_path / f for f in ("dpo0", "dpo1", "dpo2", "or0", "or1",
                                                                                "or2", "rnd0", "rnd1", "rnd2")]),
                                credit_check.load_runs([dense]), ("DPO", "TIS-DPO(oracle)", "random weight"))
    crit = result["criteria"]
    assert result["budgets"] == pytest.approx([0.75, 1.5, 2.25])
    assert crit["1_oracle_beats_dpo_per_token"]["pass"]
    assert crit["2_random_less_than_half"]["pass_"]
    assert crit["3_below_optimal_frontier"]["pass"]
    assert crit["4_dpo_leaves_30pct"]["dpo_mean_share"] == pytest.approx(0.75 / (3 * np.sqrt(1.5)), rel=1e-3)
    assert crit["5_interpolation_error"]["pass"] is False  # the dense runs have per-token 0: far from the default's
    # a point above the frontier by more than 1.96 SE fails (3)
    _write(tmp_path, "dpo3", "DPO", 3, _curve(kls, [0, 3.0, 0.6, 0.9, 1.1], [0, .01, .02, .03, .04]), frontier)
    runs = credit_check.load_runs([tmp_path])
    assert not credit_check.check(runs, [], ("DPO", "TIS-DPO(oracle)", "random weight"))["criteria"][
        "3_below_optimal_frontier"]["pass"]
