"""Tokenisation of canonical examples (preference pairs and SFT pairs).

Layout of one tokenised preference example (plain python lists)::

    prompt_input_ids    [BOS] prompt                      (BOS only if the tokenizer adds one)
    chosen_input_ids    [BOS] prompt  chosen   EOS
    chosen_labels       -100 ... -100 chosen   EOS        (labels aligned with input_ids, unshifted)
    rejected_*          the same with the rejected response
    chosen_weights      1.0 ... 1.0   w_1..w_n            (only when the example has weights)
    index               the row's position in the dataset list

The prompt is tokenised once and shared; each response is tokenised on its own without
special tokens and appended. Truncation follows eric-mitchell/direct-preference-optimization:
if prompt + longer response exceeds ``max_length``, the prompt is cut to
``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its start; a BOS stays
first either way); if still too long, each response keeps its first
``max_length - len(prompt)`` tokens (so a truncated response loses its EOS).

Truncation happens while tokenising, never after a whole text is tokenised: a text is tokenised in
growing pieces (from its start, or its end for a ``keep_end`` prompt) until there are more tokens
than can be kept, plus a margin that keeps the tokens near the cut out of the result
(:func:`_bounded_ids`). One row therefore costs about ``max_length`` tokens of work however long it
is (a 60 MB response is cut, and counted as truncated, not tokenised whole); a piece grows to at most
:data:`MAX_CHARS_PER_TOKEN` characters per kept token. The only exception: a row that brings its own
token weights counted before truncation is tokenised whole, since their count must be checked.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tisdpo.constants import IGNORE_INDEX

from .errors import DataError, DropCounter, describe_type

__all__ = [
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "tokenize_dataset",
    "tokenize_example",
    "tokenize_sft_example",
    "joined_response",
]

TRUNCATION_MODES = ("keep_end", "keep_start")


# ---------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------
def _check_options(max_length: Any, max_prompt_length: Any, truncation_mode: Any) -> None:
    for option, value in (("dataset.max_length", max_length), ("dataset.max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option} must be a positive integer, got {value!r}")
    if max_prompt_length > max_length:
        raise ValueError(
            f"dataset.max_prompt_length ({max_prompt_length}) must not exceed dataset.max_length ({max_length})"
        )
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"dataset.truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")


# ---------------------------------------------------------------------------------------
# encoding
# ---------------------------------------------------------------------------------------
def _ids(tokenizer: Any, text: str, *, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# Tokens tokenised beyond what is kept, next to the cut: a word split by the cut changes only these.
CUT_MARGIN = 16
# The first piece of a long text: this many characters per token wanted; each next piece doubles.
FIRST_CHARS_PER_TOKEN = 8
# A piece never grows past this many characters per token wanted: one row's cost stays bounded
# (a text with fewer tokens than that is cut at those characters, and counted as truncated).
MAX_CHARS_PER_TOKEN = 256


def _bounded_ids(tokenizer: Any, text: str, limit: int, *, from_end: bool = False) -> tuple[list[int], bool]:
    """The tokens of ``text`` (no special tokens) when there are at most ``limit`` of them, else
    ``limit + 1`` of its first (``from_end``: last) tokens; and whether the list is the whole text.
    A list of ``limit + 1`` says "longer than limit" (its true length is not computed)."""
    wanted = limit + 1 + CUT_MARGIN
    size = wanted * FIRST_CHARS_PER_TOKEN
    while True:
        if size >= len(text):
            return _ids(tokenizer, text), True
        piece = text[-size:] if from_end else text[:size]
        ids = _ids(tokenizer, piece)
        if len(ids) >= wanted:
            return (ids[-(limit + 1):] if from_end else ids[:limit + 1]), False
        if size >= wanted * MAX_CHARS_PER_TOKEN:  # pathological text: cut here, counted as truncated
            kept = ids[CUT_MARGIN:] if from_end else ids[:max(0, len(ids) - CUT_MARGIN)]
            return kept[-(limit + 1):] if from_end else kept[:limit + 1], False
        size = min(size * 2, wanted * MAX_CHARS_PER_TOKEN)


# tokenizer -> (bos_token_id, adds_bos): the probe costs a tokenizer call, per example
_BOS_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, bool]]" = weakref.WeakKeyDictionary()


def _bos_prefix(tokenizer: Any) -> list[int]:
    """[BOS] if the tokenizer has a BOS token and adds it by default (Llama yes, GPT-2 no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    try:
        cached = _BOS_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable / hashable: just probe every time
        cached = None
    if cached is None or cached[0] != bos:
        probe = _ids(tokenizer, "a", special=True)
        cached = (bos, bool(probe) and probe[0] == bos)
        try:
            _BOS_CACHE[tokenizer] = cached
        except TypeError:
            pass
    return [bos] if cached[1] else []


def _prompt_text(tokenizer: Any, prompt: str, use_chat_template: bool) -> str:
    """The prompt as it is tokenised: as given, or inside the tokenizer's chat template."""
    if not use_chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "dataset.chat_template=true, but the tokenizer has no chat template: "
            "set dataset.chat_template=false or use a tokenizer that defines one"
        )
    # the template writes any BOS it wants as text; adding special tokens would double it
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def joined_response(prompt_text: str, response: str) -> str:
    """The response as it follows the prompt: never glued to it. A prompt that ends in a visible
    character (no chat template, no template ending in whitespace) is followed by a space before a
    response that starts with one (``"...in the oven" + " To cook..."``, not ``"...ovenTo cook"``);
    a chat template's prompt ends with its own newline, and a response that brings its own leading
    whitespace (hh's ``" I'm sorry"``) is kept as given."""
    if prompt_text and response and not prompt_text[-1].isspace() and not response[0].isspace():
        return " " + response
    return response


def _bounded_prompt_ids(tokenizer: Any, text: str, bos: list[int], *, max_length: int, max_prompt_length: int,
                        truncation_mode: str) -> tuple[list[int], int]:
    """The prompt's ids, enough of them for any truncation below, and its length (a lower bound,
    ``> max_length``, when it is longer than can ever be kept whole)."""
    ids, whole = _bounded_ids(tokenizer, text, max_length)
    if whole:
        return bos + ids, len(bos) + len(ids)
    if truncation_mode == "keep_end":  # the end is kept: tokenise from the end
        ids, _ = _bounded_ids(tokenizer, text, max_prompt_length, from_end=True)
    return bos + ids, len(bos) + max_length + 1


def _eos(tokenizer: Any, add_eos: bool) -> list[int]:
    if not add_eos:
        return []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos token: set dataset.add_eos=false or give it one")
    return [eos]


def _truncate_prompt(ids: list[int], limit: int, mode: str, n_bos: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    if mode == "keep_start":
        return ids[:limit]
    keep = limit - n_bos  # keep_end: the BOS stays first, the prompt's end fills the rest
    return ids[:n_bos][:limit] + (ids[len(ids) - keep:] if keep > 0 else [])


@dataclass
class _Encoded:
    prompt: list[int]
    responses: list[list[int]]  # after truncation
    full_lengths: list[int]  # response lengths (EOS included) before truncation; max_length + 1 for "longer"
    full_prompt_length: int = -1  # prompt length before truncation (a lower bound for a cut one, as above)


def _encode(
    tokenizer: Any,
    prompt: str,
    responses: Sequence[str],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str,
    add_eos: bool,
    use_chat_template: bool,
    whole_responses: bool = False,
) -> _Encoded:
    bos = [] if use_chat_template else _bos_prefix(tokenizer)
    text = _prompt_text(tokenizer, prompt, use_chat_template)
    prompt_ids, full_prompt_length = _bounded_prompt_ids(tokenizer, text, bos, max_length=max_length,
                                                         max_prompt_length=max_prompt_length,
                                                         truncation_mode=truncation_mode)
    eos = _eos(tokenizer, add_eos)
    full, lengths = [], []
    for response in responses:
        response = joined_response(text, response)
        ids, whole = (_ids(tokenizer, response), True) if whole_responses else _bounded_ids(tokenizer, response, max_length)
        full.append(ids + eos if whole else ids)  # a cut response has no EOS
        lengths.append(len(ids) + len(eos) if whole else max_length + 1)  # cut: a lower bound
    longest = max(lengths)
    if full_prompt_length + longest > max_length:
        prompt_ids = _truncate_prompt(prompt_ids, max_prompt_length, truncation_mode, len(bos))
    budget = max(0, max_length - len(prompt_ids))
    return _Encoded(prompt_ids, [r[:budget] for r in full], lengths, full_prompt_length)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def _dataset_name(example: Any) -> str:
    meta = example.get("meta") if isinstance(example, Mapping) else None
    name = meta.get("dataset") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else "data"


def _text(example: Mapping, key: str, dataset: str, index: int | None) -> str:
    if key not in example:
        raise DataError(dataset, index, key, "missing field")
    value = example[key]
    if not isinstance(value, str):
        raise DataError(dataset, index, key, f"expected a string, got {describe_type(value)}")
    return value


def _weight_values(value: Any, dataset: str, index: int | None, field: str) -> list[float]:
    """A list of finite, non-negative floats (lists, tuples, numpy/torch 1-D arrays)."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # numpy / torch
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise DataError(dataset, index, field, f"expected a list of floats, got {describe_type(value)}")
    out = []
    for i, w in enumerate(value):
        if isinstance(w, bool) or not isinstance(w, numbers.Real):  # numpy scalars too
            raise DataError(dataset, index, field, f"weight {i} is {describe_type(w)}, expected a number")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise DataError(dataset, index, field, f"weight {i} is {w}; weights must be finite and >= 0")
        out.append(w)
    return out


def _fit_weights(weights: list[float], n_full: int, n_kept: int, dataset: str, index: int | None, field: str) -> list[float]:
    """Weights given per response token before or after truncation -> after truncation."""
    if len(weights) == n_kept:
        return weights
    if len(weights) == n_full:
        return weights[:n_kept]
    expected = f"{n_kept}" if n_kept == n_full else f"{n_kept} (after truncation) or {n_full} (before)"
    raise DataError(
        dataset, index, field,
        f"got {len(weights)} weights, expected one per response token (EOS included): {expected}",
    )


def _drop(counter: DropCounter | None, reason: str, index: int | None, field: str) -> None:
    """Record a drop; returns None so callers can ``return _drop(...)``."""
    if counter is not None:
        counter.drop(reason, index=index, field=field)


def _default_index(example: Mapping, index: int | None) -> int:
    if index is not None:
        return int(index)
    meta = example.get("meta")
    row = meta.get("row") if isinstance(meta, Mapping) else None
    return row if isinstance(row, int) and not isinstance(row, bool) else -1


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------
def tokenize_example(
    example: Mapping,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    use_chat_template: bool = False,
    index: int | None = None,
    counter: DropCounter | None = None,
) -> dict | None:
    """Tokenise one canonical preference example; None when it is dropped.

    A drop (``empty_prompt``, ``empty_response``, ``response_fully_truncated``) is recorded
    in ``counter`` (which raises instead when strict). Structural problems (a field missing
    or of the wrong type; weights that are not finite non-negative numbers, or whose count
    matches neither the response's tokens before nor after truncation) raise
    :class:`DataError` naming the row and field. ``index`` defaults to ``meta["row"]``.
    """
    _check_options(max_length, max_prompt_length, truncation_mode)
    dataset = _dataset_name(example)
    if not isinstance(example, Mapping):
        raise DataError(dataset, index, None, f"expected a dict example, got {describe_type(example)}")
    texts = {key: _text(example, key, dataset, index) for key in ("prompt", "chosen", "rejected")}
    weights = _example_weights(example, dataset, index)

    enc = _encode(
        tokenizer, texts["prompt"], [texts["chosen"], texts["rejected"]],
        max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode, add_eos=add_eos, use_chat_template=use_chat_template,
        whole_responses=weights is not None,  # weights counted before truncation: their count is checked
    )
    sides = {"chosen": 0, "rejected": 1}  # key -> position in enc.responses
    if weights is not None:  # structural: checked before any content drop
        weights = {
            key: _fit_weights(weights[key], enc.full_lengths[i], len(enc.responses[i]), dataset, index, f"{key}_weights")
            for key, i in sides.items()
        }

    if not enc.prompt:
        return _drop(counter, "empty_prompt", index, "prompt")
    for key, i in sides.items():
        if enc.full_lengths[i] == 0:
            return _drop(counter, "empty_response", index, key)
    for key, i in sides.items():
        if not enc.responses[i]:
            return _drop(counter, "response_fully_truncated", index, key)

    if counter is not None:  # kept, but cut to fit: counted so the summary line shows it
        if len(enc.prompt) < enc.full_prompt_length:
            counter.note_truncated("prompt")
        if any(len(enc.responses[i]) < enc.full_lengths[i] for i in sides.values()):
            counter.note_truncated("response")
    out: dict[str, Any] = {"prompt_input_ids": list(enc.prompt)}
    n_prompt = len(enc.prompt)
    for key, i in sides.items():
        out[f"{key}_input_ids"] = enc.prompt + enc.responses[i]
        out[f"{key}_labels"] = [IGNORE_INDEX] * n_prompt + enc.responses[i]
        if weights is not None:
            out[f"{key}_weights"] = [1.0] * n_prompt + weights[key]
    out["index"] = _default_index(example, index)
    return out


def _example_weights(example: Mapping, dataset: str, index: int | None) -> dict[str, list[float]] | None:
    """Both weight lists, or None; weights on one side only is a structural error."""
    given = {k: example.get(f"{k}_weights") for k in ("chosen", "rejected")}
    present = [k for k, v in given.items() if v is not None]
    if not present:
        return None
    if len(present) == 1:
        missing = "rejected" if present[0] == "chosen" else "chosen"
        raise DataError(dataset, index, f"{missing}_weights", f"missing while {present[0]}_weights is given")
    return {k: _weight_values(v, dataset, index, f"{k}_weights") for k, v in given.items()}


def tokenize_dataset(
    rows: Sequence[Mapping],
    tokenizer: Any,
    *,
    counter: DropCounter | None = None,
    strict: bool = False,
    **kwargs: Any,
) -> tuple[list[dict], DropCounter]:
    """Tokenise every row (``index`` = position in ``rows``); raises DataError if none survive.

    Pass the loader's counter to get one report for loading and tokenisation (its total
    already includes these rows, and its own ``strict`` applies); otherwise a new counter
    with ``total=len(rows)`` is made.
    """
    if counter is None:
        counter = DropCounter(_dataset_name(rows[0]) if rows else "data", total=len(rows), strict=strict)
    out = []
    for i, row in enumerate(rows):
        tokenized = tokenize_example(row, tokenizer, index=i, counter=counter, **kwargs)
        if tokenized is not None:
            out.append(tokenized)
    counter.require_nonempty()
    return out, counter


def tokenize_sft_example(
    prompt: str,
    response: str,
    tokenizer: Any,
    max_length: int = 512,
    *,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    add_eos: bool = True,
    use_chat_template: bool = False,
    index: int | None = None,
    counter: DropCounter | None = None,
) -> dict | None:
    """``{"input_ids", "labels", "index"}`` for SFT on (prompt, response); None when dropped.

    Same layout and truncation as a preference example with one response: the prompt is
    masked with -100, EOS appended. ``max_prompt_length`` defaults to ``max_length // 2``
    and is capped at ``max_length`` (the SFT stage often runs shorter than the preference
    data's ``dataset.max_prompt_length``). Used for the SFT stage (built-in task, chosen
    responses of any dataset).
    """
    if max_prompt_length is None:
        max_prompt_length = max(1, max_length // 2) if isinstance(max_length, int) else max_length
    elif isinstance(max_length, int) and isinstance(max_prompt_length, int):
        max_prompt_length = min(max_prompt_length, max_length)
    _check_options(max_length, max_prompt_length, truncation_mode)
    example = {"prompt": prompt, "response": response}
    texts = {key: _text(example, key, "sft", index) for key in example}
    enc = _encode(
        tokenizer, texts["prompt"], [texts["response"]],
        max_length=max_length, max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode, add_eos=add_eos, use_chat_template=use_chat_template,
    )
    if not enc.prompt:
        return _drop(counter, "empty_prompt", index, "prompt")
    if enc.full_lengths[0] == 0:
        return _drop(counter, "empty_response", index, "response")
    if not enc.responses[0]:
        return _drop(counter, "response_fully_truncated", index, "response")
    return {
        "input_ids": enc.prompt + enc.responses[0],
        "labels": [IGNORE_INDEX] * len(enc.prompt) + enc.responses[0],
        "index": -1 if index is None else int(index),
    }
