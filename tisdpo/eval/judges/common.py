"""Pieces every judge shares: the result type, device/dtype/tokenizer resolution, a thread map."""
from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch

# One implementation of each, shared with the training side (re-exported for the judges).
from tisdpo.models.loading import load_tokenizer, resolve_dtype  # noqa: F401

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class JudgeResult:
    """A judge's answer: flat scalar metrics (ready to log) and one record per judged sample."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


def mean_or_nan(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def std_or_nan(values: Sequence[float]) -> float:
    """Population std (the spread of the judged samples, not an estimate of a mean's error)."""
    if not values:
        return math.nan
    mu = sum(values) / len(values)
    return float(math.sqrt(sum((v - mu) ** 2 for v in values) / len(values)))


def parallel_map(fn: Callable[[T], R], items: Iterable[T], max_workers: int = 1) -> list[R]:
    """``map`` that keeps the order; threads when ``max_workers > 1`` (for network-bound judges)."""
    items = list(items)
    if max_workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(fn, items))


def check_same_length(option: str, **sequences: Sequence[Any]) -> int:
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{option}: inputs differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


def resolve_device(device: str | None) -> str:
    """``auto``/None -> cuda when available, else cpu; anything else is passed to torch as is."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def check_model_path(name_or_path: str, option: str) -> str:
    """A local-looking path must exist; hub ids pass through (loading them needs the network)."""
    if not name_or_path:
        raise ValueError(f"{option} is required")
    expanded = os.path.expanduser(str(name_or_path))
    if str(name_or_path).startswith((".", "/", "~")) and not Path(expanded).exists():
        raise FileNotFoundError(f"{option}={name_or_path!r}: no such directory")
    return expanded


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                use_chat_template: bool | None = None) -> tuple[str, bool]:
    """Text for ``messages`` and whether it came from the tokenizer's chat template.

    ``use_chat_template``: None = use it when the tokenizer has one; True = require it;
    False = never (contents joined by blank lines).
    """
    if use_chat_template is True and not has_chat_template(tokenizer):
        raise ValueError("use_chat_template=true but the tokenizer has no chat template")
    if use_chat_template is not False and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return text, True
    return "\n\n".join(m["content"] for m in messages), False


def sanitize_name(name: str, option: str) -> str:
    """A metric-name fragment: lower case letters, digits, ``_``, ``-``, ``.``."""
    cleaned = re.sub(r"[^a-z0-9_.\-]+", "_", str(name).strip().lower()).strip("_")
    if not cleaned:
        raise ValueError(f"{option}={name!r} gives an empty metric name")
    return cleaned
