"""KTO's reference point from mismatched in-batch pairs (x_i, y_{i+1}).

z = max(0, mean_i [log pi_theta(y_{i+1}|x_i) - log pi_ref(y_{i+1}|x_i)]), detached: the KL
estimate of Ethayarajh et al. (2024), built like TRL's KL dataset by pairing each prompt with
the next example's chosen response. Costs one extra no-grad forward of B sequences per model.
"""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX
from tisdpo.data.collate import prompt_response_batch
from tisdpo.kernels.logprobs import token_logps
from tisdpo.losses.record import StepContext


def mismatched_batch(batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, labels) of prompt_i + chosen response of example (i+1) mod B."""
    size = batch["chosen_input_ids"].shape[0]
    prompts = [batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist() for i in range(size)]
    responses = [batch["chosen_input_ids"][j][batch["chosen_labels"][j] != IGNORE_INDEX].tolist() for j in range(size)]
    shifted = responses[1:] + responses[:1]  # example i gets the response of example (i + 1) mod B
    ids, attention, labels = prompt_response_batch(prompts, shifted, pad_token_id, batch["chosen_input_ids"].device)
    return ids, attention, labels


@torch.no_grad()
def mismatched_kl_logps(ctx: StepContext) -> dict[str, torch.Tensor]:
    """{"kl_logps": [B]} policy-minus-reference log-ratio sums of the mismatched pairs."""
    if ctx.batch_size < 2:
        return {}  # no mismatched pair in a batch of one: kto_loss falls back to the matched estimate
    ids, attention, labels = mismatched_batch(ctx.batch, ctx.pad_token_id)
    sums = []
    for model in (ctx.policy, ctx.reference):
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        logps, mask = token_logps(logits, labels, chunk_size=ctx.chunk_size)
        sums.append((logps * mask).sum(-1))
    return {"kl_logps": sums[0] - sums[1]}
