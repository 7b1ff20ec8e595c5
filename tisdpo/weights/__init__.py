"""Token weights: estimator records (estimators/), contrast scores, transforms, attach (scores -> weights on the examples), TI-DPO prior/mixing and attribution."""
from .prior import gaussian_prior, mix_importance, random_weights, uniform_weights
from .transforms import TRANSFORMS, at_bound, clamp_linear, exp_clamp, rank_linear

__all__ = [
    "TRANSFORMS", "at_bound", "exp_clamp", "rank_linear", "clamp_linear",
    "gaussian_prior", "mix_importance", "uniform_weights", "random_weights",
]
