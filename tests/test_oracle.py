"""estimator=oracle: the true token rewards through the same transform; refuses on real data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from tisdpo.eval.weight_quality import true_token_rewards
from tisdpo.stages.data import prepare_data
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.stages.runner import run
from tisdpo.stages.context import RunContext
from tisdpo.stages.weights import estimator_inputs, weights_stage
from tisdpo.weights.estimators.oracle import true_reward_scores


def test_oracle_run_weights_the_truly_good_tokens_up(tmp_path):
    cfg = compose_config(["method=tisdpo_oracle"], tmp_path)
    assert (cfg.loss.name, cfg.estimator.name, cfg.label) == ("tisdpo", "oracle", "TIS-DPO(oracle)")
    results = run(cfg)
    # raw scores ARE the truth; the final weights are its ranks within each response
    assert results["weights/raw/spearman_chosen"] == pytest.approx(1.0)
    # per-response ranks pooled over responses: good above harmful almost always
    assert results["weights/auroc_chosen"] > 0.999 and results["weights/auroc_rejected"] > 0.999
    assert results["weights/spearman_chosen"] > 0.8 and results["weights/spearman_rejected"] > 0.8
    assert results["weights/mean_chosen"] == pytest.approx(1.0) and results["weights/mean_rejected"] == pytest.approx(1.0)
    assert "val/rewards/accuracies" in results
    assert not any(e["stage"] in ("estimator", "scores") for e in results["stages"])  # no models to train


def test_oracle_scores_follow_label_flips(tmp_path):
    """dataset.label_noise swaps rows after generation: the oracle must read the shown side's truth."""
    cfg = compose_config(["loss=tisdpo", "estimator=oracle", "dataset.label_noise=0.5"], tmp_path)
    data = prepare_data(cfg)
    examples, _ = tokenize_pairs(data.train_rows, data.tokenizer, cfg.dataset, "train")
    scores = true_reward_scores(estimator_inputs(RunContext(cfg=cfg, output_dir=tmp_path, cache=None, data=data), examples))
    truth = true_token_rewards(data.train_rows, examples, "chosen")
    for s, t, e in zip(scores["chosen"], truth, examples):
        words = data.train_rows[e["index"]]["chosen"].split()
        assert len(t) == len(words)
        torch.testing.assert_close(s[:len(t)], torch.tensor(t, dtype=torch.float32))


def test_oracle_refuses_real_data_in_one_line(tmp_path):
    cfg = compose_config(["loss=tisdpo", "estimator=oracle"], tmp_path)
    data = prepare_data(cfg)
    examples, _ = tokenize_pairs(data.train_rows[:8], data.tokenizer, cfg.dataset, "train")
    real = type(data)(tokenizer=data.tokenizer, train_rows=[{k: v for k, v in r.items() if k != "meta"} for r in data.train_rows[:8]],
                      test_rows=[], sft_rows=[], task=None)
    with pytest.raises(ValueError) as error:
        weights_stage(RunContext(cfg=cfg, output_dir=Path(tmp_path), cache=None, data=real), examples)
    message = str(error.value)
    assert "\n" not in message and "estimator=oracle" in message and "built-in task" in message
