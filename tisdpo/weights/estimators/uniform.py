"""The "equal weight" ablation: w = 1 on every response token that carries a weight (the final
EOS gets 0 unless ``weight_eos``, as the estimators)."""
from __future__ import annotations

from tisdpo import checks
from tisdpo.constants import SIDES
from tisdpo.weights.estimators.record import OFFLINE, EstimatorInputs, EstimatorRecord


def uniform_weights(inputs: EstimatorInputs):
    return {side: [m.float() for m in inputs.masks[side]] for side in SIDES}


ESTIMATOR = EstimatorRecord(kind=OFFLINE, weights=uniform_weights,
                            check=lambda cfg: checks.flag(cfg, "estimator.weight_eos"))
