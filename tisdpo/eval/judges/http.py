"""An LLM judge behind an OpenAI-compatible chat-completions endpoint (stdlib only).

Every error it raises is redacted (``tisdpo.redaction``): a server that echoes the request's
Authorization header, or a key in its URL, must not put the key into failed.json or run.log."""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from tisdpo.redaction import redact

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class JudgeHTTPError(RuntimeError):
    """The judge endpoint could not give an answer (after retries where retrying makes sense).
    Its message is redacted: the server's answer may echo the request's credentials."""

    def __init__(self, message: str):
        super().__init__(redact(message))


def chat_completions_url(base_url: str) -> str:
    """``http://host:8000`` and ``http://host:8000/v1`` both -> ``.../v1/chat/completions``."""
    if not base_url:
        raise ValueError("base_url is required (e.g. https://api.openai.com/v1 or http://127.0.0.1:8000)")
    base = base_url.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + "/chat/completions"


def _is_timeout(error: BaseException) -> bool:
    if isinstance(error, (TimeoutError, socket.timeout)):
        return True
    return isinstance(error, urllib.error.URLError) and isinstance(error.reason, (TimeoutError, socket.timeout))


def post_json(url: str, payload: dict[str, Any], *, headers: dict[str, str] | None = None,
              timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0) -> dict[str, Any]:
    """POST ``payload`` as JSON and return the decoded JSON answer.

    Retries (up to ``max_retries`` more attempts, exponential ``backoff`` seconds, honouring a
    numeric Retry-After) on 408/409/425/429/5xx, timeouts and connection errors; other HTTP
    errors fail at once with the server's message.
    """
    body = json.dumps(payload).encode("utf-8")
    request_headers = {"Content-Type": "application/json", **(headers or {})}
    attempts = max(0, int(max_retries)) + 1
    last_problem = ""
    for attempt in range(attempts):
        wait = backoff * (2 ** attempt)
        request = urllib.request.Request(url, data=body, headers=request_headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
            try:
                return json.loads(raw.decode("utf-8"))
            except ValueError as error:
                raise JudgeHTTPError(f"POST {url}: the answer is not JSON ({error}): {raw[:200]!r}") from error
        except urllib.error.HTTPError as error:
            detail = error.read()[:500].decode("utf-8", "replace")
            if error.code not in RETRY_STATUSES:
                hint = " (check the API key in the environment variable named by api_key_env)" \
                    if error.code in (401, 403) else ""
                raise JudgeHTTPError(f"POST {url} failed with HTTP {error.code}{hint}: {detail}") from error
            last_problem = f"HTTP {error.code}: {detail}"
            retry_after = error.headers.get("Retry-After") if error.headers else None
            if retry_after and retry_after.strip().isdigit():
                wait = min(float(retry_after), 60.0)
        except JudgeHTTPError:
            raise
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            if _is_timeout(error):
                last_problem = f"timed out after {timeout:g}s (option timeout)"
            elif isinstance(error, (urllib.error.URLError, ConnectionError, OSError)):
                last_problem = f"connection error: {getattr(error, 'reason', error)}"
            else:
                raise
        if attempt + 1 < attempts and wait > 0:
            time.sleep(wait)
    raise JudgeHTTPError(f"POST {url} {last_problem}; gave up after {attempts} attempt(s) "
                         f"(option max_retries={max_retries})")


class OpenAICompatibleBackend:
    """Chat completions from any OpenAI-compatible server (OpenAI, vLLM, TGI, llama.cpp, ...).

    The API key is read from the environment variable named ``api_key_env`` at call time; when
    it is unset no Authorization header is sent (local servers usually need none).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 3, temperature: float = 0.0,
                 max_tokens: int = 512, backoff: float = 1.0, extra_body: dict[str, Any] | None = None):
        if not model:
            raise ValueError("model is required (the judge model's name on the server)")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.backoff = float(backoff)
        self.extra_body = dict(extra_body or {})

    def identity(self) -> dict[str, Any]:
        """What decides this backend's answers (the judge cache's key; the API key is not part of it)."""
        return {"backend": "openai_compatible", "url": self.url, "model": self.model,
                "temperature": self.temperature, "extra_body": self.extra_body}

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": int(max_tokens or self.max_tokens), **self.extra_body}
        answer = post_json(self.url, payload, headers=self._headers(), timeout=self.timeout,
                           max_retries=self.max_retries, backoff=self.backoff)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as error:
            raise JudgeHTTPError(f"POST {self.url}: no choices[0].message.content in the answer: "
                                 f"{json.dumps(answer)[:300]}") from error
        return content or ""
