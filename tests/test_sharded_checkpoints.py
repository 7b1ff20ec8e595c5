"""Sharded checkpoints (FSDP with state_dict_type=sharded writes a directory per checkpoint): found
by step, verified against a sidecar over all their files, refused when incomplete or corrupt.

Lightning refuses FSDP on a CPU, so the directories are laid out here the way
torch.distributed.checkpoint writes them (one ``__<rank>_0.distcp`` per rank, ``.metadata`` last).
"""
from __future__ import annotations

import logging
from pathlib import Path

from tisdpo.runtime.checkpoints import checkpoint_problem, discard_partial, find_checkpoint, write_sidecar


def _sharded(directory: Path, name: str, step: int, *, ranks: int = 2, complete: bool = True, sidecar: bool = True) -> Path:
    path = directory / name
    path.mkdir(parents=True)
    for rank in range(ranks):
        (path / f"__{rank}_0.distcp").write_bytes(bytes([rank, step]) * 512)
    (path / "meta.pt").write_bytes(b"lightning loop state")
    if complete:
        (path / ".metadata").write_bytes(b"dcp metadata")
    if sidecar:
        write_sidecar(path, step)
    return path


def test_the_newest_intact_sharded_checkpoint_is_found_by_step(tmp_path):
    _sharded(tmp_path, "epoch=0-step=4.ckpt", 4)
    newest = _sharded(tmp_path, "epoch=0-step=8.ckpt", 8)
    assert find_checkpoint(tmp_path) == newest


def test_a_flipped_byte_in_one_shard_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    older = _sharded(tmp_path, "epoch=0-step=4.ckpt", 4)
    newest = _sharded(tmp_path, "epoch=0-step=8.ckpt", 8)
    shard = newest / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(tmp_path) == older
    assert "does not match its sha256 sidecar" in caplog.text


def test_an_unfinished_sharded_checkpoint_is_refused_and_removed_after_a_failed_write(tmp_path):
    partial = _sharded(tmp_path, "epoch=0-step=8.ckpt", 8, complete=False, sidecar=False)
    assert checkpoint_problem(partial) == "is unreadable (partial or corrupt)"
    assert find_checkpoint(tmp_path) is None
    assert discard_partial(partial) and not partial.exists()
    # one without a sidecar (older runs) is accepted once complete
    legacy = _sharded(tmp_path, "epoch=0-step=2.ckpt", 2, sidecar=False)
    assert checkpoint_problem(legacy) is None and find_checkpoint(tmp_path) == legacy
