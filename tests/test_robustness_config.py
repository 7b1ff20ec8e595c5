"""Issue #24, the smaller items: a ``+key`` nothing reads, a certain overflow, an unusable run dir
(unwritable, inside the cache), ``finished`` in a failed sweep's summary, and ``tisdpo.evaluate``
on a results.json whose config is not the run's. Each is one line (status 2), not a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, compose_config
from tisdpo.evaluate import EvaluateError, check_results_config
from tisdpo.runtime.config_guard import (check_numeric_bounds, check_run_dir, command_line_problem,
                                         unknown_key_problem)
from tisdpo.runtime.validate import ConfigError

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _one_line_exit_2(args, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("key,problem", [
    ("train.foo", "train has no key 'foo'"),
    ("foo", "the config has no key 'foo'"),
    ("loss.bogus", "loss has no key 'bogus'"),
    ("trainer.max_time", None),          # trainer's keys go to Lightning's Trainer
    ("logger.entity", None),             # the logger's to its class
    ("model.config.rope_theta", None),   # the model config's to transformers
    ("dataset.test_limit", None),        # another option of the group (dataset=hh) defines it
])
def test_an_added_key_nothing_reads_is_refused_listing_the_known_keys(key, problem):
    base = compose_config([])
    found = unknown_key_problem(base, key)
    if problem is None:
        assert found is None
    else:
        assert problem in found and "known keys:" in found and "\n" not in found
    assert "batch_size" in (unknown_key_problem(base, "train.foo") or "")


def test_cli_added_key_and_overflowing_beta_are_one_line(tmp_path):
    line = _one_line_exit_2(["+train.foo=1", f"paths.root_dir={tmp_path}"], tmp_path)
    assert line.startswith("config error: +train.foo: train has no key 'foo'") and "max_steps" in line
    line = _one_line_exit_2(["loss.beta=1e308", f"paths.root_dir={tmp_path}"], tmp_path)
    assert line.startswith("config error: loss.beta=1e+308: beta * margin overflows float32")


def test_overflow_and_non_finite_loss_numbers_are_refused():
    with pytest.raises(ConfigError, match="overflows float32"):
        check_numeric_bounds(compose_config(["loss.beta=1e39"]))
    with pytest.raises(ConfigError, match="loss.beta=inf: must be a finite number"):
        check_numeric_bounds(compose_config(["loss.beta=inf"]))
    check_numeric_bounds(compose_config(["loss.beta=0.1"]))


def test_run_dir_inside_the_cache_or_unwritable_is_one_line(tmp_path):
    cfg = compose_config([f"cache.dir={tmp_path}/cache", f"paths.output_dir={tmp_path}/cache/runs/x"])
    with pytest.raises(ConfigError, match="is inside cache.dir="):
        check_run_dir(cfg)
    # A run dir below a regular file cannot be made by anyone, root included (CI runs as root)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert "is a file, not a directory" in command_line_problem([f"hydra.run.dir={blocker}/run"])
    line = _one_line_exit_2([f"hydra.run.dir={blocker}/run"], tmp_path)
    assert line.startswith(f"config error: hydra.run.dir={blocker}/run: {blocker} is a file, not a directory")
    # A read-only dir: only a user without root's override can be refused by its permissions
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if not os.access(locked, os.W_OK):
            assert "is not writable" in command_line_problem([f"hydra.run.dir={locked}/run"])
            line = _one_line_exit_2([f"hydra.run.dir={locked}/run"], tmp_path)
            assert line.startswith(f"config error: hydra.run.dir={locked}/run: {locked} is not writable")
    finally:
        locked.chmod(0o755)


def test_a_failed_sweep_still_says_when_it_finished(tmp_path):
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "loss.beta=1e308,1e309", f"paths.root_dir={tmp_path}",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["counts"]["failed"] == 2 and summary["finished"] is not None and summary["complete"] is False


def test_evaluate_refuses_a_results_json_whose_config_is_not_the_runs(tmp_path):
    run_config = OmegaConf.to_container(compose_config([], tmp_path), resolve=True)
    results = {"val/loss": 0.5, "config": json.loads(json.dumps(run_config))}
    check_results_config(tmp_path, results, {**run_config, "_identity": {"code": {}}})  # the same: fine
    results["config"]["loss"]["beta"] = 0.5
    results["config"]["eval"] = {"name": "other"}  # eval options may differ
    with pytest.raises(EvaluateError) as error:
        check_results_config(tmp_path, results, run_config)
    message = str(error.value)
    assert "loss.beta: 0.1 -> 0.5" in message and "eval.name" not in message and "\n" not in message
