"""A multirun in which one job fails: the other jobs finish; the failure is recorded in the job's
failed.json, in the sweep's sweep_summary.json and in the report (a real `python run.py -m`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, TINY


def test_one_failing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Job 0 diverges (lr 1e30: a non-finite gradient at step 1); job 1 is an ordinary run.
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "optim.lr=1e30,5e-5", "optim.warmup_steps=0",
           *[o for o in TINY if not o.startswith("eval.")], "eval=none", "train.max_steps=2",
           f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0  # Hydra reports the failed job once every job has run
    assert "FloatingPointError" in done.stderr

    [failed_dir] = sweep.glob("0_*")
    [ok_dir] = sweep.glob("1_*")
    failure = json.loads((failed_dir / "failed.json").read_text())
    assert failure["type"] == "FloatingPointError" and "non-finite gradient at step 1" in failure["message"]
    assert "Traceback" in failure["traceback"] and not (failed_dir / "results.json").exists()
    assert json.loads((ok_dir / "results.json").read_text())["train/steps"] == 2

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["counts"] == {"jobs": 2, "ok": 1, "failed": 1, "interrupted": 0}
    job0, job1 = summary["jobs"]
    assert (job0["dir"], job0["status"], job1["dir"], job1["status"]) == (failed_dir.name, "failed", ok_dir.name, "ok")
    assert job0["error"].startswith("FloatingPointError: non-finite gradient at step 1")
    assert job0["overrides"][0].startswith("optim.lr=1e") and job0["failed_json"] and job1["results_json"]

    from experiments.report import main as report

    assert report([str(sweep), "--no-plots", "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    section = text.split("## Failed or unfinished jobs", 1)[1].split("## Methods", 1)[0]
    assert failed_dir.name in section and "FloatingPointError" in section and ok_dir.name not in section
