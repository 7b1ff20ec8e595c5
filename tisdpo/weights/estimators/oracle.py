"""Control: the built-in task's TRUE token rewards as the scores, through the same transform and
EOS rule as the estimators: the upper bound of what token weighting can do on that task."""
from __future__ import annotations

from tisdpo.checks import ConfigError
from tisdpo.constants import SIDES
from tisdpo.eval.weight_quality import true_token_rewards
from tisdpo.weights.contrast import oracle_scores
from tisdpo.weights.estimators.common import check_transform
from tisdpo.weights.estimators.record import OFFLINE, EstimatorInputs, EstimatorRecord


def true_reward_scores(inputs: EstimatorInputs):
    truth = {side: true_token_rewards(inputs.rows, inputs.examples, side) for side in SIDES}
    if inputs.task is None or any(t is None for t in truth.values()):
        raise ConfigError("estimator=oracle needs true token rewards, which only the built-in task has "
                          "(dataset=synthetic or a synthetic_* variant); use prompt, sft_pair or dpo_pair on real data")
    return {side: oracle_scores(truth[side], inputs.lengths[side]) for side in SIDES}


# cheap to recompute: no scores artifact
ESTIMATOR = EstimatorRecord(kind=OFFLINE, scores=true_reward_scores, cache_scores=False, needs_task=True,
                            check=check_transform)
