"""Slow, obviously-correct reference computations the fast code is tested against (test oracles:
they live with the tests, never in the package)."""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX, SIDES


def naive_response_logps(model, example: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One example at a time with a plain log_softmax: the reference the batched scorer is tested against."""
    out = []
    for side in SIDES:
        ids = torch.tensor([example[f"{side}_input_ids"]])
        labels = torch.tensor(example[f"{side}_labels"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        positions = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
        out.append(torch.tensor([logp[t - 1, labels[t]].item() for t in positions], dtype=torch.float64))
    return out[0], out[1]
