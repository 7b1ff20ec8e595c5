"""How well token scores/weights recover the true token rewards (synthetic task).

``weight_quality(scores, true_rewards, prefix=..., side=...)`` returns

* ``{prefix}/spearman_{side}``: Spearman rank correlation over ALL tokens pooled across
  sequences (``scipy.stats.spearmanr``; ties get average ranks). NaN when either side is constant
  or there are fewer than 2 tokens. The synthetic task gives neutral tokens small distinct
  rewards, so the true rewards have no exact ties and the pooled Spearman also rewards getting
  the order of neutral tokens right.
* ``{prefix}/auroc_{side}``: AUROC of the score as a detector.
  ``target="signed"``: positives are tokens with reward > ``threshold``, negatives those with
  reward < −``threshold``; tokens with |reward| ≤ ``threshold`` (neutral) are EXCLUDED. The
  default ``threshold=0.5`` excludes the synthetic task's neutral band (|r| ≤ 0.25), so the
  AUROC measures "good vs harmful". ``target="abs"`` (for importance weights such as TI-DPO's
  gradient weights, compared to |reward|): positives are tokens with |reward| > ``threshold``
  ("important"), negatives the rest; Spearman is then against |reward|.
  Computed by Mann–Whitney with ties counted ½; NaN when a class is empty.

Length mismatch: each sequence is compared on its overlapping prefix
``min(len(scores_i), len(true_i))`` (scores may carry a trailing EOS position, or be padded).
Non-finite scores are dropped with their reward.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.stats import rankdata, spearmanr

from tisdpo.constants import SIDES


def _pool(scores: Sequence[Sequence[float]], true_rewards: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    if len(scores) != len(true_rewards):
        raise ValueError(f"{len(scores)} score sequences vs {len(true_rewards)} reward sequences")
    xs, ys = [], []
    for s, r in zip(scores, true_rewards):
        s = np.asarray(_to_list(s), dtype=np.float64).reshape(-1)
        r = np.asarray(_to_list(r), dtype=np.float64).reshape(-1)
        m = min(len(s), len(r))
        xs.append(s[:m])
        ys.append(r[:m])
    x = np.concatenate(xs) if xs else np.zeros(0)
    y = np.concatenate(ys) if ys else np.zeros(0)
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def _to_list(v):
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().float().cpu().numpy()
    return v


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (probability a random positive outscores a random negative,
    ties ½). NaN if either class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def weight_quality(
    scores: Sequence[Sequence[float]],
    true_rewards: Sequence[Sequence[float]],
    *,
    prefix: str = "weights",
    side: str = "chosen",
    target: str = "signed",
    threshold: float = 0.5,
) -> dict[str, float]:
    """Spearman and AUROC of per-token ``scores`` against per-token ``true_rewards``
    (see the module docstring). Returns ``{f"{prefix}/spearman_{side}", f"{prefix}/auroc_{side}"}``."""
    if target not in ("signed", "abs"):
        raise ValueError(f"target must be 'signed' or 'abs', got {target!r}")
    x, y = _pool(scores, true_rewards)
    if target == "abs":
        y_t = np.abs(y)
        rho = spearman(x, y_t)
        auc = auroc(x, y_t > threshold)
    else:
        rho = spearman(x, y)
        keep = np.abs(y) > threshold
        auc = auroc(x[keep], y[keep] > 0)
    return {
        f"{prefix}/spearman_{side}": rho,
        f"{prefix}/auroc_{side}": auc,
    }


__all__ = ["weight_quality", "auroc", "spearman"]


def true_token_rewards(rows: list[dict], examples: list[dict], side: str) -> list[list[float]] | None:
    """The built-in task's true reward of each response token of ``examples`` (None on real data)."""
    rewards = []
    for example in examples:
        meta = rows[example["index"]].get("meta") or {}
        key = f"{side}_token_rewards"
        if meta.get("label_flipped"):  # the rows were swapped after generation; the meta was not
            key = f"{'rejected' if side == 'chosen' else 'chosen'}_token_rewards"
        if key not in meta:
            return None
        rewards.append(list(meta[key]))
    return rewards


def quality_metrics(rows: list[dict], examples: list[dict], scores: dict, prefix: str = "weights",
                    target: str = "signed") -> dict[str, float]:
    """Spearman/AUROC of per-token ``scores`` ({side: [tensor or list per example]}) against the
    true token rewards, both sides; {} on real data (no true rewards)."""
    metrics: dict[str, float] = {}
    for side in SIDES:
        truth = true_token_rewards(rows, examples, side)
        if truth is None:
            return {}
        values = [s.tolist() if hasattr(s, "tolist") else list(s) for s in scores[side]]
        metrics.update(weight_quality(values, truth, prefix=prefix, side=side, target=target))
    return metrics
