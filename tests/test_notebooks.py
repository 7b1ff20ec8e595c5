"""Both notebooks execute top to bottom on a tiny run and a tiny sweep."""
from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, TINY, compose_config
from tisdpo.stages.runner import run


def _execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    book = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    old = dict(os.environ)
    os.environ.update(env)
    os.environ["PYTHONPATH"] = str(ROOT)
    try:
        NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return book


def test_token_weights_notebook_runs_on_a_tisdpo_run(tmp_path):
    cfg = compose_config(["loss=tisdpo", "estimator=random", "eval=none"], tmp_path)
    run(cfg)
    book = _execute("token_weights.ipynb", {"TISDPO_RUN_DIR": str(cfg.paths.output_dir)})
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("text/html" in o.get("data", {}) for o in outputs)  # the coloured tokens


def test_compare_runs_notebook_runs_on_a_sweep(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "loss=dpo,ipo", *[o for o in TINY if not o.startswith("eval.")],
           "train.max_steps=2", "eval=none", f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    book = _execute("compare_runs.ipynb", {"TISDPO_SWEEP_DIR": str(tmp_path / "sweep")})
    text = "".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", ""))
                   for cell in book.cells for o in cell.get("outputs", []))
    assert "dpo" in text and "ipo" in text
