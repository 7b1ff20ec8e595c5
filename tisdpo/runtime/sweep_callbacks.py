"""Hydra callbacks (``hydra.callbacks`` in conf/hydra/default.yaml).

:class:`SweepSummary` keeps ``<multirun dir>/sweep_summary.json`` up to date: one entry per job
(dir, overrides, status, error), rewritten as each job ends. ``status`` is ``ok``, ``failed``, or
``interrupted`` (a signal stopped the job: its failed.json says ``"interrupted": true``; resume it
with ``resume=true``); ``counts`` counts each. It is written per job and not only at
the end because Hydra skips ``on_multirun_end`` when a job failed (the basic sweeper re-raises the
first failure once every job of the batch has run). Jobs running in parallel (joblib launcher)
update it under a file lock. Light imports only: Hydra instantiates callbacks for every run.

``finished`` is set when the sweep's process ends, whichever way (an ``atexit`` hook registered at the
sweep's start: Hydra re-raises a failed job's error after the last job, and skips
``on_multirun_end``), with ``complete`` saying whether every job ended ok. Only a process killed
outright (SIGKILL) leaves ``finished: null``: the sweep did not finish.
"""
from __future__ import annotations

import atexit
import json
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from tisdpo.jsonio import write_json_atomic

SUMMARY = "sweep_summary.json"
STATUSES = ("ok", "failed", "interrupted")


def _is_multirun(config: DictConfig) -> bool:
    try:
        return config.hydra.mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def _update(sweep_dir: Path, change) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / SUMMARY
    with FileLock(str(path) + ".lock"):
        try:
            summary = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            summary = {}
        summary.setdefault("sweep_dir", str(sweep_dir))
        summary.setdefault("jobs", [])
        change(summary)
        jobs = summary["jobs"]
        summary["counts"] = {"jobs": len(jobs), **{status: sum(j["status"] == status for j in jobs) for status in STATUSES}}
        write_json_atomic(path, summary)


def _interrupted(job_dir: Path) -> bool:
    try:
        return json.loads((job_dir / "failed.json").read_text()).get("interrupted") is True
    except (OSError, ValueError, AttributeError):
        return False


def _finish(summary: dict) -> None:
    if summary.get("finished") is None:
        summary["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    counts = summary.get("counts") or {}
    summary["complete"] = bool(counts.get("jobs")) and counts.get("ok") == counts.get("jobs")


def mark_finished(sweep_dir: Path) -> None:
    """Set ``finished`` (and ``complete``) unless already set; never raises (called at exit)."""
    try:
        _update(Path(sweep_dir), _finish)
    except Exception:  # noqa: BLE001 - the process is ending; the summary is best effort
        pass


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        def start(summary: dict) -> None:
            summary["started"] = time.strftime("%Y-%m-%d %H:%M:%S")
            summary["finished"] = None

        sweep_dir = Path(config.hydra.sweep.dir)
        _update(sweep_dir, start)
        atexit.register(mark_finished, sweep_dir)  # also after a failed job (no on_multirun_end then)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not _is_multirun(config):
            return
        failed = job_return.status != JobStatus.COMPLETED
        error = getattr(job_return, "_return_value", None) if failed else None  # return_value would raise
        job_dir = Path(config.hydra.runtime.output_dir)
        entry = {
            "num": int(config.hydra.job.num),
            "dir": job_dir.name,
            "overrides": list(job_return.overrides or []),
            "status": ("interrupted" if _interrupted(job_dir) else "failed") if failed else "ok",
            "error": f"{type(error).__name__}: {error}" if error is not None else None,
            "failed_json": str(job_dir / "failed.json") if (job_dir / "failed.json").is_file() else None,
            "results_json": str(job_dir / "results.json") if (job_dir / "results.json").is_file() else None,
            "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

        def add(summary: dict) -> None:
            summary["jobs"] = sorted([j for j in summary["jobs"] if j.get("num") != entry["num"]] + [entry],
                                     key=lambda j: j["num"])

        _update(Path(config.hydra.sweep.dir), add)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # Reached only when every job succeeded (see the module docstring).
        _update(Path(config.hydra.sweep.dir), _finish)
