"""A failed job leaves ``failed.json`` in its run dir (what failed, where, the last good checkpoint).

``run.py`` calls :func:`run_recorded`; the exception is re-raised, so Hydra marks the job failed
and a sweep's other jobs still run (its basic launcher catches per job). Reports read the marker
(``experiments/collect.py``), and the sweep summary (``sweep_callbacks.py``) lists it.

A bad config in a single run is one line on stderr and exit status 2 (no traceback): it is the
user's typo, not a crash. In a sweep it is raised like any failure so the other jobs go on.

Signals (SIGTERM from SLURM / Kubernetes / ``timeout``, SIGINT from Ctrl+C, SIGUSR1 from SLURM's
requeue warning during training) end the job as *interrupted*: during a fit the step in progress
finishes and a checkpoint is taken (``callbacks.SignalCheckpoint``; Lightning's own SIGTERM
handler only sets ``trainer.received_sigterm``, which the callback reads too); elsewhere the
signal raises :class:`Interrupted` at once. ``failed.json`` then says ``"interrupted": true`` and
the signal; a single run exits with 128 + the signal number (143 for SIGTERM); in a sweep the job
is counted as interrupted and the other jobs still run.

A full disk must not hide why a job failed: a small reserve file is held in the run dir while the
job runs and freed before ``failed.json`` is written; if that still fails, the record goes to
``$TMPDIR/tisdpo-failed-<pid>.json`` and its path is printed on stderr.

One owner per run dir: the job claims its run dir first (``run_dir.claim_run_dir``: an OS file lock
plus an owner record); a second process on a live run's dir is refused in one line (exit status 2)
and writes nothing there. A crash in native code (an abort in a tokenizer, a segfault) cannot run
Python: ``faulthandler`` writes its traceback to ``<run dir>/.fatal.log``, and the next process to
claim the dir records that attempt's ``failed.json``. A Python ``MemoryError`` is recorded like any error.

Secrets never reach what a failure writes: ``failed.json``, the one-line stderr message, the
re-raised exception's message and every log record (run.log, stderr) are redacted
(``tisdpo.redaction``).

Light imports only: ``run.py`` imports this module once Hydra has composed the config, before the
config is checked, so a typo still answers in a second (the runner comes in as ``run_fn``).
"""
from __future__ import annotations

import contextlib
import errno
import faulthandler
import json
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from tisdpo.errors import UserError
from tisdpo.redaction import install_log_redaction, redact, redact_exception
from tisdpo.runtime.checkpoints import CHECKPOINT_DIR, find_checkpoint
from tisdpo.runtime.config_guard import check_config, check_run_dir, run_dir_of
from tisdpo.runtime.run_dir import FATAL_LOG, claim_run_dir, parse_resume
from tisdpo.runtime.validate import ConfigError, validate_config

log = logging.getLogger(__name__)

FAILED = "failed.json"
RESERVE = ".failure-reserve"
RESERVE_BYTES = 1 << 20  # room for failed.json and the last log lines on a full disk
# Handled for the whole job; SIGUSR1 only during fits (SignalCheckpoint): outside them it stays
# Lightning's SLURM auto-requeue signal, which Lightning registers only where no handler exists.
HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The job was stopped by a signal. A BaseException, like KeyboardInterrupt: ``except Exception``
    blocks (the cache's failed-build cleanup) must let it through, so a killed build resumes."""

    def __init__(self, signal_name: str, checkpoint: str | None = None):
        super().__init__(f"interrupted by {signal_name}" + (f" (checkpoint {checkpoint})" if checkpoint else ""))
        self.signal_name = signal_name
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.Signals[self.signal_name])


class JobInterrupted(RuntimeError):
    """What a sweep job raises for :class:`Interrupted`: Hydra catches only ``Exception`` per job."""


# ---------------------------------------------------------------------------------------
# signals: deferred to the end of the step during a fit, raised at once elsewhere
# ---------------------------------------------------------------------------------------
_SIGNALS: dict[str, Any] = {"fits": 0, "pending": None}


def pending_signal() -> str | None:
    """The signal received during the current fit and not yet acted on, if any."""
    return _SIGNALS["pending"]


def fit_running(active: bool) -> None:
    """SignalCheckpoint says a fit started/ended: signals wait for the step to end meanwhile. A
    signal still marked pending when a fit starts is stale (one that arrived outside a fit stopped
    that job at once): it must not stop this one."""
    if active:
        _SIGNALS["pending"] = None
    _SIGNALS["fits"] = max(0, _SIGNALS["fits"] + (1 if active else -1))


def on_signal(signum: int, frame=None) -> None:
    name = signal.Signals(signum).name
    if _SIGNALS["fits"] and _SIGNALS["pending"] is None:
        _SIGNALS["pending"] = name
        log.warning("received %s: finishing the current step, saving a checkpoint, then stopping", name)
        return
    _SIGNALS["pending"] = _SIGNALS["pending"] or name
    raise Interrupted(name)  # outside a fit, or a second signal: stop now


@contextlib.contextmanager
def handled_signals() -> Iterator[None]:
    """Our handlers for SIGTERM and SIGINT while the job runs; the previous ones restored after."""
    _SIGNALS.update(fits=0, pending=None)
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread (a joblib worker thread): signals stay as they are
        for signum in HANDLED:
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _SIGNALS.update(fits=0, pending=None)  # nothing of this job's signals reaches the next one


def interruption(error: BaseException) -> str | None:
    """The signal that ended the job, if a signal did: Interrupted, or what Lightning raises after
    its own SIGTERM handler (SIGTERMException, a SystemExit) or Ctrl+C (KeyboardInterrupt)."""
    if isinstance(error, Interrupted):
        return error.signal_name
    if isinstance(error, (SystemExit, KeyboardInterrupt)):
        return _SIGNALS["pending"] or ("SIGINT" if isinstance(error, KeyboardInterrupt) else None)
    return None


# ---------------------------------------------------------------------------------------
# failed.json, also on a full disk
# ---------------------------------------------------------------------------------------
def failure_record(error: BaseException, output_dir: Path | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": type(error).__name__,
        "message": redact(str(error)),
        "traceback": redact("".join(traceback.format_exception(type(error), error, error.__traceback__))),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "pid": os.getpid(),
    }
    name = interruption(error)
    if name is not None:
        record.update(type="Interrupted", message=f"interrupted by {name}", interrupted=True, signal=name,
                      exit_status=128 + int(signal.Signals[name]))
        record["checkpoint_on_signal"] = getattr(error, "checkpoint", None)
    if output_dir is not None:
        # size and zip only (no sha256 of gigabytes while the job is being stopped)
        checkpoint = find_checkpoint(output_dir / CHECKPOINT_DIR, content=False)
        record["last_checkpoint"] = str(checkpoint) if checkpoint else None
    return record


def _write_atomic(path: Path, text: str) -> None:
    """Write then rename; a failed write removes its temporary file (no empty .tmp left behind)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fallback_failure_path() -> Path:
    return Path(tempfile.gettempdir()) / f"tisdpo-failed-{os.getpid()}.json"


def write_failure(output_dir: Path, error: BaseException) -> Path | None:
    """Write ``<output_dir>/failed.json`` atomically, else the fallback path (said on stderr);
    never raises (the original error matters more)."""
    output_dir = Path(output_dir)
    release_reserve(output_dir)  # a full disk: the reserve's megabyte is what lets the record in
    try:
        text = json.dumps(failure_record(error, output_dir), indent=2, default=str)
    except Exception as secondary:  # noqa: BLE001
        text = json.dumps({"type": type(error).__name__, "message": redact(str(error)), "record_error": str(secondary)})
    problem: BaseException | None = None
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(output_dir / FAILED, text)
        return output_dir / FAILED
    except OSError as secondary:
        problem = secondary
    fallback = fallback_failure_path()
    try:
        _write_atomic(fallback, text)
    except OSError as secondary:
        print(f"tisdpo: could not write {output_dir / FAILED} ({problem}) nor {fallback} ({secondary})", file=sys.stderr)
        return None
    print(f"tisdpo: could not write {output_dir / FAILED} ({problem}); the failure is recorded in {fallback}",
          file=sys.stderr)
    log.error("could not write %s (%s); recorded in %s", output_dir / FAILED, problem, fallback)
    return fallback


def hold_reserve(output_dir: Path) -> None:
    """Claim RESERVE_BYTES in the run dir now, while there is room (best effort)."""
    path = Path(output_dir) / RESERVE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)
            else:
                handle.write(b"\0" * RESERVE_BYTES)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EOPNOTSUPP, errno.EINVAL):
            log.debug("no failure reserve in %s: %s", output_dir, error)
        with contextlib.suppress(OSError):
            path.unlink()


def release_reserve(output_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (Path(output_dir) / RESERVE).unlink()


# ---------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------
def _multirun() -> bool:
    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra (tests, notebooks)
        return False


def run_recorded(cfg, run_fn: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``run_fn(cfg)`` (the runner), with a failure recorded in the run dir before it propagates.
    The run dir is claimed first: a dir that cannot be used, or that a live process owns, is refused
    in one line without writing anything there."""
    install_log_redaction()
    try:
        check_run_dir(cfg)
        owner = claim_run_dir(run_dir_of(cfg), create=parse_resume(cfg.get("resume")).run_dir is None)
    except UserError as error:
        return _refused(error)
    start_dir = Path(str(cfg.paths.output_dir))
    with owner, _fatal_log(owner.run_dir if owner.owns else None):
        hold_reserve(start_dir)
        with handled_signals():
            try:
                validate_config(cfg)  # before the heavy imports: a typo answers in a second
                check_config(cfg)     # +keys nothing reads, certain overflows
                return run_fn(cfg)
            except BaseException as error:
                return _recorded_failure(cfg, error)
            finally:
                release_reserve(start_dir)


def _refused(error: UserError):
    """A run dir that cannot be used: one line, exit status 2, no failed.json (the dir is not ours)."""
    message = redact(str(error))
    log.error("job refused: %s", message)
    if _multirun():
        raise error
    print(f"config error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


@contextlib.contextmanager
def _fatal_log(run_dir: Path | None) -> Iterator[None]:
    """faulthandler's traceback of a native crash (abort, segfault) into ``<run dir>/.fatal.log``;
    the file is removed when the job ends in Python (it is then empty). None: not this rank's dir."""
    if run_dir is None:
        yield
        return
    path = Path(run_dir) / FATAL_LOG
    try:
        handle = open(path, "w", encoding="utf-8")
    except OSError:
        yield
        return
    previous = faulthandler.is_enabled()
    faulthandler.enable(file=handle, all_threads=True)
    try:
        yield
    finally:
        faulthandler.disable()
        if previous:
            faulthandler.enable()
        handle.close()
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()


def _close_wandb_run(exit_code: int) -> None:
    """Mark this job's W&B run failed now (else it stays 'running' until the next job or exit).
    Only when this process already uses W&B: failures.py never imports it."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        try:
            run.finish(exit_code=exit_code)
        except Exception as secondary:  # noqa: BLE001 - the original error matters more
            log.warning("could not close the W&B run: %s", secondary)


def _recorded_failure(cfg, error: BaseException):
    signal_name = interruption(error)
    if isinstance(error, SystemExit) and not error.code and signal_name is None:
        raise error
    _close_wandb_run(128 + int(signal.Signals[signal_name]) if signal_name else 1)
    release_reserve(Path(str(cfg.paths.output_dir)))
    # run() repoints paths.output_dir for resume=<run dir>: the marker goes where the run is.
    path = write_failure(Path(str(cfg.paths.output_dir)), error)
    where = f" (recorded in {path})" if path else ""
    if signal_name is not None:
        code = 128 + int(signal.Signals[signal_name])
        log.error("job interrupted by %s%s; exit status %d; resume=true (or resume=<run dir>) continues it",
                  signal_name, where, code)
        if _multirun():
            raise JobInterrupted(f"interrupted by {signal_name}") from error
        raise SystemExit(code) from None
    redact_exception(error)  # its message as Hydra prints it, and as W&B or a sweep summary records it
    log.error("job failed: %s: %s%s", type(error).__name__, error, where)
    if isinstance(error, UserError) and not _multirun():
        print(f"{'config' if isinstance(error, ConfigError) else 'data'} error: {redact(str(error))}", file=sys.stderr)
        raise SystemExit(2) from None
    raise error
