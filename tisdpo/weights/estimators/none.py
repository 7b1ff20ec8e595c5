"""No token weights (DPO, IPO, KTO, TDPO, SimPO, ...): a loss that takes weights refuses it."""
from tisdpo.weights.estimators.record import EstimatorRecord

ESTIMATOR = EstimatorRecord(kind=None)
