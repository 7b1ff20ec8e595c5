"""Run-level result cache: a (config, seed) already run, by any sweep, is reused instead of re-run.

Paper tables share rows (DPO with the same settings appears in several tables), and a whole tiny
reproduction re-runs them. With ``cache.reuse_runs=true`` a finished run's outputs are stored
under ``<cache.dir>/runs/<key>/`` and a later job with the same key copies them into its own run
dir and returns at once (``results.json["run_cache"]`` says so). The key hashes the composed
config minus what cannot change the results (paths, logger, label, which table asked, progress
bars: :data:`NOT_IN_KEY`), plus the code version: the content of every source file and config
under ``tisdpo/`` and ``conf/``, so any code change invalidates every entry. Off by default: a
user re-running a config usually wants it run.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from tisdpo.jsonio import read_json, write_json_atomic
from tisdpo.runtime.cache import stable_hash

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# Top-level keys (and dotted sub-keys) that do not change what a run computes.
NOT_IN_KEY = ("paths", "hydra", "logger", "label", "project", "paper_table", "resume", "resume_strict_code", "resume_allow_code_change",
              "cache", "export", "checkpoint", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
              "train.num_workers", "torch_threads")
# Files a finished run leaves that the reports and notebooks read.
OUTPUTS = ("results.json", "samples.json", "weights.npz", "token_weights.html", "weights_hist.png")


def code_version() -> str:
    """sha256 over every tisdpo/**/*.py and conf/**/*.yaml (path and content)."""
    digest = hashlib.sha256()
    for pattern, folder in (("*.py", "tisdpo"), ("*.yaml", "conf")):
        for path in sorted((PACKAGE_ROOT / folder).rglob(pattern)):
            digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _without(tree: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head in tree:
        if rest and isinstance(tree[head], dict):
            _without(tree[head], rest)
        elif not rest:
            del tree[head]


def run_key(config_dict: dict[str, Any]) -> str:
    """The cache key: the config minus :data:`NOT_IN_KEY`, and the code version."""
    config = copy.deepcopy(config_dict)
    for key in NOT_IN_KEY:
        _without(config, key)
    return stable_hash({"config": config, "code": code_version()})


def _entry(cfg: DictConfig, key: str) -> Path:
    return Path(str(cfg.cache.dir)).expanduser() / "runs" / key


def reuse(cfg: DictConfig, config_dict: dict[str, Any], output_dir: Path) -> dict[str, Any] | None:
    """The stored results of an identical earlier run, copied into ``output_dir``; None on a miss
    (or with ``cache.reuse_runs`` off)."""
    if not cfg.cache.get("reuse_runs"):
        return None
    key = run_key(config_dict)
    entry = _entry(cfg, key)
    if not (entry / "results.json").is_file():
        return None
    for name in OUTPUTS:
        if (entry / name).is_file() and name != "results.json":
            shutil.copy2(entry / name, output_dir / name)
    results = read_json(entry / "results.json")
    results["run_cache"] = {"reused": key, "from": results.get("run_cache", {}).get("stored_from")}
    results["config"] = config_dict  # this job's config (label, table, paths), the same computation
    write_json_atomic(output_dir / "results.json", results)
    log.info("run cache: an identical run (key %s, same code) was already done: its results are reused", key)
    return results


def store(cfg: DictConfig, config_dict: dict[str, Any], output_dir: Path) -> None:
    """Keep this finished run's outputs for later identical jobs (with ``cache.reuse_runs``)."""
    if not cfg.cache.get("reuse_runs"):
        return
    key = run_key(config_dict)
    entry = _entry(cfg, key)
    tmp = entry.with_name(f".{key}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in OUTPUTS:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, tmp / name)
    results = read_json(tmp / "results.json")
    results["run_cache"] = {"stored_from": str(output_dir), "key": key}
    write_json_atomic(tmp / "results.json", results)
    shutil.rmtree(entry, ignore_errors=True)
    tmp.rename(entry)
