"""The "random weight" ablation: w ~ U(low, high) i.i.d. per token, seeded by the run's seed."""
from __future__ import annotations

import torch

from tisdpo import checks
from tisdpo.constants import SIDES
from tisdpo.weights.estimators.record import OFFLINE, EstimatorInputs, EstimatorRecord


def random_weights(inputs: EstimatorInputs):
    generator = torch.Generator().manual_seed(inputs.seed)
    low, high = float(inputs.node.low), float(inputs.node.high)
    return {side: [(low + (high - low) * torch.rand(n, generator=generator)) * m
                   for n, m in zip(inputs.lengths[side], inputs.masks[side])] for side in SIDES}


def check_options(cfg) -> None:
    checks.low_high(cfg, "estimator")
    checks.flag(cfg, "estimator.weight_eos")


ESTIMATOR = EstimatorRecord(kind=OFFLINE, weights=random_weights, check=check_options)
