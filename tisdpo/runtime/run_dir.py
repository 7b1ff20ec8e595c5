"""Run dirs and the ``resume`` option: which dir a job writes to, and whether it may continue it.

``resume=true`` continues the checkpoint of the current run dir (Hydra makes a new dir per run, so
pair it with ``hydra.run.dir=<previous run dir>`` or re-run the same sweep dir); ``resume=<run dir>``
continues that run in place: outputs and new checkpoints go to that dir; ``resume=<file.ckpt>``
continues from exactly that checkpoint. Either way the composed config must match the one the run
started with (``run_config.json``), apart from keys that cannot change the trained weights.

``run_config.json`` also records, under ``_identity``, what the config does not say: the data
content (hashes of the train, test and SFT rows, recorded once the data is loaded) and the code
(git commit, package version). A resume on different data is refused in one line; a different code
identity is a warning (a bug fix between the kill and the resume is normal), or refused with
``resume_strict_code=true``. A finished run returns its stored results only for the config it
finished with (``results.json`` holds it). A fresh start (no resume) in a dir that holds an earlier
attempt moves its ``results.json`` and ``checkpoints/`` aside, so a later resume cannot pick them up.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tisdpo.jsonio import write_json_atomic
from tisdpo.runtime.cache import stable_hash
from tisdpo.runtime.checkpoints import CHECKPOINT_DIR, checkpoint_problem, find_checkpoint
from tisdpo.runtime.validate import ConfigError
from tisdpo.provenance import code_identity

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
IDENTITY = "_identity"  # run_config.json: data and code identity, checked apart from the config
# Config keys that may differ between a run and its resumption: they cannot change the weights.
RESUME_IGNORED = (IDENTITY, "resume", "resume_strict_code", "paths", "hydra", "logger", "eval", "cache", "label", "project",
                  "trainer.enable_progress_bar", "trainer.log_every_n_steps", "checkpoint", "train.num_workers",
                  "export")
_OFF = ("false", "none", "null", "")


@dataclass(frozen=True)
class ResumeRequest:
    """The ``resume`` option, parsed once.

    requested   continue something (resume=true, a run dir or a checkpoint file);
    run_dir     the run dir to continue in place (resume=<dir> or the dir of resume=<file.ckpt>), else None;
    checkpoint  the exact checkpoint file (resume=<file.ckpt>), else None."""

    requested: bool
    run_dir: Path | None = None
    checkpoint: Path | None = None


def parse_resume(value: Any) -> ResumeRequest:
    if value is None or value is False or str(value).lower() in _OFF:
        return ResumeRequest(False)
    if value is True or str(value).lower() == "true":
        return ResumeRequest(True)
    path = Path(str(value)).expanduser()
    if path.suffix == ".ckpt":  # <run dir>/checkpoints/<file>.ckpt
        return ResumeRequest(True, run_dir=path.parent.parent, checkpoint=path)
    return ResumeRequest(True, run_dir=path)


def prepare_run_dir(cfg) -> Path:
    """The run dir this job writes to: ``paths.output_dir``, or the run ``resume=<dir>`` continues
    (``cfg.paths.output_dir`` is repointed there, so loggers follow)."""
    target = parse_resume(cfg.get("resume")).run_dir
    if target is not None:
        current = Path(str(cfg.paths.output_dir))
        if current.resolve() != target.resolve():
            log.info("resume=%s: continuing that run in place (this process's own dir %s keeps only its log)",
                     target, current)
        cfg.paths.output_dir = str(target)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED)


def config_differences(before: dict, now: dict) -> list[str]:
    a, b = _flatten(before), _flatten(now)
    keys = sorted(k for k in set(a) | set(b) if not _ignored(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys]


def _one_line(differences: list[str]) -> str:
    return "; ".join(differences[:8]) + (f"; ... ({len(differences)} in all)" if len(differences) > 8 else "")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def check_code_identity(cfg, output_dir: Path, recorded: dict | None) -> None:
    """A resume under other code: a warning, or refused with resume_strict_code=true."""
    # the commit and the package version (not the dirty flag: editing the tree is not another commit)
    now = {k: v for k, v in code_identity().items() if k in ("git_commit", "version")}
    if not recorded:
        return
    differences = [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(recorded) | set(now))
                   if recorded.get(k) != now.get(k)]
    if not differences:
        return
    message = f"resume: the code differs from the code {output_dir} started with ({_one_line(differences)})"
    if cfg.get("resume_strict_code"):
        raise ConfigError(f"{message}; resume_strict_code=true refuses it (check out that commit, or set it to false)")
    log.warning("%s; continuing (resume_strict_code=true would refuse)", message)


def check_run_config(output_dir: Path, config_dict: dict, resuming: bool, cfg=None) -> None:
    """Record the run's config and code identity (first start), or check a resumption against them."""
    path = output_dir / RUN_CONFIG
    if path.is_file() and resuming:
        before = json.loads(path.read_text())
        differences = config_differences(before, json.loads(json.dumps(config_dict, default=str)))
        if differences:
            raise ConfigError(
                f"resume: the config differs from the one {output_dir} started with ({_one_line(differences)}); pass "
                f"the same overrides (see {output_dir / '.hydra' / 'overrides.yaml'}) or start a new run"
            )
        check_code_identity(cfg if cfg is not None else {}, output_dir, (before.get(IDENTITY) or {}).get("code"))
        return
    identity = code_identity()
    write_json_atomic(path, {**config_dict, IDENTITY: {"code": {k: identity[k] for k in ("git_commit", "version")}}})


def data_identity(data) -> dict[str, Any]:
    """Hashes of the rows the run trains, validates and fine-tunes on (content, not file names)."""
    return {"train": data.fingerprint, "test": stable_hash(data.test_rows), "sft": stable_hash(data.sft_rows),
            "n_train": len(data.train_rows), "n_test": len(data.test_rows)}


def check_resume_data(cfg, output_dir: Path, data) -> None:
    """Called once the data is loaded: a resume whose data differs from what the run started with
    is refused (it would continue the old policy on new data); otherwise the data is recorded."""
    path = Path(output_dir) / RUN_CONFIG
    stored = _read_json(path)
    if stored is None:
        return
    now = data_identity(data)
    recorded = (stored.get(IDENTITY) or {}).get("data")
    if recorded and parse_resume(cfg.get("resume")).requested:
        differences = [f"{k} rows {recorded.get(k)} -> {now.get(k)}" for k in ("train", "test", "sft", "n_train", "n_test")
                       if recorded.get(k) != now.get(k)]
        if differences:
            raise ConfigError(
                f"resume: the data differs from the data {output_dir} started with ({_one_line(differences)}): "
                f"restore it (dataset.path={cfg.dataset.get('path')!r}) or start a new run"
            )
        return
    if recorded != now and not _other_rank():
        write_json_atomic(path, {**stored, IDENTITY: {**(stored.get(IDENTITY) or {}), "data": now}})


def _other_rank() -> bool:
    """A DDP rank other than 0 (Lightning re-runs this script per rank): only rank 0 moves or records files."""
    return any(int(os.environ.get(k, "0") or 0) for k in ("LOCAL_RANK", "NODE_RANK"))


def archive_previous_failure(output_dir: Path) -> None:
    """A resumed run moves the failure marker of the attempt it continues aside (kept for the record):
    a marker left in place would make reports count the finished run as failed."""
    marker = output_dir / "failed.json"
    if marker.is_file():
        target = _aside(output_dir, "failed.previous-{}.json")
        marker.rename(target)
        log.info("resume: the previous attempt's failure is kept as %s", target.name)


def _aside(output_dir: Path, pattern: str) -> Path:
    n = 1
    while (output_dir / pattern.format(n)).exists():
        n += 1
    return output_dir / pattern.format(n)


def archive_previous_attempt(output_dir: Path) -> None:
    """A fresh start in a used dir: the earlier attempt's results and checkpoints move aside, so
    that neither a 'finished' check nor the newest-checkpoint search can mistake them for this run's."""
    if _other_rank():
        return
    for name, pattern in (("results.json", "results.previous-{}.json"), (CHECKPOINT_DIR, "checkpoints.previous-{}")):
        old = output_dir / name
        if old.exists():
            target = _aside(output_dir, pattern)
            old.rename(target)
            log.warning("%s holds an earlier attempt (this run does not resume it): its %s is kept as %s",
                        output_dir, name, target.name)


def begin_run(cfg, output_dir: Path, config_dict: dict) -> dict | None:
    """Record (or, when resuming, check) the run's config; the stored results when a resumed run
    had already finished with this config (a re-launched sweep skips its finished jobs), else None."""
    resuming = parse_resume(cfg.get("resume")).requested
    if not resuming:
        archive_previous_attempt(output_dir)
    check_run_config(output_dir, config_dict, resuming, cfg)
    if not resuming:
        return None
    archive_previous_failure(output_dir)
    results_file = output_dir / "results.json"
    if results_file.is_file():
        results = _read_json(results_file)
        if results is None:
            log.warning("resume: %s is unreadable; running the job again", results_file)
            return None
        finished_with = results.get("config")
        if isinstance(finished_with, dict):
            differences = config_differences(finished_with, json.loads(json.dumps(config_dict, default=str)))
            if differences:
                raise ConfigError(
                    f"resume: {output_dir} finished with a different config ({_one_line(differences)}); its "
                    f"results.json is not this run's: start a new run (another hydra.run.dir)"
                )
        log.info("resume: %s already finished (%s); nothing to do", output_dir, results_file)
        return results
    return None


def train_checkpoint(cfg, output_dir: Path) -> str | None:
    """The checkpoint the preference training stage resumes from, if any."""
    resume = parse_resume(cfg.get("resume"))
    if not resume.requested:
        return None
    if resume.checkpoint is not None and resume.checkpoint.exists():  # resume=<a checkpoint (file or sharded dir)>: exactly that one
        problem = checkpoint_problem(resume.checkpoint)
        if problem is not None:  # the user named this file: no silent fallback to another one
            raise ConfigError(f"resume={resume.checkpoint}: the checkpoint {problem}; pass resume=<its run dir> to "
                              "continue from the newest intact checkpoint")
        log.info("resuming training from %s", resume.checkpoint)
        return str(resume.checkpoint)
    found = find_checkpoint(output_dir / CHECKPOINT_DIR)
    if found is None:
        if resume.run_dir is None:
            log.warning("resume=true, but %s holds no checkpoint: starting from scratch (Hydra makes a new dir per "
                        "run: pass hydra.run.dir=<the previous run dir>, or resume=<the previous run dir>)",
                        output_dir / CHECKPOINT_DIR)
        else:
            log.warning("resume=%s: the run has no intact checkpoint: training starts from scratch", output_dir)
        return None
    log.info("resuming training from %s", found)
    return str(found)
