"""Batched sampling and sequence log-probabilities for any causal LM + tokenizer.

Conventions (shared with the training collator): prompts are tokenised with
``add_special_tokens=True`` (a no-op for the synthetic task's tokenizer, BOS for Llama-style ones),
responses with ``add_special_tokens=False``; a finished response ends with EOS.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from tqdm.auto import tqdm

from tisdpo.kernels.scoring import PROGRESS_INTERVAL_S, score_sequences
from tisdpo.models.sharding import gathered_root, is_sharded


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def eos_token_ids(tokenizer, generation_eos=None) -> set[int]:
    """The token ids a response ends at: the generation config's ``eos_token_id`` (an id or a list)
    and the tokenizer's EOS. Both backends stop on exactly this set."""
    ids: set[int] = set()
    for x in (generation_eos, tokenizer.eos_token_id):
        if x is None:
            continue
        if isinstance(x, (list, tuple)):
            ids.update(int(i) for i in x)
        else:
            ids.add(int(x))
    return ids


def model_stop_ids(model, tokenizer) -> set[int]:
    """:func:`eos_token_ids` of an in-memory model (its ``generation_config``) and tokenizer."""
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    return eos_token_ids(tokenizer, eos)


def cut_at_eos(row: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """A response as :func:`sample_responses` returns it: the new tokens before the first EOS (EOS and
    whatever follows it, padding included, dropped), and whether an EOS ended it."""
    tokens: list[int] = []
    for t in row:
        if t in eos_ids:
            return tokens, True
        tokens.append(int(t))
    return tokens, False


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    return_finished: bool = False,
):
    """Sample one response per prompt with ``model.generate`` (left padding).

    ``model``: a Hugging Face causal LM, or an engine that samples itself, i.e. anything with a
    ``sample_responses(tokenizer, prompts, **sampling)`` method (``tisdpo.eval.vllm_backend.VLLMEngine``,
    ``eval.generation.backend=vllm``), which gets every argument below and keeps this contract.

    Returns ``list[list[int]]``: only the new tokens, cut at the first EOS, EOS and padding
    excluded. With ``return_finished=True`` returns ``(responses, finished)`` where
    ``finished[i]`` says whether response i ended with EOS (before ``max_new_tokens``).
    ``temperature <= 0`` means greedy decoding. Sampling is reproducible from ``seed`` and does
    not disturb the global RNG state.
    """
    if callable(getattr(model, "sample_responses", None)):  # a faster backend (vLLM) with the same contract
        return model.sample_responses(tokenizer, prompts, temperature=temperature, top_k=top_k, top_p=top_p,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                      return_finished=return_finished)
    device = _model_device(model)
    eos_ids = model_stop_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    do_sample = temperature is not None and temperature > 0
    gen_kwargs = dict(
        max_new_tokens=int(max_new_tokens),
        do_sample=do_sample,
        pad_token_id=pad_id,
        eos_token_id=sorted(eos_ids) if eos_ids else None,
        # FSDP: every rank joins each decoding step until all are done (the forwards are collective)
        synced_gpus=is_sharded(model),
    )
    if do_sample:
        gen_kwargs["temperature"] = float(temperature)
        gen_kwargs["top_k"] = int(top_k) if top_k else 0  # 0 disables HF's default top_k=50
        if top_p is not None:
            gen_kwargs["top_p"] = float(top_p)
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)

    old_side = getattr(tokenizer, "padding_side", "right")
    responses: list[list[int]] = []
    finished: list[bool] = []
    fork_devices = [device] if device.type == "cuda" else []
    try:
        tokenizer.padding_side = "left"
        with _eval_mode(model), torch.random.fork_rng(devices=fork_devices), gathered_root(model):
            torch.manual_seed(seed)
            for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch",
                              mininterval=PROGRESS_INTERVAL_S, leave=False):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=True)
                input_ids = enc["input_ids"].to(device)
                attn = enc["attention_mask"].to(device)
                out = model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
                if not torch.is_tensor(out):  # GenerateOutput
                    out = out.sequences
                new = out[:, input_ids.shape[1] :].tolist()
                for row in new:
                    toks, done = cut_at_eos(row, eos_ids)
                    responses.append(toks)
                    finished.append(done)
    finally:
        tokenizer.padding_side = old_side
    if return_finished:
        return responses, finished
    return responses


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses_ids: Sequence[Sequence[int]],
    batch_size: int = 64,
    *,
    append_eos: bool | Sequence[bool] = False,
    per_token: bool = False,
):
    """Summed log-prob of each response given its prompt: ``log π(y|x) = Σ_t log π(y_t|x,y_<t)``.

    ``append_eos`` (one bool, or one per sample) adds an EOS token to the response before
    scoring (use the ``finished`` flags of :func:`sample_responses` for an exact sequence
    log-prob). Returns a list of floats, or with ``per_token=True`` a list of per-token lists.
    """
    n = len(prompts)
    if len(responses_ids) != n:
        raise ValueError("prompts and responses_ids differ in length")
    if isinstance(append_eos, bool):
        append_eos = [append_eos] * n
    eos_id = tokenizer.eos_token_id
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if n else []
    for j, pids in enumerate(prompt_ids):
        if len(pids) == 0:
            raise ValueError(f"empty prompt at index {j}: nothing to condition on")
    responses = [list(r) + ([eos_id] if eos else []) for r, eos in zip(responses_ids, append_eos)]
    # the batched scorer (kernels/scoring.py), as every other no-grad log-prob pass
    per_token_logps = score_sequences(model, prompt_ids, responses, _pad_id(tokenizer), batch_size=batch_size,
                                      progress="scoring samples")
    out_tok = [values.tolist() for values in per_token_logps]
    out_sum = [float(values.sum()) for values in per_token_logps]
    return out_tok if per_token else out_sum


__all__ = ["cut_at_eos", "eos_token_ids", "model_stop_ids", "sample_responses", "sequence_logps"]
