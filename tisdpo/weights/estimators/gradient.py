"""TI-DPO: online weights from the current policy each step: L1 norm of the gradient of the max
logit w.r.t. each input embedding, mixed with a Gaussian position prior (``weights/gradient.py``)."""
from __future__ import annotations

from tisdpo import checks
from tisdpo.weights.estimators.record import ONLINE, EstimatorInputs, EstimatorRecord
from tisdpo.weights.gradient import GradientWeights


def gradient_hook(inputs: EstimatorInputs) -> GradientWeights:
    node = inputs.node
    return GradientWeights(lam=float(node.lam), normalize=str(node.normalize),
                           weight_eos=bool(node.get("weight_eos", True)), eos_token_id=inputs.tokenizer.eos_token_id)


def check_options(cfg) -> None:
    checks.in_range(cfg, "estimator.lam", low=0, high=1, note="1: no prior, 0: prior only")
    checks.one_of(cfg, "estimator.normalize", ("response", "sequence"))
    checks.in_range(cfg, "estimator.quality_every_n_steps", low=0, integer=True)
    checks.flag(cfg, "estimator.weight_eos")


ESTIMATOR = EstimatorRecord(kind=ONLINE, online=gradient_hook, check=check_options)
