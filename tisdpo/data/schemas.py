"""Dataset schemas: one function per dataset, a raw hub row -> a canonical example.

Canonical example::

    {"prompt": str, "chosen": str, "rejected": str,
     "chosen_weights": list[float], "rejected_weights": list[float],   # optional
     "meta": {"dataset": str, "row": int, ...}}

Every adapter has the signature ``adapter(row, *, index=None, **options) -> dict`` and
raises :class:`~tisdpo.data.errors.DataError` (naming dataset, row and field) when the row
does not have the documented schema, or :class:`~tisdpo.data.errors.SkipRow` for a
well-formed row that an option filters out. Content checks (empty strings, identical
responses) are not the adapters' job: :func:`adapt_rows` applies them uniformly.

Rows are already in memory here: reading files is :mod:`tisdpo.data.formats`' job, and choosing
the source (file or hub) and the rows to keep is :mod:`tisdpo.data.sources`'.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import DataError, DropCounter, SkipRow, describe_type

__all__ = [
    "ADAPTERS",
    "adapt_rows",
    "adapter_for",
    "check_options",
    "content_problem",
    "hh",
    "pku_saferlhf",
    "tldr",
    "ultrafeedback",
]

HH_ASSISTANT = "\n\nAssistant:"


# ---------------------------------------------------------------------------------------
# field helpers: each names dataset, row and field in its error
# ---------------------------------------------------------------------------------------
def _require_row(row: Any, dataset: str, index: int | None) -> Mapping:
    if not isinstance(row, Mapping):
        raise DataError(dataset, index, None, f"expected a dict (one row), got {describe_type(row)}")
    return row


def _get(row: Mapping, key: str, dataset: str, index: int | None, field: str | None = None) -> Any:
    if key not in row:
        present = ", ".join(sorted(map(str, row.keys()))[:20])
        raise DataError(dataset, index, field or key, f"missing field (row has: {present})")
    return row[key]


def _str(value: Any, dataset: str, index: int | None, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(dataset, index, field, f"expected a string, got {describe_type(value)}")
    return value


def _mapping(value: Any, dataset: str, index: int | None, field: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise DataError(dataset, index, field, f"expected a dict, got {describe_type(value)}")
    return value


def _label(value: Any, dataset: str, index: int | None, field: str) -> int:
    """A 0/1 label id. Booleans are refused: a bool here means a column mix-up."""
    if isinstance(value, bool) or not isinstance(value, int) and not _is_integral(value):
        raise DataError(dataset, index, field, f"expected 0 or 1, got {describe_type(value)} {value!r:.40}")
    if int(value) not in (0, 1):
        raise DataError(dataset, index, field, f"expected 0 or 1, got {value!r}")
    return int(value)


def _is_integral(value: Any) -> bool:
    # numpy integers (from pandas/parquet paths) are not ``int`` subclasses
    return type(value).__name__ in {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def _pair(value: Any, dataset: str, index: int | None, field: str) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        what = f"length {len(value)}" if isinstance(value, Sequence) and not isinstance(value, str) else describe_type(value)
        raise DataError(dataset, index, field, f"expected a list of 2 items, got {what}")
    return value[0], value[1]


def _meta(dataset: str, index: int | None, **extra: Any) -> dict:
    meta = {"dataset": dataset, "row": index}
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


# ---------------------------------------------------------------------------------------
# PKU-SafeRLHF
# ---------------------------------------------------------------------------------------
def _true_categories(value: Any) -> list[str] | None:
    """Harm-category dict {name: bool} -> the names flagged, for compact metadata."""
    if not isinstance(value, Mapping):
        return None
    return sorted(str(k) for k, v in value.items() if v is True)


def pku_saferlhf(
    row: Any,
    *,
    index: int | None = None,
    preference: str = "safer",
    safety_divergent_only: bool = False,
) -> dict:
    """PKU-Alignment/PKU-SafeRLHF row -> canonical example.

    Hub schema: ``prompt``, ``response_0``, ``response_1``, ``safer_response_id``,
    ``better_response_id`` (0/1), ``is_response_{0,1}_safe``, ``response_{0,1}_harm_category``,
    ``response_{0,1}_severity_level``, sources and hashes. ``chosen = response_{<preference>_response_id}``
    with ``preference`` = ``"safer"`` (default, the paper's harmlessness setting) or ``"better"``.
    ``safety_divergent_only`` keeps only pairs with exactly one safe response (others are
    counted as ``not_safety_divergent``).

    Also accepts the shared sample's format ``{"prompt", "response": [safer, less_safe]}``
    (pairs with exactly one safe response, the safe one first).
    """
    name = "pku_saferlhf"
    if preference not in ("safer", "better"):
        raise ValueError(f"{name}: option dataset.preference must be 'safer' or 'better', got {preference!r}")
    row = _require_row(row, name, index)
    prompt = _str(_get(row, "prompt", name, index), name, index, "prompt")

    if "response_0" not in row and "response" in row:
        return _pku_pair_format(row, prompt, name, index, preference)

    responses = [_str(_get(row, f"response_{i}", name, index), name, index, f"response_{i}") for i in (0, 1)]
    key = f"{preference}_response_id"
    chosen_id = _label(_get(row, key, name, index), name, index, key)
    rejected_id = 1 - chosen_id

    safe = [row.get(f"is_response_{i}_safe") for i in (0, 1)]
    if safety_divergent_only:
        for i in (0, 1):
            if not isinstance(safe[i], bool):
                raise DataError(
                    name, index, f"is_response_{i}_safe",
                    f"expected a bool (needed by safety_divergent_only), got {describe_type(safe[i])}",
                )
        if safe[0] == safe[1]:
            raise SkipRow("not_safety_divergent", field=f"is_response_{chosen_id}_safe")

    def side(i: int, what: str) -> Any:
        return row.get(f"response_{i}_{what}")

    meta = _meta(
        name, index,
        preference=preference,
        chosen_id=chosen_id,
        safer_response_id=row.get("safer_response_id"),
        better_response_id=row.get("better_response_id"),
        is_chosen_safe=safe[chosen_id] if isinstance(safe[chosen_id], bool) else None,
        is_rejected_safe=safe[rejected_id] if isinstance(safe[rejected_id], bool) else None,
        chosen_severity_level=side(chosen_id, "severity_level"),
        rejected_severity_level=side(rejected_id, "severity_level"),
        chosen_harm_categories=_true_categories(side(chosen_id, "harm_category")),
        rejected_harm_categories=_true_categories(side(rejected_id, "harm_category")),
        prompt_source=row.get("prompt_source"),
        chosen_source=side(chosen_id, "source"),
        rejected_source=side(rejected_id, "source"),
    )
    return {"prompt": prompt, "chosen": responses[chosen_id], "rejected": responses[rejected_id], "meta": meta}


def _pku_pair_format(row: Mapping, prompt: str, name: str, index: int | None, preference: str) -> dict:
    if preference != "safer":
        raise DataError(
            name, index, "response",
            "the [safer, less_safe] pair format has no better_response_id; use preference='safer'",
        )
    first, second = _pair(row["response"], name, index, "response")
    chosen = _str(first, name, index, "response[0]")
    rejected = _str(second, name, index, "response[1]")
    # the shared sample holds pairs where exactly one response is safe, the safe one first
    meta = _meta(name, index, preference="safer", format="pairs", is_chosen_safe=True, is_rejected_safe=False)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


# ---------------------------------------------------------------------------------------
# UltraFeedback
# ---------------------------------------------------------------------------------------
def _message_list(value: Any, name: str, index: int | None, field: str) -> list[Mapping]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise DataError(name, index, field, f"expected a string or a list of messages, got {describe_type(value)}")
    for i, message in enumerate(value):
        message = _mapping(message, name, index, f"{field}[{i}]")
        _str(_get(message, "role", name, index, f"{field}[{i}].role"), name, index, f"{field}[{i}].role")
    return list(value)


def _last_assistant(value: Any, name: str, index: int | None, field: str) -> tuple[str, int | None]:
    """A plain string, or the last assistant message's content (and its position)."""
    if isinstance(value, str):
        return value, None
    messages = _message_list(value, name, index, field)
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            where = f"{field}[{i}].content"
            return _str(_get(messages[i], "content", name, index, where), name, index, where), i
    raise DataError(name, index, field, f"no message with role 'assistant' among {len(messages)} messages")


def ultrafeedback(row: Any, *, index: int | None = None) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized (train_prefs/test_prefs) row -> canonical example.

    ``chosen``/``rejected`` are message lists ``[{"role", "content"}, ...]`` (the last
    assistant message is the response) or plain strings (trl-style exports, the shared
    jsonl files). Without a ``prompt`` field, the prompt is the single user message that
    precedes the chosen assistant reply (multi-turn rows need an explicit prompt).
    """
    name = "ultrafeedback"
    row = _require_row(row, name, index)
    chosen, chosen_pos = _last_assistant(_get(row, "chosen", name, index), name, index, "chosen")
    rejected, _ = _last_assistant(_get(row, "rejected", name, index), name, index, "rejected")

    if row.get("prompt") is not None or chosen_pos is None:
        prompt = _str(_get(row, "prompt", name, index), name, index, "prompt")
    else:
        prompt = _prompt_from_messages(row["chosen"][:chosen_pos], name, index)

    scores = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
    meta = _meta(
        name, index,
        prompt_id=row.get("prompt_id"),
        source_index=row.get("source_index"),
        score_chosen=row.get("score_chosen", scores.get("score_chosen")),
        score_rejected=row.get("score_rejected", scores.get("score_rejected")),
    )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


def _prompt_from_messages(before: Sequence[Mapping], name: str, index: int | None) -> str:
    turns = [m for m in before if m["role"] != "system"]
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise DataError(
            name, index, "prompt",
            f"missing, and cannot be derived: 'chosen' has {len(turns)} turns before the reply (need one user turn)",
        )
    return _str(_get(turns[0], "content", name, index, "chosen[0].content"), name, index, "chosen[0].content")


# ---------------------------------------------------------------------------------------
# TL;DR (openai/summarize_from_feedback, config "comparisons")
# ---------------------------------------------------------------------------------------
def tldr(row: Any, *, index: int | None = None) -> dict:
    """openai/summarize_from_feedback "comparisons" row -> canonical example.

    Prompt ``"SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:"`` (title and
    post stripped); chosen = ``summaries[choice].text``, rejected = the other, each stripped
    and given one leading space (so it tokenises as a continuation of "TL;DR:").
    Rows about a news article (CNN/DM: ``info.post`` is null, ``info.article`` set) are
    skipped as ``not_reddit_post``.
    """
    name = "tldr"
    row = _require_row(row, name, index)
    info = _mapping(_get(row, "info", name, index), name, index, "info")
    if info.get("post") is None and isinstance(info.get("article"), str):
        raise SkipRow("not_reddit_post", field="info.post")
    subreddit, title, post = (
        _str(_get(info, key, name, index, f"info.{key}"), name, index, f"info.{key}")
        for key in ("subreddit", "title", "post")
    )
    first, second = _pair(_get(row, "summaries", name, index), name, index, "summaries")
    texts = []
    for i, summary in enumerate((first, second)):
        summary = _mapping(summary, name, index, f"summaries[{i}]")
        text = _str(_get(summary, "text", name, index, f"summaries[{i}].text"), name, index, f"summaries[{i}].text")
        texts.append(" " + text.strip())
    choice = _label(_get(row, "choice", name, index), name, index, "choice")

    prompt = f"SUBREDDIT: r/{subreddit}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"
    policies = [s.get("policy") if isinstance(s, Mapping) else None for s in (first, second)]
    meta = _meta(
        name, index,
        id=info.get("id"),
        choice=choice,
        chosen_policy=policies[choice],
        rejected_policy=policies[1 - choice],
        worker=row.get("worker"),
        batch=row.get("batch"),
        split=row.get("split"),
    )
    return {"prompt": prompt, "chosen": texts[choice], "rejected": texts[1 - choice], "meta": meta}


# ---------------------------------------------------------------------------------------
# Anthropic HH-RLHF
# ---------------------------------------------------------------------------------------
def hh(row: Any, *, index: int | None = None, prefix: str = "shared") -> dict:
    """Anthropic/hh-rlhf row (two whole dialogues) -> canonical example.

    prompt = the dialogue up to and including the last ``"\\n\\nAssistant:"``; chosen and
    rejected are the remainders (leading space kept, as in the data).

    A few real rows (5 of 2,312 in harmless-base test) have a chosen dialogue whose last
    assistant turn does not exist in the rejected one (e.g. a stray extra "Assistant:"
    turn). ``prefix="shared"`` (default) then cuts at the last ``"\\n\\nAssistant:"`` that
    both dialogues share, which is the same cut whenever the usual rule works;
    ``prefix="strict"`` raises instead. Either way, dialogues sharing no assistant turn
    raise :class:`DataError`.
    """
    name = "hh"
    if prefix not in ("shared", "strict"):
        raise ValueError(f"{name}: option dataset.prefix must be 'shared' or 'strict', got {prefix!r}")
    row = _require_row(row, name, index)
    chosen = _str(_get(row, "chosen", name, index), name, index, "chosen")
    rejected = _str(_get(row, "rejected", name, index), name, index, "rejected")

    end = chosen.rfind(HH_ASSISTANT)
    if end < 0:
        raise DataError(name, index, "chosen", f"no {HH_ASSISTANT!r} turn in the dialogue")
    cut = end + len(HH_ASSISTANT)
    if not rejected.startswith(chosen[:cut]):
        if prefix == "strict":
            raise DataError(name, index, "rejected", "does not start with the prompt taken from 'chosen'")
        end = os.path.commonprefix([chosen, rejected]).rfind(HH_ASSISTANT)
        if end < 0:
            raise DataError(name, index, "rejected", f"shares no prompt ending in {HH_ASSISTANT!r} with 'chosen'")
        cut = end + len(HH_ASSISTANT)
    return {
        "prompt": chosen[:cut],
        "chosen": chosen[cut:],
        "rejected": rejected[cut:],
        "meta": _meta(name, index),
    }


# ---------------------------------------------------------------------------------------
# registry: dataset.name -> adapter
# ---------------------------------------------------------------------------------------
ADAPTERS: dict[str, Callable[..., dict]] = {
    "pku_saferlhf": pku_saferlhf,
    "ultrafeedback": ultrafeedback,
    "tldr": tldr,
    "hh": hh,
}


def adapter_for(name: str) -> Callable[..., dict]:
    """The adapter registered as ``name`` (``dataset.name``); unknown names list the known ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset.name {name!r}; known: {', '.join(sorted(ADAPTERS))}") from None


def check_options(name: str, adapter: Callable, options: Mapping[str, Any]) -> None:
    """Fail before touching any row when a config passes an option the adapter lacks."""
    accepted = [p for p in inspect.signature(adapter).parameters if p not in ("row", "index")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"dataset {name!r} has no option(s) {unknown}; it accepts {accepted or 'none'}"
        )


# ---------------------------------------------------------------------------------------
# content checks and the row loop
# ---------------------------------------------------------------------------------------
def content_problem(example: Mapping) -> tuple[str, str] | None:
    """(reason, field) when a canonical example is well-formed but unusable, else None."""
    if not example["prompt"].strip():
        return "empty_prompt", "prompt"
    for key in ("chosen", "rejected"):
        if not example[key].strip():
            return "empty_response", key
    if example["chosen"].strip() == example["rejected"].strip():
        return "identical_responses", "rejected"
    return None


def adapt_rows(
    name: str,
    rows: Sequence[Any],
    *,
    indices: Sequence[int] | None = None,
    strict: bool = False,
    counter: DropCounter | None = None,
    **adapter_options: Any,
) -> tuple[list[dict], DropCounter]:
    """Apply the ``name`` adapter and the content checks to in-memory raw rows.

    ``indices`` gives each row's index in the source (default: its position), used in
    error messages and ``meta["row"]``. Structural problems raise :class:`DataError`;
    content problems are counted (raised when ``strict``). Does not require a non-empty
    result: :func:`~tisdpo.data.sources.load_preference_rows` does.
    """
    adapter = adapter_for(name)
    check_options(name, adapter, adapter_options)
    if indices is not None and len(indices) != len(rows):
        raise ValueError(f"adapt_rows: {len(indices)} indices for {len(rows)} rows")
    if counter is None:
        counter = DropCounter(name, strict=strict)
    counter.add(len(rows))

    examples = []
    for position, raw in enumerate(rows):
        index = int(indices[position]) if indices is not None else position
        try:
            example = adapter(raw, index=index, **adapter_options)
        except SkipRow as skip:
            counter.drop(skip.reason, index=index, field=skip.field, detail=skip.detail)
            continue
        problem = content_problem(example)
        if problem is not None:
            counter.drop(problem[0], index=index, field=problem[1])
            continue
        examples.append(example)
    return examples, counter
