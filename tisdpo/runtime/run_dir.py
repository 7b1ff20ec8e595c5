"""Run dirs and the ``resume`` option: which dir a job writes to, and whether it may continue it.

``resume=true`` continues the checkpoint of the current run dir (Hydra makes a new dir per run, so
pair it with ``hydra.run.dir=<previous run dir>`` or re-run the same sweep dir); ``resume=<run dir>``
continues that run in place: outputs and new checkpoints go to that dir; ``resume=<file.ckpt>``
continues from exactly that checkpoint. Either way the composed config must match the one the run
started with (``run_config.json``), apart from keys that cannot change the trained weights.

``run_config.json`` also records, under ``_identity``, what the config does not say: the data
content (hashes of the train, test and SFT rows, recorded once the data is loaded) and the code
(git commit, package version, and a hash of the working tree's sources: an uncommitted edit counts).
A resume on different data is refused in one line; so is a resume under different code, unless
``resume_allow_code_change=true``, which continues and appends the change to
``_identity.code_changes`` (a bug fix between the kill and the resume can be deliberate; it is then
on record). The checkpoint a resume continues must be this run's own: one whose sidecar names another
loss, config or data (``checkpoints.identity_problem``) is refused before anything is written. A
finished run returns its stored results only for the config it finished with (``results.json`` holds
it). A fresh start (no resume) in a dir that holds an earlier attempt moves its ``results.json`` and
``checkpoints/`` aside, so a later resume cannot pick them up.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import BaseFileLock, FileLock, SoftFileLock, Timeout

from tisdpo.hashing import stable_hash
from tisdpo.jsonio import write_json_atomic
from tisdpo.provenance import code_identity
from tisdpo.runtime.cache import launch_rank, set_code_policy
from tisdpo.runtime.checkpoints import (CHECKPOINT_DIR, IDENTITY, IDENTITY_IGNORED, RUN_CONFIG, checkpoint_problem,
                                        find_checkpoint, flatten, identity_ignored, identity_problem)
from tisdpo.runtime.validate import ConfigError

log = logging.getLogger(__name__)

# Config keys that may differ between a run and its resumption: they cannot change the weights.
RESUME_IGNORED = IDENTITY_IGNORED
# The code identity a resume compares (not the dirty flag: source_hash says what the tree holds).
CODE_KEYS = ("git_commit", "version", "source_hash")
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


def config_differences(before: dict, now: dict) -> list[str]:
    a, b = flatten(before), flatten(now)
    keys = sorted(k for k in set(a) | set(b) if not identity_ignored(k) and a.get(k, "<absent>") != b.get(k, "<absent>"))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys]


def _one_line(differences: list[str]) -> str:
    return "; ".join(differences[:8]) + (f"; ... ({len(differences)} in all)" if len(differences) > 8 else "")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def current_code() -> dict[str, Any]:
    identity = code_identity()
    return {k: identity.get(k) for k in CODE_KEYS}


def code_differences(recorded: dict | None) -> list[str]:
    """How the code now differs from ``recorded`` (run_config.json's ``_identity.code``); keys the
    record lacks (a run from before source hashes) are not compared."""
    if not recorded:
        return []
    now = current_code()
    return [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in CODE_KEYS
            if k in recorded and recorded.get(k) != now.get(k)]


def check_code_identity(cfg, output_dir: Path, recorded: dict | None) -> None:
    """A resume under other code (another commit, version, or an edited working tree) is refused;
    ``resume_allow_code_change=true`` continues and records the change in run_config.json."""
    differences = code_differences(recorded)
    if not differences:
        return
    message = f"resume: the code differs from the code {output_dir} started with ({_one_line(differences)})"
    if not cfg.get("resume_allow_code_change"):
        raise ConfigError(f"{message}; restore that code, or pass resume_allow_code_change=true to continue under "
                          "this code (it is recorded in run_config.json)")
    log.warning("%s; continuing: resume_allow_code_change=true (recorded in %s)", message, RUN_CONFIG)
    record_code_change(output_dir, recorded)


def record_code_change(output_dir: Path, recorded: dict | None) -> None:
    """Append this resume's code to ``_identity.code_changes`` in run_config.json."""
    if _other_rank():
        return
    path = Path(output_dir) / RUN_CONFIG
    stored = _read_json(path) or {}
    identity = dict(stored.get(IDENTITY) or {})
    identity["code_changes"] = [*identity.get("code_changes", []),
                                {"from": recorded, "to": current_code(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}]
    write_json_atomic(path, {**stored, IDENTITY: identity})


def check_run_config(output_dir: Path, config_dict: dict, resuming: bool, cfg=None) -> None:
    """Record the run's config and code identity (first start), or check a resumption's config
    against them (the code is checked by :func:`begin_run`, once it knows the run is unfinished)."""
    path = output_dir / RUN_CONFIG
    if path.is_file() and resuming:
        before = json.loads(path.read_text())
        differences = config_differences(before, json.loads(json.dumps(config_dict, default=str)))
        if differences:
            raise ConfigError(
                f"resume: the config differs from the one {output_dir} started with ({_one_line(differences)}); pass "
                f"the same overrides (see {output_dir / '.hydra' / 'overrides.yaml'}) or start a new run"
            )
        return
    write_json_atomic(path, {**config_dict, IDENTITY: {"code": current_code()}})


def recorded_code(output_dir: Path) -> dict | None:
    return ((_read_json(Path(output_dir) / RUN_CONFIG) or {}).get(IDENTITY) or {}).get("code")


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
    had already finished with this config (a re-launched sweep skips its finished jobs), else None.
    A resume that would continue under other code, or from another run's checkpoint, is refused
    here, before anything of this attempt is written."""
    set_code_policy(bool((cfg.get("cache") or {}).get("reuse_across_code")))
    resuming = parse_resume(cfg.get("resume")).requested
    if not resuming:
        archive_previous_attempt(output_dir)
    check_run_config(output_dir, config_dict, resuming, cfg)
    if not resuming:
        return None
    finished = finished_results(output_dir, config_dict)
    if finished is not None:
        differences = code_differences(recorded_code(output_dir))
        if differences:  # nothing is continued: the stored results stand, computed by the recorded code
            log.warning("resume: %s finished under other code (%s); its results are returned as they are",
                        output_dir, _one_line(differences))
        return finished
    check_code_identity(cfg, output_dir, recorded_code(output_dir))
    resume_checkpoint(cfg, output_dir)  # another run's checkpoint: refused now
    archive_previous_failure(output_dir)
    return None


def finished_results(output_dir: Path, config_dict: dict) -> dict | None:
    """The results of a run dir that finished with this config; None when it has not finished."""
    results_file = output_dir / "results.json"
    if not results_file.is_file():
        return None
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


def check_checkpoint_identity(checkpoint: Path, output_dir: Path) -> None:
    """Refuse (one line) a checkpoint another run wrote (another loss, config or data)."""
    problem = identity_problem(checkpoint, output_dir)
    if problem is not None:
        raise ConfigError(f"resume: the checkpoint {checkpoint} {problem}; remove it from {output_dir / CHECKPOINT_DIR} "
                          "or start a new run")


def resume_checkpoint(cfg, output_dir: Path) -> Path | None:
    """The checkpoint a resume will continue (as :func:`train_checkpoint` picks it), checked to be
    this run's own; None when there is none."""
    resume = parse_resume(cfg.get("resume"))
    if resume.checkpoint is not None and resume.checkpoint.exists():
        found: Path | None = resume.checkpoint
    else:
        found = find_checkpoint(output_dir / CHECKPOINT_DIR, content=False)
    if found is not None:
        check_checkpoint_identity(found, output_dir)
    return found


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
        check_checkpoint_identity(resume.checkpoint, output_dir)
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
    check_checkpoint_identity(found, output_dir)
    log.info("resuming training from %s", found)
    return str(found)


# ---------------------------------------------------------------------------------------
# one owner per run dir
# ---------------------------------------------------------------------------------------
LOCK = ".tisdpo.lock"
OWNER = ".tisdpo-owner.json"


class RunDirBusy(ConfigError):
    """Another live process owns the run dir: one line, exit status 2, nothing written there."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunDirLock:
    """An exclusive lock on a run dir for the life of the job: ``<dir>/.tisdpo.lock`` (an OS file lock,
    released by the kernel when its process dies, however it dies) and ``<dir>/.tisdpo-owner.json``
    naming the owner (pid, host, start time) for the message a second process gets. Where the file
    system has no ``flock`` (some NFS mounts) a soft lock file is used instead; one whose owner is a
    dead pid on this host is stale and taken over.

    An owner record left behind (the previous owner died without releasing: SIGKILL, the OOM killer, a
    crash in native code) is reported, and recorded as that attempt's ``failed.json`` when it left none.
    """

    owns = True  # this process writes the dir's owner record and fatal log

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock: BaseFileLock | None = None

    def acquire(self) -> "RunDirLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = FileLock(str(self.run_dir / LOCK), timeout=0)
            self._lock.acquire()
        except NotImplementedError:  # no flock on this file system
            self._lock = self._soft_lock()
        except Timeout:
            raise RunDirBusy(self._busy_message()) from None
        self._note_previous_owner()
        write_json_atomic(self.run_dir / OWNER, {"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv})
        return self

    def _soft_lock(self) -> BaseFileLock:
        lock = SoftFileLock(str(self.run_dir / LOCK) + ".soft", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            owner = _read_json(self.run_dir / OWNER) or {}
            if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
                    and not _pid_alive(owner["pid"]):
                log.warning("run dir %s: the lock of pid %s (dead) is stale: taken over", self.run_dir, owner["pid"])
                Path(lock.lock_file).unlink(missing_ok=True)
                lock.acquire()
            else:
                raise RunDirBusy(self._busy_message()) from None
        return lock

    def _busy_message(self) -> str:
        owner = _read_json(self.run_dir / OWNER) or {}
        who = f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('started')}" if owner else "another process"
        return (f"run dir {self.run_dir} is in use by another process ({who}): wait for it to end, or choose "
                "another hydra.run.dir")

    def _note_previous_owner(self) -> None:
        """An owner record still here: its process ended without releasing the dir (killed, or crashed)."""
        owner = _read_json(self.run_dir / OWNER)
        if owner is None or _other_rank():
            return
        log.warning("run dir %s: the previous process (pid %s on %s, started %s) ended without recording how "
                    "(SIGKILL, out of memory, or a crash in native code)", self.run_dir, owner.get("pid"),
                    owner.get("host"), owner.get("started"))
        if not (self.run_dir / "failed.json").exists() and not (self.run_dir / "results.json").exists():
            fatal = self.run_dir / FATAL_LOG
            write_json_atomic(self.run_dir / "failed.json", {
                "type": "Died", "message": "the process ended without recording why: killed (SIGKILL, out of "
                "memory) or a crash in native code" + (f"; see {FATAL_LOG}" if fatal.is_file() and fatal.stat().st_size
                                                       else ""),
                "pid": owner.get("pid"), "host": owner.get("host"), "started": owner.get("started"),
                "recorded_by": os.getpid(), "last_checkpoint": None})

    def release(self) -> None:
        if self._lock is None:
            return
        (self.run_dir / OWNER).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


FATAL_LOG = ".fatal.log"  # faulthandler's traceback of a crash in native code (failures.py)


class _NoLock(RunDirLock):
    """A rank other than 0 of a multi-process run: rank 0 owns the dir."""

    owns = False

    def acquire(self) -> "RunDirLock":
        return self


def claim_run_dir(run_dir: Path, create: bool = True) -> RunDirLock:
    """Own ``run_dir`` for this job, or raise :class:`RunDirBusy` (one line) if a live process does.
    Ranks other than 0 (Lightning re-runs the script for them) share rank 0's claim. ``create=False``
    (a ``resume=<dir>`` target): a dir that does not exist is not created; validation refuses it."""
    if launch_rank() != 0 or _other_rank() or (not create and not Path(run_dir).is_dir()):
        return _NoLock(run_dir).acquire()
    return RunDirLock(run_dir).acquire()
