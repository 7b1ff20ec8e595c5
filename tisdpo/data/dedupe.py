"""Train/test hygiene for preference pairs: no exact duplicates, no test pair seen in training.

A pair is its ``(prompt, chosen, rejected)`` strings, compared exactly (metadata and weights
are not part of it). Duplicated rows are common in scraped and merged preference data; a
duplicate inside the training set silently up-weights a pair, and a test pair that is also a
training pair makes validation accuracy measure memorisation (a tester found all 19 held-out
pairs of a file to be copies of training pairs).

    rows, _, counts = drop_duplicate_pairs(rows, [])          # one file: before the hold-out split
    train, test = holdout_split(rows, test_limit, source="dataset.path 'pairs.jsonl'")
    train, test, counts = drop_duplicate_pairs(train, test)    # two files: after loading both
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from .errors import DataError

__all__ = ["drop_duplicate_pairs", "drop_test_prompts", "holdout_split", "pair_key", "top_up_holdout"]

log = logging.getLogger(__name__)

#: default number of held-out pairs when one file is split (dataset.test_limit: null)
DEFAULT_TEST_LIMIT = 256


def pair_key(row: Mapping) -> tuple[str, str, str]:
    """What makes two rows the same pair."""
    return (row["prompt"], row["chosen"], row["rejected"])


def _unique(rows: Sequence[Mapping], seen: set) -> tuple[list, int]:
    """Rows whose key is not in ``seen`` (first occurrence kept, order kept); adds the keys."""
    kept, dropped = [], 0
    for row in rows:
        key = pair_key(row)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(row)
    return kept, dropped


def drop_duplicate_pairs(
    train_rows: Sequence[Mapping],
    test_rows: Sequence[Mapping],
    *,
    dataset: str = "data",
) -> tuple[list, list, dict[str, int]]:
    """Drop exact duplicate pairs within each split, and test pairs that are training pairs.

    Returns ``(train_rows, test_rows, counts)``, the inputs untouched and their order kept;
    ``counts`` has ``train_duplicates``, ``test_duplicates`` and ``test_in_train`` (for
    results.json, e.g. as ``data/dedupe/<key>``). Logs one warning line when anything was
    dropped. Raises :class:`DataError` when every test pair was a training pair (there would
    be nothing left to validate on), or when no training pair is given.
    """
    if not train_rows:
        raise DataError(dataset, None, None, "no training pairs to deduplicate (the training split is empty)")
    train, train_dups = _unique(train_rows, set())
    train_keys = {pair_key(row) for row in train}
    test, test_dups = _unique(test_rows, set())
    in_train = sum(pair_key(row) in train_keys for row in test)
    test = [row for row in test if pair_key(row) not in train_keys]
    counts = {"train_duplicates": train_dups, "test_duplicates": test_dups, "test_in_train": in_train}
    if any(counts.values()):
        log.warning(
            "data: dropped %d duplicate training pairs (of %d), %d duplicate test pairs and %d test pairs "
            "that are also training pairs (of %d test pairs); pairs compared on exact prompt, chosen, rejected",
            train_dups, len(train_rows), test_dups, in_train, len(test_rows),
        )
    if test_rows and not test:
        raise DataError(
            dataset, None, None,
            f"all {len(test_rows)} test pairs are duplicates of training pairs ({in_train} of them, after "
            f"{test_dups} repeats within the test split): validation would measure memorisation; "
            "give a test file without them (dataset.test_path)",
        )
    return train, test, counts


def holdout_split(
    rows: Sequence[Mapping],
    test_limit: int | None,
    *,
    dataset: str = "data",
    source: str = "dataset.path",
    minimum: int | None = None,
) -> tuple[list, list]:
    """One file's rows -> (train, test): the last ``min(test_limit, max(1, n // 10))`` rows held out,
    at least ``minimum`` of them (``dataset.min_test_pairs``) while a training row is left.

    ``test_limit`` null means :data:`DEFAULT_TEST_LIMIT`. Raises :class:`DataError` (naming
    ``source``, e.g. ``"dataset.path 'pairs.jsonl'"``) when fewer than 2 pairs are left: a
    split needs one to train on and one to validate on.
    """
    if len(rows) < 2:
        raise DataError(
            dataset, None, None,
            f"{len(rows)} usable pair{'s' if len(rows) != 1 else ''}: too few to hold out a test split "
            "(need at least 2: one to train on, one to validate on); add rows or give dataset.test_path",
            source,
        )
    n_test = min(int(test_limit or DEFAULT_TEST_LIMIT), max(1, len(rows) // 10))
    if minimum:
        n_test = max(n_test, min(int(minimum), len(rows) - 1))
    return list(rows[:-n_test]), list(rows[-n_test:])


def top_up_holdout(train_rows: Sequence[Mapping], test_rows: Sequence[Mapping], minimum: int) -> tuple[list, list, int]:
    """(train, test, moved): a test split of fewer than ``minimum`` pairs topped up with the LAST rows of
    the training rows (in their order; a training limit then takes its rows from the head, so it never
    eats them), keeping one training row. Deduplicated inputs stay disjoint (each row moves once)."""
    moved = max(0, min(int(minimum) - len(test_rows), len(train_rows) - 1))
    if moved == 0:
        return list(train_rows), list(test_rows), 0
    return list(train_rows[:-moved]), [*test_rows, *train_rows[-moved:]], moved


def drop_test_prompts(train_rows: Sequence[Mapping], test_rows: Sequence[Mapping]) -> tuple[list, int]:
    """(training rows whose prompt is no held-out prompt, how many were dropped): a prompt-disjoint split
    (``dataset.disjoint_prompts``). Datasets with several response pairs per prompt (PKU-SafeRLHF) would
    otherwise validate on prompts the policy was trained on, with other responses."""
    held_out = {row["prompt"] for row in test_rows}
    kept = [row for row in train_rows if row["prompt"] not in held_out]
    return kept, len(train_rows) - len(kept)
