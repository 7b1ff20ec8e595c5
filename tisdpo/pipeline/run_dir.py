"""Run dirs and the ``resume`` option: which dir a job writes to, and whether it may continue it.

``resume=true`` continues the checkpoint of the current run dir (Hydra makes a new dir per run, so
pair it with ``hydra.run.dir=<previous run dir>`` or re-run the same sweep dir); ``resume=<run dir>``
continues that run in place: outputs and new checkpoints go to that dir; ``resume=<file.ckpt>``
continues from exactly that checkpoint. Either way the composed config must match the one the run
started with (``run_config.json``), apart from keys that cannot change the trained weights.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tisdpo.jsonio import write_json_atomic
from tisdpo.pipeline.validate import ConfigError

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
# Config keys that may differ between a run and its resumption: they cannot change the weights.
RESUME_IGNORED = ("resume", "paths", "hydra", "logger", "eval", "cache", "label", "project",
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


def check_run_config(output_dir: Path, config_dict: dict, resuming: bool) -> None:
    """Record the run's config (first start), or check a resumption against it."""
    path = output_dir / RUN_CONFIG
    if path.is_file() and resuming:
        differences = config_differences(json.loads(path.read_text()), json.loads(json.dumps(config_dict, default=str)))
        if differences:
            shown = "; ".join(differences[:8]) + (f"; ... ({len(differences)} in all)" if len(differences) > 8 else "")
            raise ConfigError(
                f"resume: the config differs from the one {output_dir} started with ({shown}); pass the same overrides "
                f"(see {output_dir / '.hydra' / 'overrides.yaml'}) or start a new run"
            )
        return
    write_json_atomic(path, config_dict)


def archive_previous_failure(output_dir: Path) -> None:
    """A resumed run moves the failure marker of the attempt it continues aside (kept for the record):
    a marker left in place would make reports count the finished run as failed."""
    marker = output_dir / "failed.json"
    if marker.is_file():
        n = 1
        while (output_dir / f"failed.previous-{n}.json").exists():
            n += 1
        marker.rename(output_dir / f"failed.previous-{n}.json")
        log.info("resume: the previous attempt's failure is kept as %s", f"failed.previous-{n}.json")


def begin_run(cfg, output_dir: Path, config_dict: dict) -> dict | None:
    """Record (or, when resuming, check) the run's config; the stored results when a resumed run
    had already finished (a re-launched sweep skips its finished jobs), else None."""
    resuming = parse_resume(cfg.get("resume")).requested
    check_run_config(output_dir, config_dict, resuming)
    if not resuming:
        return None
    archive_previous_failure(output_dir)
    results_file = output_dir / "results.json"
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except ValueError:
            log.warning("resume: %s is unreadable; running the job again", results_file)
            return None
        log.info("resume: %s already finished (%s); nothing to do", output_dir, results_file)
        return results
    return None
