"""Signals end a job as *interrupted*, never as a success: SIGTERM (SLURM, Kubernetes, `timeout`)
mid-training checkpoints the step it was in, writes failed.json (`"interrupted": true`, the signal),
exits 143, and `resume=<run dir>` ends with the same val loss as an uninterrupted run; in a sweep the
job counts as interrupted and the other jobs run; SIGINT says "interrupted by SIGINT"; a signal
outside training (SFT, evaluation) still leaves failed.json and a non-zero status.

Run as a script, this file is `python run.py` with a signal sent to itself:
``python tests/test_signals.py <trainer number> <global step> <SIGNAL> <run.py arguments...>`` sends
SIGNAL in the middle of optimizer step <global step>+1 of the <trainer number>-th Lightning Trainer
the process builds (once per process: in a sweep, only the first job gets it).
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import ROOT, TINY, compose_config

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# 40 pairs / batch 8; checkpoints every 3 steps: a signal in step 5 is saved at step 5, not 3.
TRAIN = ["eval=none", "dataset.task.n_train_pairs=40", "train.max_steps=9", "checkpoint.every_n_steps=3",
         "train.val_every_n_steps=4"]
CLI = [o for o in TINY if not o.startswith("eval.")]  # the command line with eval=none


def paths(run_dir: Path, cache: Path) -> list[str]:
    return [f"paths.root_dir={run_dir.parent}", f"paths.output_dir={run_dir}", f"cache.dir={cache}"]


def signalled_run(tmp_path: Path, trainer: int, step: int, name: str, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__)), str(trainer), str(step), name, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)


def test_sigterm_mid_training_checkpoints_records_exits_143_and_resumes_exactly(tmp_path):
    from tisdpo.runtime.checkpoints import read_sidecar
    from tisdpo.stages.runner import run

    cache, straight, stopped = tmp_path / "cache", tmp_path / "straight", tmp_path / "stopped"
    expected = run(compose_config(TRAIN + paths(straight, cache)))  # also builds the SFT model the others reuse

    # Trainer 0 is preference training (SFT comes from the cache); SIGTERM arrives during step 5.
    done = signalled_run(tmp_path, 0, 4, "SIGTERM",
                         [*CLI, *TRAIN, *paths(stopped, cache), f"hydra.run.dir={stopped}"])
    assert done.returncode == 143, done.stderr[-3000:]
    failure = json.loads((stopped / "failed.json").read_text())
    assert failure["interrupted"] is True and failure["signal"] == "SIGTERM" and failure["exit_status"] == 143
    assert failure["message"] == "interrupted by SIGTERM" and not (stopped / "results.json").exists()
    assert failure["checkpoint_on_signal"] == str(stopped / "checkpoints" / "last.ckpt")
    assert read_sidecar(stopped / "checkpoints" / "last.ckpt")["step"] == 5  # the step it was in, not the last periodic one
    assert "interrupted by SIGTERM" in (stopped / "run.log").read_text()

    resumed = run(compose_config(TRAIN + paths(tmp_path / "elsewhere", cache) + [f"resume={stopped}"]))
    print(f"SIGTERM at step 5, resumed: val/loss {resumed['val/loss']:.8f} vs uninterrupted {expected['val/loss']:.8f}")
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "train/steps"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6), key
    assert (stopped / "failed.previous-1.json").is_file() and not (stopped / "failed.json").exists()


def test_sigterm_in_a_sweep_counts_the_job_as_interrupted_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *CLI, "eval=none", "train.max_steps=3",
            f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    # Job 0 builds SFT (trainer 0) then trains (trainer 1): SIGTERM during its step 2.
    done = signalled_run(tmp_path, 1, 1, "SIGTERM", args)
    assert done.returncode != 0, done.stderr[-3000:]
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["counts"] == {"jobs": 2, "ok": 1, "failed": 0, "interrupted": 1}, summary
    job0, job1 = summary["jobs"]
    assert job0["status"] == "interrupted" and job0["error"].startswith("JobInterrupted: interrupted by SIGTERM")
    assert job1["status"] == "ok" and job1["results_json"]
    assert json.loads(Path(job0["failed_json"]).read_text())["signal"] == "SIGTERM"


class SignalAt(L.Callback):
    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigint_mid_training_says_interrupted_by_sigint_and_exits_130(tmp_path, monkeypatch):
    import tisdpo.runtime.fit as fit
    from tisdpo.runtime.failures import run_recorded
    from tisdpo.stages.runner import run

    original = fit.build_trainer

    def build_trainer(trainer_cfg, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), SignalAt(signal.SIGINT, 1)]
        return original(trainer_cfg, **kwargs)

    monkeypatch.setattr(fit, "build_trainer", build_trainer)
    cfg = compose_config(["eval=none", "train.max_steps=3", "sft.max_steps=3"], tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_recorded(cfg, run)
    assert stopped.value.code == 130
    failure = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert (failure["message"], failure["signal"], failure["interrupted"]) == ("interrupted by SIGINT", "SIGINT", True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handlers are gone after the job


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_outside_training_still_leaves_failed_json_and_a_non_zero_status(tmp_path, name):
    from tisdpo.runtime.failures import run_recorded

    def evaluation(cfg):  # e.g. generation during the eval stage: no Lightning fit to defer to
        os.kill(os.getpid(), signal.Signals[name])
        raise AssertionError("the signal did not stop the job")

    cfg = compose_config(["eval=none"], tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_recorded(cfg, evaluation)
    assert stopped.value.code == 128 + signal.Signals[name]
    failure = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failure["interrupted"] is True and failure["signal"] == name and failure["last_checkpoint"] is None


def _signalled_main(trainer_number: int, step: int, name: str, args: list[str]) -> None:
    import tisdpo.runtime.fit as fit

    original, built = fit.build_trainer, []

    def build_trainer(trainer_cfg, **kwargs):
        if len(built) == trainer_number:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), SignalAt(signal.Signals[name], step)]
        built.append(1)
        return original(trainer_cfg, **kwargs)

    fit.build_trainer = build_trainer  # every stage builds its trainer through fit.fit_stage
    torch.set_num_threads(1)
    sys.argv = [str(ROOT / "run.py"), *args]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _signalled_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
