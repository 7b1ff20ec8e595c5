"""Checks and scoring steps that several estimators share."""
from __future__ import annotations

from tisdpo import checks
from tisdpo.constants import SIDES
from tisdpo.weights.contrast import contrast_scores
from tisdpo.weights.estimators.record import EstimatorInputs, Scores
from tisdpo.weights.transforms import TRANSFORMS


def check_transform(cfg) -> None:
    """The ``estimator.transform`` node: a known transform with sane parameters."""
    if checks.get(cfg, "estimator.transform") in (checks.ABSENT, None):
        return
    checks.one_of(cfg, "estimator.transform.name", tuple(TRANSFORMS))
    name = cfg.estimator.transform.name
    node = f"estimator.transform.{name}"
    if name == "exp_clamp":
        checks.in_range(cfg, f"{node}.k", low=0, low_open=True, note="the weight scale")
        checks.in_range(cfg, f"{node}.mu", low=0)
        for option in ("lower", "upper"):
            checks.in_range(cfg, f"{node}.{option}", integer=False)
        lower, upper = checks.get(cfg, f"{node}.lower"), checks.get(cfg, f"{node}.upper")
        if lower is not checks.ABSENT and upper is not checks.ABSENT and float(lower) > float(upper):
            raise checks.ConfigError(f"{node}.lower={lower} must be <= {node}.upper={upper}")
        checks.flag(cfg, f"{node}.rescale_mean_one")
    else:
        # signed_linear alone may give weights <= 0 (a deviation: a harmful chosen token pushed down)
        checks.low_high(cfg, node, allow_negative=name == "signed_linear")
        if name in ("clamp_linear", "signed_linear"):
            checks.in_range(cfg, f"{node}.bound", low=0, low_open=True)


def check_scoring(cfg) -> None:
    checks.in_range(cfg, "estimator.score_batch_size", low=1, integer=True)
    checks.flag(cfg, "estimator.weight_eos")
    check_transform(cfg)


def check_pair_training(cfg, *, max_steps_nullable: bool) -> None:
    checks.in_range(cfg, "estimator.max_steps", low=1, integer=True, nullable=max_steps_nullable,
                    note="null: estimator.epochs passes, as the run's own training")
    checks.in_range(cfg, "estimator.batch_size", low=1, integer=True)


def model_pair_scores(inputs: EstimatorInputs) -> Scores:
    """r_t = log π+(y_t) − log π−(y_t) with π± from ``inputs.models_dir``; one model in memory at a
    time (two 7B models would not fit beside each other on many hosts)."""
    positive = inputs.response_logps(inputs.load_model(inputs.models_dir / "positive"), inputs.examples)
    negative = inputs.response_logps(inputs.load_model(inputs.models_dir / "negative"), inputs.examples)
    return contrast_scores(positive, negative, inputs.lengths)


__all__ = ["SIDES", "check_transform", "check_scoring", "check_pair_training", "model_pair_scores"]
