"""Secrets out of everything the pipeline writes or logs: failed.json, run.log, stderr, judge errors,
the W&B config.

Three nets, from exact to broad: the values of environment variables whose names say they are
secrets (``*_API_KEY``, ``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``: ``WANDB_API_KEY``, ``OPENAI_API_KEY``,
``HF_TOKEN``, any ``*_KEY``, ...) wherever they appear; anything after ``Authorization:`` / ``Bearer`` / an
``api_key=`` style assignment; and, in config dicts, the value of any key named like a secret.
Redaction is by replacement with ``<redacted>`` (``<redacted:NAME>`` for a known variable), so a
message keeps its shape and stays one line. Layer 0: judges (eval) and the runtime both use it.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd|authorization|credential|cookie)", re.I)
# environment variables: the names above, and any *_KEY (OPENAI_API_KEY, JUDGE_KEY, ...)
_SECRET_ENV = re.compile(_SECRET_NAME.pattern + r"|(?:^|_)key$", re.I)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact ordinary text
# "Authorization: Bearer abc", "'Authorization': 'abc'", "api_key=abc", "token: abc", "Bearer abc"
_PATTERNS = (
    re.compile(r"""(?i)(["']?(?:proxy-)?authorization["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',}]+"""),
    re.compile(r"""(?i)(["']?[\w.-]*(?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password)["']?\s*[:=]\s*["']?)[^\s"',}&]+"""),
    re.compile(r"""(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{6,}"""),
    re.compile(r"""(?i)([?&](?:key|api_key|token|access_token)=)[^\s&"']+"""),
)


def secret_values() -> dict[str, str]:
    """{value: variable name} of the environment's secret-named variables (read at each call: a key
    set after start-up counts)."""
    return {value: name for name, value in os.environ.items()
            if _SECRET_ENV.search(name) and len(value) >= MIN_SECRET_LENGTH}


def redact(text: Any) -> Any:
    """``text`` with secrets replaced; anything not a string is returned as it is."""
    if not isinstance(text, str) or not text:
        return text
    for value, name in sorted(secret_values().items(), key=lambda item: -len(item[0])):
        if value in text:
            text = text.replace(value, f"<redacted:{name}>")
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_config(tree: Any) -> Any:
    """A config (nested dicts and lists) with secret-named keys' values and secret strings redacted."""
    if isinstance(tree, dict):
        return {key: (REDACTED if _SECRET_NAME.search(str(key)) and isinstance(value, str) and value
                      and not str(key).endswith("_env") else redact_config(value))
                for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_config(v) for v in tree)
    return redact(tree)


def redact_exception(error: BaseException) -> BaseException:
    """Redact an exception's string arguments in place (its message, as str() and tracebacks print
    it), and those of the exceptions it chains to; returns it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            current.args = tuple(redact(a) for a in current.args)
        except (AttributeError, TypeError):  # an exception type with read-only args
            pass
        current = current.__cause__ or current.__context__
    return error


class RedactingFilter(logging.Filter):
    """A handler filter: the record's message (and traceback text) redacted before any handler writes it."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (the root logger: run.log and
    stderr as Hydra configures them) that has none yet; returns the filter."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        for existing in handler.filters:
            if isinstance(existing, RedactingFilter):
                break
        else:
            handler.addFilter(_FILTER)
    return _FILTER


_FILTER = RedactingFilter()
