"""Data errors and drop accounting.

Policy (shared by loading and tokenisation):

* structural problems -- a missing field, a wrong type, a bad label id -- raise
  :class:`DataError`: the data is not what the adapter was written for, and silently
  skipping would hide that;
* content problems -- an empty string, chosen == rejected, a response truncated to
  nothing -- are counted skips in a :class:`DropCounter`; with ``strict=True`` they
  raise :class:`DataError` instead;
* a dataset left empty after filtering raises :class:`DataError` saying how many rows
  were dropped and why.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tisdpo.errors import UserError

__all__ = ["DataError", "DropCounter", "SkipRow", "describe_type"]


def describe_type(value: Any) -> str:
    """Short type name for error messages (``None`` reads better than ``NoneType``)."""
    return "None" if value is None else type(value).__name__


class DataError(UserError):
    """A row does not fit the expected schema, or the data is unusable.

    The message always names the dataset, and the row and field when known, e.g.
    ``pku_saferlhf row 17, field 'response_1': expected a string, got int``. Read from a local
    file, it also names the option and the file (``source``), the 1-based line for JSON Lines,
    and says that rows count from 0, e.g. ``ultrafeedback row 7, field 'chosen': expected a
    string, got int (in dataset.test_path 'test.jsonl' at line 8; rows count from 0)``; an
    error about the whole file leads with it: ``hh, dataset.path 'x.jsonl': the file is empty``.
    A subclass of :class:`~tisdpo.errors.UserError`: a run reports it as one line, status 2.
    """

    def __init__(self, dataset: str, index: int | None, field: str | None, message: str,
                 source: str | None = None, line: int | None = None):
        self.dataset = dataset
        self.index = index
        self.field = field
        self.reason = message
        self.source = source
        self.line = line
        super().__init__(self._text())

    def _text(self) -> str:
        where = str(self.dataset)
        if self.index is None and self.source is not None:
            # about the file (or a line of it), not a row: lead with the file
            where += f", {self.source}" + (f", line {self.line}" if self.line is not None else "")
        elif self.index is not None:
            where += f" row {self.index}"
        if self.field is not None:
            where += f", field {self.field!r}"
        text = f"{where}: {self.reason}"
        if self.index is not None and self.source is not None:
            # at the end, so "<dataset> row N, field F: ..." reads (and matches) as for in-memory rows;
            # "count from 0" because editors number lines from 1, and the two would be confused
            at = f" at line {self.line}" if self.line is not None else ""
            text += f" (in {self.source}{at}; rows count from 0)"
        elif self.index is not None and self.line is not None:
            text += f" (line {self.line})"
        return text

    def with_source(self, source: str, line: int | None = None) -> "DataError":
        """The same error, naming the file it came from (raise it ``from`` this one)."""
        return type(self)(self.dataset, self.index, self.field, self.reason, source,
                          line if line is not None else self.line)

    def __reduce__(self):
        # Exceptions pickle via ``args``; ours has a different constructor, and data
        # loading may run in worker processes that send errors back by pickling.
        return (type(self), (self.dataset, self.index, self.field, self.reason, self.source, self.line))


class SkipRow(Exception):
    """Raised by an adapter for a row that is well-formed but deliberately filtered out
    (e.g. a CNN/DM article in the TL;DR comparisons); the loader counts it under
    ``reason``. Not an error: :func:`~tisdpo.data.schemas.adapt_rows` never lets it out.
    """

    def __init__(self, reason: str, field: str | None = None, detail: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        self.detail = detail


class DropCounter:
    """Counts rows seen and rows skipped, by reason.

    ``kept`` is ``total - dropped``, so one counter can follow rows through several
    stages (loading, then tokenisation): every stage records its drops on the same
    object, and the report stays "dropped X of N raw rows".

    With ``strict=True``, :meth:`drop` raises :class:`DataError` instead of counting.
    """

    #: reasons used by this package (others are allowed; these just document them)
    REASONS = (
        "empty_prompt",
        "empty_response",
        "identical_responses",
        "prompt_too_long",
        "response_fully_truncated",
        "not_safety_divergent",
        "not_reddit_post",
    )

    #: row indices remembered per reason, to point at examples in messages
    MAX_EXAMPLES = 3

    def __init__(self, dataset: str = "data", total: int = 0, *, strict: bool = False):
        self.dataset = dataset
        self.total = int(total)
        self.strict = bool(strict)
        self.dropped: Counter[str] = Counter()
        self.examples: dict[str, list[int]] = {}
        self.truncated: Counter[str] = Counter()  # kept rows cut to fit: "prompt", "response"

    # -- recording -------------------------------------------------------------------
    def add(self, n: int = 1) -> None:
        """Record ``n`` more rows seen."""
        self.total += int(n)

    def drop(
        self,
        reason: str,
        *,
        index: int | None = None,
        field: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Count one skipped row (or raise :class:`DataError` when strict)."""
        if self.strict:
            message = f"{reason}" + (f" ({detail})" if detail else "")
            raise DataError(self.dataset, index, field, message + " [strict=True]")
        self.dropped[reason] += 1
        if index is not None:
            seen = self.examples.setdefault(reason, [])
            if len(seen) < self.MAX_EXAMPLES:
                seen.append(index)

    def note_truncated(self, what: str) -> None:
        """Count a kept row whose ``what`` (prompt/response) was cut to the length limits."""
        self.truncated[what] += 1

    # -- reading ---------------------------------------------------------------------
    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def kept(self) -> int:
        return self.total - self.n_dropped

    def _reasons_text(self) -> str:
        # most frequent first; ties alphabetical so the line is deterministic
        items = sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{n} {reason}" for reason, n in items)

    def summary(self) -> str:
        """One line, e.g. ``dropped 3 of 1000 rows: 2 identical_responses, 1 ...``."""
        line = f"dropped {self.n_dropped} of {self.total} rows"
        if self.dropped:
            line += ": " + self._reasons_text()
        if self.truncated:
            line += "; kept rows truncated to fit: " + ", ".join(f"{n} {w}" for w, n in sorted(self.truncated.items()))
        return line

    def as_dict(self, prefix: str = "data") -> dict[str, int]:
        """Flat dict for results.json: ``data/dropped/<reason>``, ``data/kept``, ``data/total``."""
        out = {f"{prefix}/dropped/{reason}": n for reason, n in sorted(self.dropped.items())}
        out.update({f"{prefix}/truncated/{what}": n for what, n in sorted(self.truncated.items())})
        out[f"{prefix}/kept"] = self.kept
        out[f"{prefix}/total"] = self.total
        return out

    def require_nonempty(self) -> None:
        """Raise :class:`DataError` when every row was dropped (or none was given)."""
        if self.kept > 0:
            return
        if self.total == 0:
            raise DataError(self.dataset, None, None, "no rows to load (the source is empty)")
        examples = "; ".join(f"{r}: rows {v}" for r, v in sorted(self.examples.items()))
        message = f"no rows left after filtering: {self.summary()}"
        if examples:
            message += f" (e.g. {examples})"
        raise DataError(self.dataset, None, None, message)

    def __repr__(self) -> str:
        return f"DropCounter({self.dataset!r}: {self.summary()})"
