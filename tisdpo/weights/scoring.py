"""Per-response-token log-probs of tokenised preference examples under a model, batched.

One forward per model per batch (chosen and rejected concatenated), log-probs gathered at
the response positions only. The result is ragged: one 1-D float tensor per response, its
length the number of response tokens of that example (EOS included).
"""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.data.collate import PreferenceCollator, concat_pair
from tisdpo.losses.logprobs import token_logps


def _response_values(values: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [row[m].float().cpu() for row, m in zip(values, mask.bool())]


@torch.no_grad()
def response_logps(model, examples: list[dict], pad_token_id: int, batch_size: int = 64,
                   chunk_size: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(chosen, rejected) lists of per-token log-probs, one tensor per example, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = PreferenceCollator(pad_token_id)
    chosen_out: list[torch.Tensor] = []
    rejected_out: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        size = batch["chosen_input_ids"].shape[0]
        ids, attention, labels = (concat_pair(batch, key).to(device) for key in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        logps, mask = token_logps(logits, labels, chunk_size=chunk_size)
        values = _response_values(logps, mask)
        chosen_out += values[:size]
        rejected_out += values[size:]
    model.train(was_training)
    return chosen_out, rejected_out


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
