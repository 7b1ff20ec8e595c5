"""TIS-DPO(S): π+ = SFT on the chosen responses, π− = SFT on the rejected ones (from the base model,
or from our SFT model with ``init=sft``); r_t = log π+(y_t) − log π−(y_t)."""
from __future__ import annotations

from tisdpo import checks
from tisdpo.weights.estimators.common import check_pair_training, check_scoring, model_pair_scores
from tisdpo.weights.estimators.record import OFFLINE, EstimatorRecord


def check_options(cfg) -> None:
    check_scoring(cfg)
    check_pair_training(cfg, max_steps_nullable=False)
    checks.one_of(cfg, "estimator.init", ("base", "sft"))


ESTIMATOR = EstimatorRecord(kind=OFFLINE, scores=model_pair_scores, pair_models="sft", check=check_options)
