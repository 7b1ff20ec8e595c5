"""Full and read-only disks. A full disk is simulated by making writes raise OSError(ENOSPC); a
read-only cache by making the lock file's creation raise OSError(EROFS) (tests run as root here,
and root ignores permission bits, so chmod cannot make a directory read-only for them)."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch

import tisdpo.runtime.failures as failures
from tisdpo.runtime.checkpoints import read_sidecar, save_verified, write_sidecar


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_open(under: Path):
    """open() that, for files under ``under``, creates them (empty) and then fails to write."""
    real = open

    def fake(path, mode="r", *args, **kwargs):
        if "w" in mode and Path(path).resolve().is_relative_to(under.resolve()):
            real(path, mode).close()
            enospc()
        return real(path, mode, *args, **kwargs)

    return fake


def test_a_full_run_disk_still_records_why_the_job_failed(tmp_path, monkeypatch, capsys, caplog):
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    run_dir.mkdir(), tmp.mkdir()
    monkeypatch.setattr(failures.tempfile, "tempdir", str(tmp))
    failures.hold_reserve(run_dir)
    assert (run_dir / failures.RESERVE).stat().st_size == failures.RESERVE_BYTES
    monkeypatch.setattr(failures, "open", full_disk_open(run_dir), raising=False)

    with caplog.at_level(logging.ERROR):
        path = failures.write_failure(run_dir, OSError(errno.ENOSPC, "No space left on device"))
    assert path == tmp / f"tisdpo-failed-{failures.os.getpid()}.json"
    assert json.loads(path.read_text())["message"] == "[Errno 28] No space left on device"
    assert sorted(p.name for p in run_dir.iterdir()) == []  # no empty .tmp left; the reserve was freed first
    assert f"the failure is recorded in {path}" in capsys.readouterr().err
    assert "recorded in" in caplog.text


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path):
    class Trainer:  # what save_verified uses of a Lightning Trainer
        is_global_zero, global_step = True, 7

        def __init__(self, fail: str | None):
            self.fail = fail

        def save_checkpoint(self, path):
            if self.fail == "before":  # the serialisation failed: the old file was never touched
                enospc()
            torch.save({"step": 7, "w": torch.arange(1000)}, path)
            if self.fail == "midway":  # the disk filled while copying it into place
                Path(path).write_bytes(Path(path).read_bytes()[:500])
                enospc()

    target = tmp_path / "last.ckpt"
    save_verified(Trainer(None), target)
    assert read_sidecar(target)["step"] == 7
    with pytest.raises(OSError):
        save_verified(Trainer("before"), target)
    assert target.is_file() and read_sidecar(target)  # the intact previous checkpoint is kept
    with pytest.raises(OSError):
        save_verified(Trainer("midway"), target)
    assert not target.exists() and not Path(str(target) + ".sha256").exists()


def test_a_read_only_cache_with_valid_artifacts_is_usable(tmp_path, monkeypatch):
    import tisdpo.runtime.cache as cache_module
    from tisdpo.runtime.cache import ArtifactCache

    def build(out):
        (out / "model.bin").write_bytes(b"m" * 100)

    built = ArtifactCache(tmp_path / "cache").get_or_build("sft", {"a": 1}, build)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_module, "FileLock", read_only)  # any lock in the cache dir fails
    monkeypatch.setattr(Path, "mkdir", read_only)
    again = ArtifactCache(tmp_path / "cache").get_or_build("sft", {"a": 1}, build)
    assert again.reused and again.path == built.path


def test_a_lock_that_cannot_be_created_in_the_cache_is_taken_in_tmp(tmp_path, monkeypatch, caplog):
    import tisdpo.runtime.cache as cache_module
    from tisdpo.runtime.cache import ArtifactCache

    real = open

    def no_lock_files(path, mode="r", *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(cache_module, "open", no_lock_files, raising=False)
    monkeypatch.setattr(cache_module.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with caplog.at_level(logging.WARNING):
        artifact = ArtifactCache(tmp_path / "cache").get_or_build("sft", {"a": 2}, lambda out: (out / "x").write_text("1"))
    assert not artifact.reused and "locking with" in caplog.text and list((tmp_path / "tmp").glob("tisdpo-lock-*.lock"))


def test_sidecars_are_written_atomically_after_the_checkpoint(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"x": 1}, path)
    write_sidecar(path, 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert read_sidecar(path)["size"] == path.stat().st_size
