"""TIS-DPO(D): π+ = DPO on the data, π− = DPO on the data with chosen/rejected swapped, both from
the SFT model; r_t = log π+(y_t) − log π−(y_t)."""
from __future__ import annotations

from tisdpo import checks
from tisdpo.weights.estimators.common import check_pair_training, check_scoring, model_pair_scores
from tisdpo.weights.estimators.record import OFFLINE, EstimatorRecord


def check_options(cfg) -> None:
    check_scoring(cfg)
    check_pair_training(cfg, max_steps_nullable=True)
    checks.in_range(cfg, "estimator.beta", low=0, low_open=True, note="the strength of the KL constraint")


ESTIMATOR = EstimatorRecord(kind=OFFLINE, scores=model_pair_scores, pair_models="dpo", check=check_options)
