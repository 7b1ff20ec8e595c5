"""Which code a run ran: the git commit of this checkout (and whether its tracked files differ from
it), the installed package version, and a hash of the working tree's sources (``tisdpo/**/*.py``
and ``conf/**/*.yaml``, comments aside): an edit that is not committed still changes it. Read once
per process; recorded in run_config.json (a resume under other code is refused unless allowed) and
in the W&B config."""
from __future__ import annotations

import importlib.metadata
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from tisdpo.hashing import source_tree_hash

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None  # not a checkout: an installed package


@lru_cache(maxsize=1)
def code_identity() -> dict[str, Any]:
    """{"git_commit": sha or None, "dirty": bool or None, "version": package version or None,
    "source_hash": hash of the working tree's code}."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    try:
        version = importlib.metadata.version("tisdpo")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"git_commit": commit, "dirty": bool(status) if status is not None else None, "version": version,
            "source_hash": source_tree_hash()}
