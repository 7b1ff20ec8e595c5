"""Per-response-token log-probs of tokenised preference examples under a model, batched.

One forward per model per batch (chosen and rejected concatenated), log-probs gathered at
the response positions only. The result is ragged: one 1-D float tensor per response, its
length the number of response tokens of that example (EOS included).

Why it is as fast as a bare forward (bench/scoring.py measures it):
- examples are batched longest first, so a batch pads to lengths close to its own;
- for the architectures whose logits are exactly ``lm_head(last hidden state)`` (``_HEAD_ONLY``),
  the output head runs on the response positions only: prompt and padding positions never get a
  [V]-wide logit row (at V = 128k that row is most of the memory a scoring batch needs);
- values stay on the device until the end: one transfer, no per-row synchronisation.
"""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.data.collate import PreferenceCollator, concat_pair
from tisdpo.kernels.logprobs import token_logps

# model_type values whose CausalLM forward computes logits = lm_head(base_model(...).last_hidden_state)
# with nothing after it (no soft-capping, no logit scale): the head may run on chosen rows only.
_HEAD_ONLY = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
# At most this many float32 logit elements per head block (64 MB): small vocabularies get big
# blocks (few Python iterations), large ones fall back to `chunk_size` rows.
_BLOCK_ELEMENTS = 1 << 24


def _head_only(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in _HEAD_ONLY and model.get_output_embeddings() is not None
            and getattr(model, "base_model", model) is not model)


def _picked_logps_from_hidden(model, ids, attention, labels, chunk_size: int) -> torch.Tensor:
    """Flat log-probs of the response labels, row-major: the head runs on response positions only."""
    mask = labels[:, 1:] != IGNORE_INDEX
    hidden = model.base_model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    selected = hidden[:, :-1][mask]  # position t-1 predicts label t
    targets = labels[:, 1:][mask]
    head = model.get_output_embeddings()
    rows = max(chunk_size, _BLOCK_ELEMENTS // max(1, head.weight.shape[0]))
    out = []
    for start in range(0, selected.shape[0], rows):
        logits = head(selected[start: start + rows]).float()
        picked = logits.gather(-1, targets[start: start + rows, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, -1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _picked_logps_from_logits(model, ids, attention, labels, chunk_size: int) -> torch.Tensor:
    """Any causal LM: full logits, the chunked kernel, then the response positions, row-major."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    logps, mask = token_logps(logits, labels, chunk_size=chunk_size)
    return logps[mask].float()


def _length_order(examples: list[dict]) -> list[int]:
    """Indices longest first (a batch pads to its longest row; the first batch shows an OOM at once)."""
    size = [max(len(ex[f"{side}_input_ids"]) for side in SIDES) for ex in examples]
    return sorted(range(len(examples)), key=lambda i: -size[i])


def response_logps(model, examples: list[dict], pad_token_id: int, batch_size: int = 64,
                   chunk_size: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(chosen, rejected) lists of per-token log-probs, one tensor per example, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = PreferenceCollator(pad_token_id)
    picked = _picked_logps_from_hidden if _head_only(model) else _picked_logps_from_logits
    order = _length_order(examples)
    flat, counts = [], []  # per batch: response log-probs (on device), response lengths [2B]
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start: start + batch_size]])
            ids, attention, labels = (concat_pair(batch, key).to(device) for key in ("input_ids", "attention_mask", "labels"))
            flat.append(picked(model, ids, attention, labels, chunk_size))
            counts.append((labels[:, 1:] != IGNORE_INDEX).sum(-1))
    model.train(was_training)
    # Outside inference mode: the returned tensors are ordinary ones (usable in autograd, writable).
    values = torch.cat(flat).float().cpu().split(torch.cat(counts).cpu().tolist()) if flat else ()
    chosen: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    rejected: list[torch.Tensor] = [torch.empty(0)] * len(examples)
    done = 0
    for start in range(0, len(order), batch_size):
        batch_order = order[start: start + batch_size]
        size = len(batch_order)
        for j, i in enumerate(batch_order):  # rows are [chosen of the batch..., rejected of the batch...]
            chosen[i] = values[done + j].clone()
            rejected[i] = values[done + size + j].clone()
        done += 2 * size
    return chosen, rejected


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
