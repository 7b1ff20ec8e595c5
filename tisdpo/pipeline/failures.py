"""A failed job leaves ``failed.json`` in its run dir (what failed, where, the last good checkpoint).

``run.py`` calls :func:`run_recorded`; the exception is re-raised, so Hydra marks the job failed
and a sweep's other jobs still run (its basic launcher catches per job). Reports read the marker
(``experiments/collect.py``), and the sweep summary (``sweep_callbacks.py``) lists it.

A bad config in a single run is one line on stderr and exit status 2 (no traceback): it is the
user's typo, not a crash. In a sweep it is raised like any failure so the other jobs go on.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tisdpo.errors import UserError

log = logging.getLogger(__name__)

FAILED = "failed.json"


def failure_record(error: BaseException, output_dir: Path | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": type(error).__name__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "pid": os.getpid(),
    }
    if output_dir is not None:
        from tisdpo.pipeline.checkpoints import CHECKPOINT_DIR, find_checkpoint

        checkpoint = find_checkpoint(output_dir / CHECKPOINT_DIR)
        record["last_checkpoint"] = str(checkpoint) if checkpoint else None
    return record


def write_failure(output_dir: Path, error: BaseException) -> Path | None:
    """Write ``<output_dir>/failed.json`` atomically; never raises (the original error matters more)."""
    try:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / FAILED
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(failure_record(error, output_dir), indent=2))
        os.replace(tmp, path)
        return path
    except Exception as secondary:  # noqa: BLE001
        log.error("could not write %s: %s", Path(output_dir) / FAILED, secondary)
        return None


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra (tests, notebooks)
        return False


def run_recorded(cfg) -> dict[str, Any]:
    """``runner.run(cfg)``, with a failure recorded in the run dir before it propagates."""
    from tisdpo.pipeline.validate import ConfigError, validate_config

    try:
        validate_config(cfg)  # before the heavy imports: a typo answers in a second
        from tisdpo.pipeline.runner import run

        return run(cfg)
    except BaseException as error:
        if isinstance(error, SystemExit) and not error.code:
            raise
        # run() repoints paths.output_dir for resume=<run dir>: the marker goes where the run is.
        path = write_failure(Path(str(cfg.paths.output_dir)), error)
        log.error("job failed: %s: %s%s", type(error).__name__, error, f" (recorded in {path})" if path else "")
        if isinstance(error, UserError) and not _multirun():
            print(f"{'config' if isinstance(error, ConfigError) else 'data'} error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        raise
