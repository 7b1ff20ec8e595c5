"""The one base class for mistakes in what the user gave us (config values, data files).

A :class:`UserError` is bad user input, not a crash: a single run reports it as one line on
stderr and exits with status 2 (see ``tisdpo/runtime/failures.py``); in a sweep it is raised
like any failure so the other jobs go on. Subclasses: ``ConfigError``
(``tisdpo.runtime.validate``) and ``DataError`` (``tisdpo.data.errors``).
"""
from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad user input: reported as one line, exit status 2.

    A ``ValueError`` so that code catching the old exception types keeps working.
    """
