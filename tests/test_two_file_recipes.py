"""A new method is two files: copying a loss (or an estimator) and its yaml under a new name, with no
other file touched, gives a loss (or an estimator) that runs end to end (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHORT = ["train.max_steps=3", "sft.max_steps=5", "eval.n_prompts=8", "train.val_every_n_steps=0", "logger=none",
         "checkpoint.every_n_steps=0", "dataset.task.n_train_pairs=64"]


@pytest.fixture
def copied(request):
    """Copy files inside the repo under new names for one test, and remove them after it."""
    made: list[Path] = []

    def copy(source: str, target: str, replace: dict[str, str]) -> None:
        text = (ROOT / source).read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        path = ROOT / target
        assert not path.exists(), f"{target} exists already"
        path.write_text(text)
        made.append(path)

    yield copy
    for path in made:
        path.unlink(missing_ok=True)
        shutil.rmtree(path.parent / "__pycache__" / f"{path.stem}.cpython-{sys.version_info.major}{sys.version_info.minor}.pyc",
                      ignore_errors=True)


def _run(tmp_path: Path, *overrides: str) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "TISDPO_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "run.py", *overrides, *SHORT, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "run" / "results.json").read_text())


def test_a_copied_loss_runs_as_a_new_loss(tmp_path, copied):
    copied("tisdpo/losses/ipo.py", "tisdpo/losses/zz_copied_ipo.py", {})
    copied("conf/loss/ipo.yaml", "conf/loss/zz_copied_ipo.yaml",
           {"name: ipo": "name: zz_copied_ipo", "tisdpo.losses.ipo.ipo_loss": "tisdpo.losses.zz_copied_ipo.ipo_loss"})
    results = _run(tmp_path, "loss=zz_copied_ipo")
    assert results["config"]["loss"]["name"] == "zz_copied_ipo"
    assert results["train/steps"] == 3 and "eval/true_reward" in results


def test_a_copied_estimator_runs_as_a_new_estimator(tmp_path, copied):
    copied("tisdpo/weights/estimators/random.py", "tisdpo/weights/estimators/zz_copied_random.py", {})
    copied("conf/estimator/random.yaml", "conf/estimator/zz_copied_random.yaml", {"name: random": "name: zz_copied_random"})
    results = _run(tmp_path, "loss=tisdpo", "estimator=zz_copied_random")
    assert results["config"]["estimator"]["name"] == "zz_copied_random"
    assert 0.7 <= results["weights/mean_chosen"] <= 1.3  # U(0.7, 1.3) weights, as the original
