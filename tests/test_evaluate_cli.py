"""`python -m tisdpo.evaluate <run dir | sweep dir> [overrides]`: evaluate finished runs again and
merge into their results.json (tisdpo/evaluate.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_config
import tisdpo.evaluate as evaluate
from tisdpo.evaluate import main, plan_sweep
from tisdpo.stages.runner import run

# A tiny SFT rarely ends its answers: keep them so that every metric is a number.
EVAL = ["eval=synthetic", "eval.n_prompts=8", "eval.max_new_tokens=8", "eval.unfinished=keep"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run trained with eval=none (no eval/ keys)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    run(compose_config(["eval=none"], tmp))
    return tmp / "run"


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _copy(run_dir: Path, to: Path, **config_changes) -> Path:
    shutil.copytree(run_dir, to)
    if config_changes:
        config = json.loads((to / "run_config.json").read_text())
        for key, value in config_changes.items():
            node = config
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        (to / "run_config.json").write_text(json.dumps(config))
    return to


def test_evaluate_a_run_merges_results(trained, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    before = _results(run_dir)
    assert "eval/true_reward" not in before and "val/rewards/accuracies" in before

    assert main([str(run_dir), *EVAL]) == 0
    after = _results(run_dir)
    assert {k: after[k] for k in before} == before  # every earlier key kept as it was
    assert isinstance(after["eval/true_reward"], float) and isinstance(after["eval/kl_ref"], float)
    assert (run_dir / "samples.json").is_file()
    [entry] = after["evaluations"]
    assert entry["overrides"] == EVAL and "eval/true_reward" in entry["keys"] and "val/rewards/accuracies" not in entry["keys"]

    # A re-evaluation overwrites only what it computes, and is recorded beside the first.
    assert main([str(run_dir), *EVAL, "eval.temperatures=[0.0]"]) == 0
    again = _results(run_dir)
    assert len(again["evaluations"]) == 2
    assert again["val/rewards/accuracies"] == before["val/rewards/accuracies"]
    assert again["eval/true_reward"] != after["eval/true_reward"] or again["eval/length"] != after["eval/length"]


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such directory"),
    (["{plain}"], "not a run dir"),
    (["{nopolicy}", "eval=synthetic"], "no exported policy"),
    (["{run}", "eval.no_such_option=1"], "eval.no_such_option is not an option"),
    (["{run}", "eval=no_such_preset"], "eval=no_such_preset"),
    (["{run}", "loss=ipo"], "may swap only eval"),
    (["{run}", "eval=synthetic", "eval.n_prompts=0"], "eval.n_prompts=0"),
    (["{run}", "eval=synthetic", "eval.unfinished=drop"], "eval.unfinished='drop'"),
    (["{run}"], "evaluation is off"),  # the run was trained with eval=none
])
def test_bad_input_is_one_line_and_status_2(trained, tmp_path, capsys, args, message):
    (tmp_path / "plain").mkdir()
    nopolicy = _copy(trained, tmp_path / "nopolicy")
    shutil.rmtree(nopolicy / "policy")
    dirs = {"missing": tmp_path / "missing", "plain": tmp_path / "plain", "nopolicy": nopolicy, "run": trained}
    before = _results(trained)
    assert main([a.format(**dirs) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert _results(trained) == before  # nothing written


def test_command_line_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tisdpo.evaluate", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error:")


def test_sweep_evaluates_every_job_dpo_first(trained, tmp_path):
    sweep = tmp_path / "sweep"
    tis = _copy(trained, sweep / "0", label="TIS-DPO(D)")
    dpo = _copy(trained, sweep / "1")  # label dpo
    assert main([str(sweep), *EVAL]) == 0
    for job in (tis, dpo):
        assert "eval/true_reward" in _results(job) and "val/rewards/accuracies" in _results(job)

    # Judged with a win rate against DPO's samples: DPO first, each job's baseline its seed's DPO samples.
    other_seed = _copy(trained, sweep / "2", label="IPO", seed=1)
    plan = plan_sweep([tis, dpo, other_seed], ["eval=judges_pku"])
    assert [run for run, _ in plan] == [dpo, tis, other_seed]
    overrides = dict(plan)
    assert overrides[dpo] == ["eval=judges_pku"]  # the baseline itself: no baseline
    assert overrides[tis] == ["eval=judges_pku", f"eval.baseline_samples={dpo / 'samples.json'}"]
    assert overrides[other_seed] == ["eval=judges_pku"]  # no DPO job with seed 1
    given = ["eval=judges_pku", "eval.baseline_samples=/x/samples.json"]
    assert dict(plan_sweep([tis, dpo], given))[tis] == given  # an explicit baseline wins
    assert dict(plan_sweep([tis, dpo], ["eval=judges_pku_nowin"]))[tis] == ["eval=judges_pku_nowin"]  # no win rate


def test_metrics_go_to_the_runs_wandb_run(trained, tmp_path, monkeypatch):
    logged: dict = {}

    class FakeLogger:
        def log_metrics(self, metrics, step=None):
            logged["metrics"] = metrics

    def open_run_logger(run_dir, job_type):
        logged["opened"] = (Path(run_dir), job_type)
        return FakeLogger()

    monkeypatch.setattr(evaluate, "open_run_logger", open_run_logger)
    monkeypatch.setattr(evaluate, "finish_logging", lambda logger, run_dir, results: logged.update(finished=results))
    run_dir = _copy(trained, tmp_path / "run")
    assert main([str(run_dir), *EVAL]) == 0
    assert logged["opened"] == (run_dir, "eval")
    assert "eval/true_reward" in logged["metrics"] and "val/rewards/accuracies" not in logged["metrics"]
    assert logged["finished"] == _results(run_dir)
