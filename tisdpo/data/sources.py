"""Where preference rows come from: a local file or the hub, which rows, and their adapter.

    rows, report = load_preference_rows("pku_saferlhf", path="pairs.json", limit=1000)

The orchestration only: :mod:`tisdpo.data.formats` parses a local file, :mod:`tisdpo.data.schemas`
turns each raw row into a canonical example. This module picks the source (``dataset.path`` /
``dataset.test_path`` or the dataset's hub id, with the hub's split names), keeps the rows that
``dataset.limit`` asks for, and makes every :class:`~tisdpo.data.errors.DataError` name the file
(and line) or hub split the row came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tisdpo.errors import UserError

from .errors import DataError, DropCounter
from .formats import read_local_rows
from .schemas import adapt_rows, adapter_for, check_options

__all__ = ["HUB_DEFAULTS", "HubSource", "load_preference_rows", "read_raw_rows"]


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the hub, and how the generic split names map onto it."""

    hub_id: str
    hub_config: str | None = None
    split_aliases: Mapping[str, str] = field(default_factory=dict)


# the source of each dataset when dataset.path is unset
HUB_DEFAULTS: dict[str, HubSource] = {
    "pku_saferlhf": HubSource("PKU-Alignment/PKU-SafeRLHF"),
    "ultrafeedback": HubSource(
        "HuggingFaceH4/ultrafeedback_binarized",
        split_aliases={"train": "train_prefs", "test": "test_prefs", "validation": "test_prefs"},
    ),
    "tldr": HubSource("openai/summarize_from_feedback", "comparisons", split_aliases={"test": "validation"}),
    "hh": HubSource("Anthropic/hh-rlhf"),
}

# split names that mean "the held-out split": the file then came from dataset.test_path
_TEST_SPLITS = frozenset({"test", "test_prefs", "validation", "valid", "dev", "eval"})


def _option_name(split: str, option: str | None) -> str:
    """The config option a local file came from, for messages (the caller may say it outright)."""
    if option is not None:
        return option
    return "dataset.test_path" if str(split) in _TEST_SPLITS else "dataset.path"


def read_raw_rows(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    hub_id: str | None = None,
    hub_config: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    option: str | None = None,
):
    """The raw rows: a list of dicts from ``path`` if given, else a ``datasets.Dataset`` from the hub.

    Local JSON (a top-level list or JSON Lines, optionally gzipped; UTF-8 with or without a
    byte-order mark) is parsed with the json module, parquet with pyarrow. A local file has
    one split, so ``split`` is ignored there except to name the file's option in errors
    (``option``, default ``dataset.test_path`` for test-like splits, else ``dataset.path``).
    Unreadable files raise :class:`DataError` naming the option, the file and the line.
    """
    if path is not None:
        return read_local_rows(name, path, _option_name(split, option))[0]

    import datasets  # heavy import: only when data is actually read

    source = HUB_DEFAULTS.get(name)
    if hub_id is None:
        if source is None:
            raise ValueError(f"dataset {name!r} has no default hub id: set dataset.hub_id or dataset.path")
        hub_id = source.hub_id
        hub_config = hub_config if hub_config is not None else source.hub_config
    if source is not None and hub_id == source.hub_id:
        split = source.split_aliases.get(split, split)
    kwargs = {"split": split}
    if data_dir is not None:
        kwargs["data_dir"] = data_dir  # hh-rlhf subsets (harmless-base, ...) are folders
    try:
        return datasets.load_dataset(hub_id, hub_config, **kwargs)
    except Exception as err:
        if hasattr(err, "add_note"):  # python >= 3.11; keeps the original exception type
            err.add_note(
                f"while loading dataset {name!r} from the hub ({hub_id}, config {hub_config}, split {split!r}); "
                "offline, point dataset.path at a local JSON/JSONL/parquet file instead"
            )
        raise


def _select(n_rows: int, *, limit: int | None, shuffle: bool, seed: int, option: str = "dataset.limit") -> list[int] | None:
    """Row indices to keep (None = all, in order)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise UserError(f"{option} must be a non-negative integer or null, got {limit!r}")
    if not shuffle:
        return None if limit is None or limit >= n_rows else list(range(limit))
    order = np.random.default_rng(seed).permutation(n_rows)
    return [int(i) for i in order[: n_rows if limit is None else limit]]


def load_preference_rows(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    hub_id: str | None = None,
    hub_config: str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    strict: bool = False,
    shuffle: bool = False,
    data_dir: str | None = None,
    option: str | None = None,
    **adapter_options: Any,
) -> tuple[list[dict], DropCounter]:
    """Load a preference dataset as canonical examples, with a drop report.

    Source: ``path`` (local JSON/JSONL/JSONL.GZ/parquet) if given, else the hub
    (``hub_id``/``hub_config`` default to the dataset's; ``split`` names such as
    "train"/"test" are mapped to the hub's, e.g. UltraFeedback "train" -> "train_prefs").
    ``limit`` keeps the first N raw rows (after a permutation seeded by ``seed`` when
    ``shuffle``); drops are counted out of those N. Raises :class:`DataError` when no row
    survives. Every :class:`DataError` names where the rows came from: the option
    (``option``: ``dataset.path`` or ``dataset.test_path``, see :func:`read_raw_rows`) and
    file, the 0-based row in it (and its line, for JSON Lines), or the hub id and split.
    """
    check_options(name, adapter_for(name), adapter_options)  # before a possibly long download
    option = _option_name(split, option)
    if path is not None:
        rows, lines, source = read_local_rows(name, path, option)
    else:
        rows, lines = read_raw_rows(name, hub_id=hub_id, hub_config=hub_config, split=split, data_dir=data_dir), None
        source = f"hub {hub_id or HUB_DEFAULTS[name].hub_id!r} split {split!r}"
    limit_option = "dataset.test_limit" if option == "dataset.test_path" else "dataset.limit"
    indices = _select(len(rows), limit=limit, shuffle=shuffle, seed=seed, option=limit_option)
    try:
        if path is not None:
            chosen = rows if indices is None else [rows[i] for i in indices]
        else:
            chosen = rows.to_list() if indices is None else rows.select(indices).to_list()
        examples, counter = adapt_rows(name, chosen, indices=indices, strict=strict, **adapter_options)
        counter.require_nonempty()
    except DataError as err:
        if err.source is not None:
            raise
        line = lines[err.index] if lines is not None and err.index is not None and err.index < len(lines) else None
        raise err.with_source(source, line) from err
    return examples, counter
