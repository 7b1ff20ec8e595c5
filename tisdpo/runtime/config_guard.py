"""Config checks that no single option's range covers: keys added with ``+`` that nothing reads, numbers
whose overflow is certain, and run dirs that cannot work (unwritable, or inside the artifact cache).

Each raises :class:`ConfigError` (one line, exit status 2). Torch-free: ``run.py`` calls
:func:`command_line_problem` before Hydra composes (Hydra would answer an unwritable run dir with a
traceback), and ``failures.run_recorded`` calls :func:`check_run_dir` before it claims the run dir
and :func:`check_config` right after ``validate_config``.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from tisdpo.runtime.run_dir import parse_resume
from tisdpo.runtime.validate import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Nodes whose keys are handed on to a library as keyword arguments: a new key there is the library's option.
PASS_THROUGH = ("hydra", "trainer", "logger", "model.config")
FLOAT32_MAX = 3.4028234663852886e38
# The smallest margin (in nats) at which beta * margin is certain to be reached during training.
MARGIN_NATS = 1.0
_ASSIGNMENT = re.compile(r"^\+(?!\+)([\w.]+)=")


# ---------------------------------------------------------------------------------------
# keys added with +
# ---------------------------------------------------------------------------------------
def added_keys(overrides: Iterable[str]) -> list[str]:
    """The dotted keys of ``+key=value`` overrides (not ``++``, not group additions like ``+experiment=x``)."""
    keys = []
    for override in overrides:
        match = _ASSIGNMENT.match(str(override).strip())
        if match and not ("." not in match.group(1) and (CONF_DIR / match.group(1)).is_dir()):
            keys.append(match.group(1))
    return keys


def _passes_through(path: str, node: Any) -> bool:
    """Keys below ``path`` are a library's keyword arguments: the PASS_THROUGH nodes, and objects built
    from a ``_target_`` inside a group (an optimizer, a judge). A group itself (``loss``) is the
    project's, even with a ``_target_``: the project reads its keys."""
    return (any(path == p or path.startswith(p + ".") for p in PASS_THROUGH)
            or ("." in path and isinstance(node, DictConfig) and "_target_" in node))


def _group_keys(group: str) -> set[str]:
    """Top-level keys of every option of a config group (``conf/<group>/*.yaml``): a key another
    option defines is a known key of the group."""
    keys: set[str] = set()
    for path in (CONF_DIR / group).glob("*.yaml"):
        try:
            tree = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(tree, dict):
            keys |= {str(k) for k in tree if k != "defaults"}
    return keys


def unknown_key_problem(base: DictConfig, key: str) -> str | None:
    """Why ``+key`` adds nothing the project reads, given the config composed without it; None when
    its parent node exists and hands its keys on (trainer, logger, a ``_target_``), or it is known."""
    parts = key.split(".")
    node: Any = base
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth])
        if depth and _passes_through(path, node):
            return None
        if not isinstance(node, DictConfig):
            return None  # below a value or a list: Hydra's own checks answer
        if part in node:
            node = node[part]
            continue
        if depth == 0 and part in PASS_THROUGH:
            return None
        known = sorted({str(k) for k in node.keys()} | (_group_keys(parts[0]) if depth == 1 else set()))
        if part in known:
            return None  # another option of the group defines it
        where = f"{path}" if path else "the config"
        return (f"+{key}: {where} has no key {part!r}, and nothing would read it; known keys: "
                f"{', '.join(k for k in known if not k.startswith('_'))}")
    return None


def _composed_without(overrides: list[str]) -> DictConfig | None:
    """The config this job would have without its ``+key`` overrides (None outside a Hydra app)."""
    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return None
    kept = [o for o in overrides if not _ASSIGNMENT.match(o.strip())]
    return compose(config_name=HydraConfig.get().job.config_name, overrides=kept)


def check_added_keys(cfg: DictConfig) -> None:
    """``+train.foo=1`` is refused, listing the known keys (it would be accepted and ignored)."""
    if not HydraConfig.initialized():
        return
    overrides = [str(o) for o in HydraConfig.get().overrides.task]
    keys = added_keys(overrides)
    if not keys:
        return
    base = _composed_without(overrides)
    if base is None:
        return
    for key in keys:
        problem = unknown_key_problem(base, key)
        if problem:
            raise ConfigError(problem)


# ---------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------
def _numbers(node: Any, prefix: str) -> Iterable[tuple[str, float]]:
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _numbers(node.get(key), f"{prefix}.{key}")
    elif isinstance(node, ListConfig):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{prefix}.{i}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, float(node)


def check_numeric_bounds(cfg: DictConfig) -> None:
    """Every number of the loss is finite, and ``loss.beta`` times a one-nat margin fits a float32
    (the loss's dtype): beyond it the first log-sigmoid overflows, a NaN stops the run."""
    loss = cfg.get("loss")
    if not isinstance(loss, DictConfig):
        return
    for option, value in _numbers(loss, "loss"):
        if not math.isfinite(value):
            raise ConfigError(f"{option}={value}: must be a finite number")
    beta = loss.get("beta")
    if isinstance(beta, (int, float)) and not isinstance(beta, bool) and abs(beta) * MARGIN_NATS > FLOAT32_MAX:
        raise ConfigError(f"loss.beta={beta:g}: beta * margin overflows float32 (max {FLOAT32_MAX:.3g}) as soon as "
                          f"the log-ratio margin reaches {MARGIN_NATS:g} nat; use a beta below {FLOAT32_MAX / MARGIN_NATS:.3g} "
                          "(the papers use 0.01 to 1)")


def check_config(cfg: DictConfig) -> None:
    """The checks of this module that need the composed config."""
    check_added_keys(cfg)
    check_numeric_bounds(cfg)


# ---------------------------------------------------------------------------------------
# run dirs
# ---------------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: Path) -> str | None:
    """Why a directory cannot be created or written at ``path``, or None."""
    path = Path(path).expanduser()
    existing = _existing_ancestor(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable" + ("" if existing == path.absolute() else f" (to create {path})")
    return None


def inside(path: Path, folder: Path) -> bool:
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents


def run_dir_of(cfg: DictConfig) -> Path:
    """The dir this job writes to: ``resume=<dir>``'s, else ``paths.output_dir``."""
    return parse_resume(cfg.get("resume")).run_dir or Path(str(cfg.paths.output_dir))


def check_run_dir(cfg: DictConfig) -> None:
    """The run dir is writable and outside ``cache.dir`` (whose cleanup would delete it, and whose
    stage dirs it could shadow)."""
    run_dir = run_dir_of(cfg)
    cache = (cfg.get("cache") or {}).get("dir")
    if cache and inside(run_dir, Path(str(cache))):
        raise ConfigError(f"run dir {run_dir} is inside cache.dir={cache}: choose a run dir (hydra.run.dir) outside "
                          "the artifact cache")
    problem = writable_problem(run_dir)
    if problem:
        raise ConfigError(f"run dir {run_dir}: {problem}; choose another hydra.run.dir (or paths.root_dir)")


def command_line_problem(args: Iterable[str], cwd: Path | None = None) -> str | None:
    """Before Hydra composes: a run/sweep dir named on the command line (or the default under the
    working dir) that cannot be written, as one line; None when there is none. Hydra itself would
    answer it with a traceback."""
    given = {}
    for arg in args:
        key, sep, value = str(arg).lstrip("+").partition("=")
        if sep and key in ("hydra.run.dir", "hydra.sweep.dir", "paths.root_dir", "paths.log_dir") and value:
            given[key] = value
    if not given:
        given = {"the working dir (default paths.root_dir)": str(cwd or Path.cwd())}
    for key, value in given.items():
        if "${" in value:
            continue  # an interpolation: checked in the job
        problem = writable_problem(Path(value))
        if problem:
            return f"{key}={value}: {problem}; choose a writable directory"
    return None
