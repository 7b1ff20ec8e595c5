"""The one batched no-grad per-token log-prob pass over tokenised preference examples.

Every no-grad scoring pass goes through :func:`score_pairs`: the token-weight estimators' scores
(``response_logps``: response positions only, ragged), the reference log-prob stage
(``full_length``: one value per position, shifted like the labels, for the loss to slice), and the
evaluation's sequence log-probs (``sequence_logps`` in ``tisdpo.eval.generation``, through
:func:`score_sequences`). One forward per model per batch (chosen and rejected concatenated, or one
packed row per pair with ``shared_prefix``).

Why it is as fast as a bare forward (bench/scoring.py measures it):
- examples are batched longest first, so a batch pads to lengths close to its own;
- for the architectures whose logits are exactly ``lm_head(last hidden state)`` (``_HEAD_ONLY``),
  the output head runs on the response positions only: prompt and padding positions never get a
  [V]-wide logit row (at V = 128k that row is most of the memory a scoring batch needs);
- values stay on the device until the end: one transfer, no per-row synchronisation.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from tqdm.auto import tqdm

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.data.collate import PreferenceCollator, concat_pair, prompt_response_batch
from tisdpo.kernels.logprobs import token_logps
from tisdpo.kernels.shared_prefix import pack_pairs, packed_logps, packing_matches, packing_supported

log = logging.getLogger(__name__)

# A pass's progress bar, in a log file too (a non-terminal gets a line at most every this many seconds).
PROGRESS_INTERVAL_S = 10.0


def progress_bar(total: int, desc: str | None, unit: str = "pair"):
    """A tqdm bar with rate and ETA for a long no-grad pass; None: no bar."""
    if desc is None:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, unit=unit, mininterval=PROGRESS_INTERVAL_S, dynamic_ncols=True, leave=False)

# model_type values whose CausalLM forward computes logits = lm_head(base_model(...).last_hidden_state)
# with nothing after it (no soft-capping, no logit scale): the head may run on chosen rows only.
_HEAD_ONLY = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
# At most this many float32 logit elements per head block (64 MB): small vocabularies get big
# blocks (few Python iterations), large ones fall back to `chunk_size` rows.
_BLOCK_ELEMENTS = 1 << 24


def _head_only(model) -> bool:
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in _HEAD_ONLY and model.get_output_embeddings() is not None
            and getattr(model, "base_model", model) is not model
            and not hasattr(model, "peft_config"))  # a PeftModel's base_model returns logits, not hidden states


def output_head(model) -> torch.Tensor | None:
    """The output head's weight [V, H] when the model's logits are exactly ``head(base_model(...)
    .last_hidden_state)`` with no bias (the architectures of ``_HEAD_ONLY``, not wrapped by PEFT);
    else None. Then log-probs and KL can be computed from the hidden states in chunks
    (``kernels.logprobs.head_token_logps``), never materialising the [N, T, V] logits."""
    if not _head_only(model):
        return None
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        return None
    return head.weight


# Below this many logit elements (N x T x V) a pass keeps the plain full-logits path: the tiny built-in
# task (V ~ 100) stays bit-for-bit as before; a real vocabulary (SmolLM2's 49k, Llama's 32k-128k) at any
# useful batch is above it and never materialises its logits.
HEAD_CHUNK_MIN_ELEMENTS = 1 << 24


def chunked_head(model, input_ids: torch.Tensor) -> torch.Tensor | None:
    """:func:`output_head` when the [N, T, V] logits of ``input_ids`` would be large enough to matter."""
    head = output_head(model)
    if head is None or input_ids.numel() * head.shape[0] < HEAD_CHUNK_MIN_ELEMENTS:
        return None
    return head


def last_hidden(model, input_ids, attention_mask) -> torch.Tensor:
    """The last hidden states [N, T, H] of a model :func:`output_head` accepts."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _picked_logps_from_hidden(model, ids, attention, labels, chunk_size: int, *, with_hidden: bool = False):
    """Flat log-probs of the response labels, row-major: the head runs on response positions only.
    ``with_hidden``: (log-probs, the last hidden states of those positions [n, H]), the rows the head ran on."""
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
    logps = torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    return (logps, selected) if with_hidden else logps


def _picked_logps_from_logits(model, ids, attention, labels, chunk_size: int) -> torch.Tensor:
    """Any causal LM: full logits, the chunked kernel, then the response positions, row-major."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    logps, mask = token_logps(logits, labels, chunk_size=chunk_size)
    return logps[mask].float()


def _length_order(examples: list[dict]) -> list[int]:
    """Indices longest first (a batch pads to its longest row; the first batch shows an OOM at once)."""
    size = [max(len(ex[f"{side}_input_ids"]) for side in SIDES) for ex in examples]
    return sorted(range(len(examples)), key=lambda i: -size[i])


def autocast_context(device: torch.device | str, precision: str | None):
    """The autocast a Lightning ``precision`` implies for a no-grad pass (none for 32/64/true)."""
    precision = str(precision or "32")
    device_type = torch.device(device).type
    if precision in ("bf16-mixed", "bf16"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision in ("16-mixed", "16") and device_type == "cuda":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def move_to(model, device: torch.device | str | None) -> tuple[torch.device, torch.device]:
    """(where the model now is, where it was): moves ``model`` to ``device`` where it can move.

    Inputs must go where the parameters *are*, not where they were asked to go: "cuda" puts them
    on "cuda:0", and torch.device("cuda") != torch.device("cuda:0"); a view that cannot move (the
    LoRA reference) stays where it lives.
    """
    parameters = getattr(model, "parameters", None)
    home = next(parameters()).device if parameters is not None else torch.device("cpu")
    if device is None or torch.device(device) == home or not hasattr(model, "to"):
        return home, home
    model.to(device)
    return (next(parameters()).device if parameters is not None else torch.device(device)), home


@contextlib.contextmanager
def _scoring(model, device):
    """The model in eval mode on ``device`` for the pass; back where and how it was afterwards."""
    device, home = move_to(model, device)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield device
    finally:
        if device != home:
            model.to(home)
        if hasattr(model, "train"):
            model.train(was_training)


@torch.no_grad()
def score_pairs(model, examples: list[dict], pad_token_id: int, *, batch_size: int = 64, chunk_size: int = 256,
                precision: str | None = None, device: torch.device | str | None = None, full_length: bool = False,
                shared_prefix: bool = False, head_only: bool | None = None,
                progress: str | None = None,
                hidden: dict[str, list] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(chosen, rejected): float32 per-token log-probs of every example under ``model``, in order.

    - ``full_length=False``: the response positions only, one value per response token (ragged);
      ``full_length=True``: one value per position ``[len(input_ids) - 1]``, shifted like the
      labels (0 where no label), the layout the preference module slices.
    - Batches are formed longest first, so a batch pads to lengths close to its own.
    - ``head_only`` (default: where exact, response positions only): for the architectures whose
      logits are exactly ``lm_head(last hidden state)`` the output head runs on the response
      positions only: prompt and padding positions never get a [V]-wide logit row.
    - ``shared_prefix``: one packed row per pair, the prompt run once (``kernels/shared_prefix.py``),
      checked against the standard forward on the first batch and dropped when it does not match.
    - ``precision``: a Lightning precision string, applied as autocast; ``device``: where to run.
    ``model`` is any callable returning ``.logits`` (a frozen copy, or a LoRA policy's
    disabled-adapter view). ``progress``: a progress bar with ETA under this name.
    - ``hidden`` (a dict, filled in place): also the model's last hidden states at the response
      positions, ``hidden[side][i]`` [n_response_tokens, H] in the model's dtype, the rows the output
      head turns into those log-probs (a frozen model's logits there, for a KL later, without its
      forward). Needs an architecture :func:`output_head` accepts; the head then runs on the
      response positions only and no shared-prefix packing is used.
    """
    if hidden is not None:
        if not (_head_only(model) and full_length):
            raise ValueError("score_pairs(hidden=...) needs full_length=True and a model whose logits are its output "
                             "head of the last hidden states (output_head)")
        head_only, shared_prefix = True, False
        hidden.update({side: [None] * len(examples) for side in SIDES})
    head_only = _head_only(model) if head_only is None else head_only
    if shared_prefix and head_only and examples:
        longest = max(len(ex[f"{side}_input_ids"]) for ex in examples for side in SIDES)
        if chunked_head(model, torch.empty(2 * min(batch_size, len(examples)), longest)) is not None:
            shared_prefix = False  # a real vocabulary: the head on the response positions, no [N, T, V] logits
    if shared_prefix:
        head_only = False  # the packed rows need the per-position layout of the full forward
    collate = PreferenceCollator(pad_token_id)
    order = _length_order(examples)
    out: dict[str, list[torch.Tensor | None]] = {side: [None] * len(examples) for side in SIDES}
    with _scoring(model, device) as device, progress_bar(len(order), progress) as bar:
        for start in range(0, len(order), batch_size):
            indices = order[start: start + batch_size]
            size = len(indices)
            if bar is not None:
                bar.update(size)
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in indices]).items()}
            ids, attention, labels = (concat_pair(batch, key) for key in ("input_ids", "attention_mask", "labels"))
            packed = pack_pairs(batch, pad_token_id) if shared_prefix else None
            with autocast_context(device, precision):
                if packed is not None and start == 0:  # first use: packing must reproduce the plain forward
                    shared_prefix = packing_supported(model) and packing_matches(model, batch, packed, chunk_size)[0]
                    if not shared_prefix:
                        log.warning("scoring: shared-prefix packing is off for this model")
                        packed = None
                if head_only and full_length:  # response positions through the head, zeros elsewhere
                    flat = _picked_logps_from_hidden(model, ids, attention, labels, chunk_size, with_hidden=hidden is not None)
                    mask = labels[:, 1:] != IGNORE_INDEX
                    if hidden is not None:
                        flat, selected = flat
                        dtype = model.get_output_embeddings().weight.dtype
                        for r, part in enumerate(selected.to(dtype).cpu().split(mask.sum(-1).cpu().tolist())):
                            hidden[SIDES[r // size]][indices[r % size]] = part.clone()
                    flat = flat.float()
                    logps = flat.new_zeros(mask.shape).masked_scatter(mask, flat).cpu()
                    rows = [logps[r, : len(examples[indices[r % size]][f"{SIDES[r // size]}_input_ids"]) - 1]
                            for r in range(2 * size)]
                elif head_only:
                    flat = _picked_logps_from_hidden(model, ids, attention, labels, chunk_size).float().cpu()
                    rows = flat.split((labels[:, 1:] != IGNORE_INDEX).sum(-1).cpu().tolist())
                else:
                    if packed is not None:
                        logps = packed_logps(model, packed, chunk_size)
                    else:
                        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                        logps, _ = token_logps(logits, labels, chunk_size=chunk_size)
                        del logits
                    logps, mask = logps.float().cpu(), (labels[:, 1:] != IGNORE_INDEX).cpu()
                    rows = [logps[r, : len(examples[indices[r % size]][f"{SIDES[r // size]}_input_ids"]) - 1]
                            if full_length else logps[r][mask[r, : logps.shape[1]]] for r in range(2 * size)]
            for row, i in enumerate(indices):  # rows are [chosen of the batch..., rejected of the batch...]
                out["chosen"][i] = rows[row].clone()
                out["rejected"][i] = rows[size + row].clone()
    return out["chosen"], out["rejected"]  # type: ignore[return-value]


def response_logps(model, examples: list[dict], pad_token_id: int, batch_size: int = 64,
                   chunk_size: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(chosen, rejected) lists of per-response-token log-probs, one tensor per example, in order
    (the token-weight estimators' scoring pass: the model where it is, head on the responses only)."""
    return score_pairs(model, examples, pad_token_id, batch_size=batch_size, chunk_size=chunk_size,
                       progress="scoring (token weights)")


@torch.no_grad()
def score_sequences(model, prompts: list[list[int]], responses: list[list[int]], pad_token_id: int, *,
                    batch_size: int = 64, chunk_size: int = 256, progress: str | None = None) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt (token ids), one tensor per sequence,
    in order: the evaluation's pass (KL to the reference on sampled responses)."""
    out: list[torch.Tensor] = []
    with _scoring(model, None) as device, progress_bar(len(prompts), progress, "seq") as bar:
        for start in range(0, len(prompts), batch_size):
            if bar is not None:
                bar.update(len(prompts[start: start + batch_size]))
            ids, attention, labels = prompt_response_batch(prompts[start: start + batch_size],
                                                           responses[start: start + batch_size], pad_token_id, device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            logps, mask = token_logps(logits, labels, chunk_size=chunk_size)
            del logits
            logps, mask = logps.float().cpu(), mask.bool().cpu()
            out.extend(logps[r][mask[r]].clone() for r in range(logps.shape[0]))
    return out
