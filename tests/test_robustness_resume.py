"""Issue #24, resume checks what it resumes: a checkpoint carries the identity of the run that wrote
it (loss, config hash, data fingerprint) in its sidecar; another run's checkpoint put into a killed
run's checkpoints/ is refused in one line before anything is written, from the command line too."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, TINY, compose_config
from tisdpo.runtime.checkpoints import identity_problem, read_sidecar, run_identity, write_sidecar
from tisdpo.runtime.run_dir import begin_run, prepare_run_dir, train_checkpoint
from tisdpo.runtime.validate import ConfigError


def start(root, *overrides):
    cfg = compose_config(list(overrides), root)
    out = prepare_run_dir(cfg)
    return cfg, out, begin_run(cfg, out, OmegaConf.to_container(cfg, resolve=True))


def fake_checkpoint(run_dir, step=4):
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really a checkpoint" * 10)
    write_sidecar(path, step)
    return path


def test_a_checkpoint_names_the_run_that_wrote_it(tmp_path):
    _, out, _ = start(tmp_path, "loss=dpo")
    sidecar = read_sidecar(fake_checkpoint(out))
    assert sidecar["run"] == run_identity(out) and sidecar["run"]["loss"] == "dpo"
    assert identity_problem(out / "checkpoints" / "last.ckpt", out) is None


def test_another_losss_checkpoint_is_refused_before_anything_is_written(tmp_path):
    _, ipo_dir, _ = start(tmp_path / "ipo", "loss=ipo")
    ipo_ckpt = fake_checkpoint(ipo_dir, step=40)
    cfg, dpo_dir, _ = start(tmp_path / "dpo", "loss=dpo")
    assert ipo_ckpt.is_file()
    (dpo_dir / "checkpoints").mkdir(exist_ok=True)
    for name in ("last.ckpt", "last.ckpt.sha256"):
        shutil.copy(ipo_dir / "checkpoints" / name, dpo_dir / "checkpoints" / name)
    before = sorted(p.name for p in dpo_dir.rglob("*"))
    with pytest.raises(ConfigError) as error:
        start(tmp_path / "dpo", "loss=dpo", "resume=true")
    message = str(error.value)
    assert "was written by another run: loss ipo (this run: dpo)" in message and "\n" not in message
    assert sorted(p.name for p in dpo_dir.rglob("*")) == before  # nothing written
    cfg = compose_config(["loss=dpo", "resume=true"], tmp_path / "dpo")
    with pytest.raises(ConfigError, match="another run"):
        train_checkpoint(cfg, dpo_dir)


def test_cli_resume_onto_another_losss_checkpoint_exits_in_one_line(tmp_path):
    overrides = [*[o for o in TINY if not o.startswith("eval.")], "eval=none"]
    _, ipo_dir, _ = start(tmp_path / "ipo", "loss=ipo", *overrides)
    fake_checkpoint(ipo_dir, step=40)
    _, dpo_dir, _ = start(tmp_path / "dpo", "loss=dpo", *overrides)
    (dpo_dir / "checkpoints").mkdir()
    for name in ("last.ckpt", "last.ckpt.sha256"):
        shutil.copy(ipo_dir / "checkpoints" / name, dpo_dir / "checkpoints" / name)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "loss=dpo", *overrides, "resume=true",
                           f"paths.root_dir={tmp_path / 'dpo'}", f"cache.dir={tmp_path / 'dpo' / 'cache'}",
                           f"hydra.run.dir={dpo_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "was written by another run: loss ipo (this run: dpo)" in lines[0]
    assert not (dpo_dir / "results.json").exists()
