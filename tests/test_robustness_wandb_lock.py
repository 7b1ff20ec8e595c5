"""Issue #24, W&B and run-dir ownership, end to end (a real `python run.py` with no network):

- ``WANDB_MODE=offline`` with an API key set finishes with status 0, an offline W&B run, and no copy
  of the key in any file it wrote (a dead proxy makes any network attempt fail fast, not wait);
- a second ``python run.py`` on the live run's dir is refused in one line (exit status 2) within
  seconds, writes no failed.json there, and the first run still finishes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from tisdpo.runtime.loggers import wandb_offline_by_default

FAKE_KEY = "fa1e" * 10  # 40 characters, like a real W&B key


@pytest.mark.parametrize("env,requested,offline", [
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}, None, True),   # the case
    ({"WANDB_MODE": "offline"}, False, True),                             # offline wins over the config too
    ({"WANDB_API_KEY": FAKE_KEY}, None, True),                            # a key alone is not "go online"
    ({"WANDB_MODE": "online"}, None, False),
    ({}, False, False),                                                   # logger.offline=false asks for online
    ({}, None, True),
])
def test_offline_unless_asked_for_online(monkeypatch, env, requested, offline):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert wandb_offline_by_default(requested) is offline


def _files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_offline_run_with_a_key_finishes_and_a_second_process_on_its_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "WANDB_DIR": str(tmp_path / "wandb_home"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    args = [sys.executable, str(ROOT / "run.py"), *[o for o in TINY if o != "logger=none" and not o.startswith("eval.")], "logger=wandb",
            "eval=none", f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".tisdpo-owner.json").is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-3000:]
        started = time.time()
        second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert time.time() - started < 60
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"config error: run dir {run_dir} is in use by another process (pid {first.pid}")
        assert not (run_dir / "failed.json").exists()
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train/steps"] == 6
    assert json.loads((run_dir / "wandb_run.json").read_text())["mode"] == "offline"
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert not _files_containing(tmp_path, FAKE_KEY.encode()), "the API key was written to a file"
    assert not (run_dir / ".tisdpo-owner.json").exists()  # released
