"""End to end on the built-in task with a tiny model: results.json, caching, sweeps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, compose_config
from tisdpo.stages.runner import run


def _run(tmp_path, *overrides):
    cfg = compose_config(list(overrides), tmp_path)
    return run(cfg), Path(cfg.paths.output_dir)


def test_default_run_writes_results_and_reuses_sft(tmp_path):
    results, out = _run(tmp_path)
    on_disk = json.loads((out / "results.json").read_text())
    for key in ("val/rewards/accuracies", "val/rewards/margins", "val/logps/chosen", "val/loss",
                "eval/true_reward", "eval/safe_rate", "eval/helpfulness", "eval/kl_ref", "eval/win_rate",
                "time/total_s", "data/train/kept"):
        assert key in on_disk, key
    assert on_disk["config"]["loss"]["name"] == "dpo"
    assert on_disk["train/steps"] == 6
    assert [e["stage"] for e in on_disk["stages"]] == ["sft", "reference_logps", "train", "eval"]
    assert all(e["device"] == "cpu" for e in on_disk["stages"])  # built, not reused: each ran somewhere
    assert not any(e["reused"] for e in on_disk["stages"])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "samples.json").is_file()
    again, _ = _run(tmp_path)
    assert again["stages"][0]["reused"] is True
    # Same seed, same machine: identical metrics.
    assert again["val/rewards/accuracies"] == results["val/rewards/accuracies"]
    assert again["val/loss"] == pytest.approx(results["val/loss"], abs=1e-6)


def test_tisdpo_dpo_pair_pipeline_caches_estimator_and_scores(tmp_path):
    overrides = ["loss=tisdpo", "estimator=dpo_pair", "estimator.max_steps=4"]
    results, out = _run(tmp_path, *overrides)
    stages = {e["stage"]: e["reused"] for e in results["stages"] if e["stage"] not in ("train", "eval")}
    assert stages == {"sft": False, "estimator": False, "scores": False}
    for key in ("weights/spearman_chosen", "weights/spearman_rejected", "weights/auroc_chosen", "weights/auroc_rejected",
                "weights/mean_chosen", "weights/mean_rejected"):
        assert key in results, key
    for name in ("weights.npz", "token_weights.html", "weights_hist.png"):
        assert (out / name).is_file(), name
    # A different transform reuses the estimator models and the scores.
    again, _ = _run(tmp_path, *overrides, "estimator.transform.name=rank_linear")
    assert {e["stage"]: e["reused"] for e in again["stages"] if "key" in e} == {"sft": True, "estimator": True, "scores": True}
    assert again["weights/spearman_chosen"] == pytest.approx(results["weights/spearman_chosen"])


@pytest.mark.parametrize("estimator", ["prompt", "sft_pair", "random", "uniform"])
def test_every_tisdpo_estimator_runs(tmp_path, estimator):
    extra = ["estimator.max_steps=4"] if estimator == "sft_pair" else []
    results, _ = _run(tmp_path, "loss=tisdpo", f"estimator={estimator}", *extra)
    assert "weights/mean_chosen" in results
    assert "val/rewards/accuracies" in results
    if estimator == "uniform":
        assert results["weights/mean_chosen"] == 1.0 and results["weights/std_chosen"] == 0.0


def test_tidpo_pipeline_reports_gradient_weight_quality(tmp_path):
    results, _ = _run(tmp_path, "loss=tidpo", "estimator.quality_every_n_steps=3", "loss.triplet.max_new_tokens=8")
    assert "weights/spearman_chosen" in results and "weights/auroc_rejected" in results
    assert "val/triplet/loss" in results


def test_label_noise_flips_the_requested_share(tmp_path):
    results, _ = _run(tmp_path, "dataset.label_noise=0.25")
    assert results["data/label_flipped"] == 24  # 25% of 96 pairs


def test_multirun_sweep_one_dir_per_job(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "loss=dpo,ipo", *TINY, "train.max_steps=2",
           f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}", "eval=none",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    cmd = [c for c in cmd if not c.startswith("eval.")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [json.loads(p.read_text())["config"]["loss"]["name"] for p in results] == ["dpo", "ipo"]
    # The second job reused the first job's SFT model.
    assert json.loads(results[1].read_text())["stages"][0]["reused"] is True
