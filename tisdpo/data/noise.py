"""Label noise for robustness sweeps (0/10/20/40% flipped preferences)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["flip_labels"]

_SWAPPED = (("chosen", "rejected"), ("chosen_weights", "rejected_weights"))


def flip_labels(rows: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], int]:
    """Swap chosen/rejected (and their weights) on exactly ``round(fraction * len(rows))`` rows.

    Which rows flip is a seeded choice, so a sweep over ``fraction`` at one seed is
    reproducible. Returns new row dicts (the input is not modified; ``meta`` is copied and
    gets ``label_flipped``) and the number flipped.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"dataset.label_noise must be a fraction in [0, 1], got {fraction!r}")
    n_flip = round(fraction * len(rows))
    flipped = set(random.Random(seed).sample(range(len(rows)), n_flip))
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        meta = dict(row.get("meta") or {})
        meta["label_flipped"] = i in flipped
        row["meta"] = meta
        if i in flipped:
            for a, b in _SWAPPED:
                if a in row or b in row:
                    row[a], row[b] = row.get(b), row.get(a)
                    # a pair with weights on one side only stays that way, just swapped
                    for key in (a, b):
                        if row[key] is None:
                            del row[key]
        out.append(row)
    return out, n_flip
