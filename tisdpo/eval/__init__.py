"""Evaluation: generation, metrics, judges."""

from tisdpo.eval.generation import sample_responses, sequence_logps
from tisdpo.eval.synthetic_metrics import (
    evaluate_policy,
    load_samples,
    sample_metrics,
    save_samples,
    score_samples,
    win_rate,
)
from tisdpo.eval.weight_quality import auroc, spearman, weight_quality

__all__ = [
    "sample_responses",
    "sequence_logps",
    "evaluate_policy",
    "sample_metrics",
    "score_samples",
    "win_rate",
    "save_samples",
    "load_samples",
    "weight_quality",
    "auroc",
    "spearman",
]
