"""A DPO model's implicit token reward: r_t = log π_dpo(y_t | x, y<t) − log π_ref(y_t | x, y<t).

π_dpo = π+ of the DPO pair (DPO on the data from the SFT model, the D estimator's positive
model), π_ref = the model training starts from (the SFT model). This is SePO's oracle token
reward (the release's token_score.py: ``dpo_per_token_logps - ref_per_token_logps``) and TGDPO's
token-level reward model (``reward_chosen_logps - reference_chosen_logps``), before their
selection / guidance. The pair stage trains π− too (it trains both models of a pair).
"""
from __future__ import annotations

from tisdpo import checks
from tisdpo.weights.contrast import contrast_scores
from tisdpo.weights.estimators.common import check_pair_training, check_scoring
from tisdpo.weights.estimators.record import OFFLINE, EstimatorInputs, EstimatorRecord


def dpo_reward_scores(inputs: EstimatorInputs):
    """r_t = log π+(y_t) − log π_start(y_t) per response token; one model in memory at a time."""
    dpo = inputs.response_logps(inputs.load_model(inputs.models_dir / "positive"), inputs.examples)
    reference = inputs.response_logps(inputs.load_model(None), inputs.examples)
    return contrast_scores(dpo, reference, inputs.lengths)


def check_options(cfg) -> None:
    check_scoring(cfg)
    check_pair_training(cfg, max_steps_nullable=True)
    checks.in_range(cfg, "estimator.beta", low=0, low_open=True, note="the strength of the KL constraint")


ESTIMATOR = EstimatorRecord(kind=OFFLINE, scores=dpo_reward_scores, pair_models="dpo", check=check_options)
