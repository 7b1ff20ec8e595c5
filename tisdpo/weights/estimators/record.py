"""What the system asks of a token-weight estimator, in one record beside its code.

- ``kind``: ``OFFLINE`` (weights for every training token before training, attached to the
  examples), ``ONLINE`` (weights from the current policy every step), or None (no weights);
  a loss takes an estimator whose kind is in its record's ``token_weights``;
- ``scores(inputs)``: offline per-token scores, turned into weights by ``estimator.transform``
  (``weights/attach.py``); cached as the ``scores`` artifact under the estimator's whole config
  node (less ``attach.POST_SCORE_KEYS``), unless ``cache_scores`` is False (cheap, e.g. the oracle);
- ``weights(inputs)``: offline weights directly, with no transform (random, uniform);
- ``online(inputs)``: the per-step hook ``(StepContext) -> (chosen_w, rejected_w)``;
- ``pair_models``: "sft" or "dpo" when the scores need π+/π− trained first (the stage trains and
  caches them, then hands their directory in ``inputs.models_dir``);
- ``needs_task``: only the built-in task has what it needs (true token rewards);
- ``check(cfg)``: its option checks (``tisdpo.checks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig

from tisdpo.losses.record import OFFLINE, ONLINE

__all__ = ["OFFLINE", "ONLINE", "EstimatorInputs", "EstimatorRecord"]

Scores = dict[str, list[torch.Tensor]]  # side -> one 1-D tensor per response (one value per response token)


@dataclass
class EstimatorInputs:
    """What an estimator may use. The services (``load_model``, ``tokenize``, ``response_logps``)
    come from the stage, so an estimator never reaches into the run's config or cache."""

    node: DictConfig                       # the estimator's own config node
    rows: list[dict]                       # training rows {prompt, chosen, rejected, ...}
    examples: list[dict]                   # the tokenised training examples, in the same order
    tokenizer: Any
    task: Any                              # the built-in task, or None on real data
    seed: int
    masks: dict[str, list[torch.Tensor]]   # which response tokens carry a weight (EOS rule)
    lengths: dict[str, list[int]]          # response tokens per example and side
    load_model: Callable[[Optional[Path]], Any]          # None: the model training starts from
    tokenize: Callable[[list[dict], str], list[dict]]    # rows -> examples (the run's tokenisation)
    response_logps: Callable[[Any, list[dict]], tuple]  # (model, examples) -> (chosen, rejected) per-token log-probs
    models_dir: Optional[Path] = None      # π+ in models_dir/positive, π− in models_dir/negative


@dataclass(frozen=True)
class EstimatorRecord:
    kind: Optional[str]
    scores: Optional[Callable[[EstimatorInputs], Scores]] = None
    weights: Optional[Callable[[EstimatorInputs], Scores]] = None
    online: Optional[Callable[[EstimatorInputs], Callable]] = None
    pair_models: Optional[str] = None
    cache_scores: bool = True
    needs_task: bool = False
    check: Optional[Callable[[Any], None]] = None

    def __post_init__(self):
        if self.kind not in (None, OFFLINE, ONLINE):
            raise ValueError(f"EstimatorRecord.kind must be None, {OFFLINE!r} or {ONLINE!r}, got {self.kind!r}")
        if self.kind == OFFLINE and (self.scores is None) == (self.weights is None):
            raise ValueError("an offline EstimatorRecord gives exactly one of scores= or weights=")
        if self.kind == ONLINE and self.online is None:
            raise ValueError("an online EstimatorRecord needs online=")
