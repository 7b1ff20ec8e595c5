"""Issue #24, secrets: an Authorization header, an API key or a token never reaches what the pipeline
writes or logs. A judge endpoint on 127.0.0.1 answers 401 and echoes the request's headers back."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tisdpo.eval.judges.http import JudgeHTTPError, OpenAICompatibleBackend
from tisdpo.redaction import RedactingFilter, redact, redact_config
from tisdpo.runtime.failures import failure_record, write_failure
from tisdpo.runtime.loggers import wandb_config

KEY = "sk-test-" + "9" * 32


class EchoHeaders(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.dumps({"error": "unauthorized", "you_sent": dict(self.headers)}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server():
    server = HTTPServer(("127.0.0.1", 0), EchoHeaders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_judge_error_that_echoes_the_key_is_redacted_everywhere(echo_server, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    backend = OpenAICompatibleBackend(echo_server, model="judge", api_key_env="JUDGE_KEY", max_retries=0)
    with pytest.raises(JudgeHTTPError) as caught:
        backend.complete([{"role": "user", "content": "hi"}])
    error = caught.value
    assert "HTTP 401" in str(error) and "<redacted" in str(error) and KEY not in str(error)

    write_failure(tmp_path, error)  # failed.json: message and traceback
    assert KEY not in (tmp_path / "failed.json").read_text()
    assert KEY not in json.dumps(failure_record(RuntimeError(f"wrapped: Authorization: Bearer {KEY}")))

    logger = logging.getLogger("tisdpo.test_secrets")
    handler = logging.FileHandler(tmp_path / "run.log")
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.error("judge said %s", f"Authorization: Bearer {KEY}")
        try:
            raise RuntimeError(f"key={KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = (tmp_path / "run.log").read_text()
    assert "judge said" in text and "RuntimeError" in text and KEY not in text


def test_the_wandb_config_and_plain_text_lose_their_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "w" * 40)
    config = wandb_config({"eval": {"judges": {"gpt": {"api_key": "abcdefgh12", "api_key_env": "OPENAI_API_KEY"}}},
                           "note": "token " + "w" * 40})
    dumped = json.dumps(config)
    assert "abcdefgh12" not in dumped and "w" * 40 not in dumped and "OPENAI_API_KEY" in dumped
    assert redact("GET /v1?api_key=abc123456&x=1") == "GET /v1?api_key=<redacted>&x=1"
    assert redact_config({"hf_token": "hf_abcdef", "max_new_tokens": 12}) == {"hf_token": "<redacted>", "max_new_tokens": 12}
