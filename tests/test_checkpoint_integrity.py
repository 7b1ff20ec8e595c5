"""Checkpoints are verified before a resume trusts them: a sha256 sidecar beside each one, the newest
found by its step (not by the name last.ckpt), a corrupt one skipped with a warning; a checkpoint
from before sidecars is accepted if its zip is readable."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from tisdpo.runtime.checkpoints import (checkpoint_problem, find_checkpoint, read_sidecar, sidecar_path,
                                              write_sidecar)

TRAIN = ["eval=none", "dataset.task.n_train_pairs=40", "train.max_steps=6", "checkpoint.every_n_steps=3",
         "checkpoint.keep_all=true", "train.val_every_n_steps=3"]


def flip_bytes(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_caught_and_the_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    from tisdpo.stages.runner import run

    run_dir = tmp_path / "run"
    expected = run(compose_config(TRAIN, tmp_path))
    ckpts = run_dir / "checkpoints"
    assert {p.name for p in ckpts.glob("*.ckpt")} == {"epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"}
    assert all(read_sidecar(p)["step"] == int(p.stem[-1]) for p in ckpts.glob("*step=*.ckpt"))
    assert read_sidecar(ckpts / "last.ckpt")["step"] == 6

    # Both step-6 files corrupt (64 flipped bytes each); the run "did not finish".
    flip_bytes(ckpts / "last.ckpt")
    flip_bytes(ckpts / "epoch=1-step=6.ckpt")
    (run_dir / "results.json").unlink()
    with caplog.at_level(logging.WARNING):
        resumed = run(compose_config(TRAIN + ["resume=true"], tmp_path))
    assert "last.ckpt does not match its sha256 sidecar" in caplog.text
    assert "epoch=1-step=6.ckpt does not match its sha256 sidecar" in caplog.text
    assert resumed["val/loss"] == pytest.approx(expected["val/loss"], abs=1e-6)  # continued from step 3, exactly

    # resume=<that file> names exactly one checkpoint: no silent fallback, one line.
    from tisdpo.runtime.validate import ConfigError

    flip_bytes(ckpts / "epoch=0-step=3.ckpt")
    (run_dir / "results.json").unlink()
    with pytest.raises(ConfigError, match=r"resume=.*step=3.ckpt: the checkpoint does not match its sha256 sidecar"):
        run(compose_config(TRAIN + [f"resume='{ckpts / 'epoch=0-step=3.ckpt'}'"], tmp_path))


def _ckpt(path: Path, step: int, sidecar: bool = True) -> Path:
    torch.save({"global_step": step, "w": torch.arange(100)}, path)
    if sidecar:
        write_sidecar(path, step)
    return path


def test_the_newest_checkpoint_is_the_highest_step_not_the_name_last(tmp_path):
    # A moved run dir once left a stale last.ckpt beside the new final last-v1.ckpt.
    _ckpt(tmp_path / "last.ckpt", 3)
    _ckpt(tmp_path / "last-v1.ckpt", 9)
    _ckpt(tmp_path / "epoch=0-step=6.ckpt", 6)
    assert find_checkpoint(tmp_path).name == "last-v1.ckpt"
    sidecar_path(tmp_path / "last-v1.ckpt").write_text(json.dumps({**read_sidecar(tmp_path / "last-v1.ckpt"), "size": 1}))
    assert find_checkpoint(tmp_path).name == "epoch=0-step=6.ckpt"  # a size mismatch: a partial write


def test_training_checkpoints_have_no_version_counter():
    from tisdpo.runtime.callbacks import VerifiedCheckpoint

    assert VerifiedCheckpoint(dirpath="x")._enable_version_counter is False


def test_a_checkpoint_without_a_sidecar_is_accepted_if_readable_with_a_warning(tmp_path, caplog):
    old = _ckpt(tmp_path / "last.ckpt", 4, sidecar=False)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path) == old
    assert "has no .sha256 sidecar" in caplog.text
    old.write_bytes(old.read_bytes()[:200])  # truncated: not a zip any more
    assert checkpoint_problem(old) == "is unreadable (partial or corrupt)" and find_checkpoint(tmp_path) is None


def test_rotated_checkpoints_take_their_sidecars_with_them(tmp_path):
    from tisdpo.stages.runner import run

    run(compose_config([*TRAIN[:-2], "train.val_every_n_steps=3"], tmp_path))  # keep_all off: one step file
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=1-step=6.ckpt", "epoch=1-step=6.ckpt.sha256",
                                                       "last.ckpt", "last.ckpt.sha256"]
    shutil.rmtree(ckpts)
