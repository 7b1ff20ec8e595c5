"""cache.reuse_runs: an identical (config, seed, code) run is reused, anything else runs."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import compose_config
from tisdpo.runtime import run_cache
from tisdpo.stages.runner import run


def _run(tmp_path: Path, name: str, *overrides: str) -> dict:
    cfg = compose_config(["cache.reuse_runs=true", "eval.n_prompts=8", *overrides], tmp_path)
    cfg.paths.output_dir = str(tmp_path / name)
    return run(cfg)


def test_an_identical_run_is_reused_and_a_different_one_runs(tmp_path, monkeypatch):
    first = _run(tmp_path, "a", "label=DPO", "paper_table=tisdpo_pku_main")
    assert "run_cache" not in first
    again = _run(tmp_path, "b", "label=dpo-row", "paper_table=tisdpo_ultrafeedback")  # another table's same row
    assert again["run_cache"]["reused"] and again["val/loss"] == first["val/loss"]
    assert again["config"]["label"] == "dpo-row"  # the reusing job keeps its own identity
    assert (tmp_path / "b" / "samples.json").is_file()
    other = _run(tmp_path, "c", "loss.beta=0.2")
    assert "run_cache" not in other
    monkeypatch.setattr(run_cache, "code_version", lambda: "a-code-change")
    assert "run_cache" not in _run(tmp_path, "d")
