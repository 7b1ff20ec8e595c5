"""Collect finished and failed runs from a Hydra multirun dir or a W&B project; group seeds.

A job dir is a directory holding ``.hydra/`` or ``results.json`` (or a failure marker). Its
``results.json`` is one flat JSON object of final metrics under their logged names plus the
composed config under ``config`` (a nested ``metrics`` object is merged too); non-numeric values
are ignored, except ``eval/curve`` (one dict per evaluation during training), kept as the run's
``curve``. Statuses:

- *ok*: ``results.json`` and no failure marker;
- *interrupted*: ``failed.json`` says ``"interrupted": true`` (SIGTERM, preemption, Ctrl-C): not a
  failure of the method; its ``signal`` and ``last_checkpoint`` are kept (``resume=true`` continues it);
- *failed*: a ``failed.json`` / ``error`` / ``error.txt`` marker (its text is the error) or no
  ``results.json`` at all (crashed, SIGKILLed or still running);
- *missing*: launched or planned but no job dir: listed in ``sweep_summary.json`` without its dir,
  or a point of the sweep's grid (``multirun.yaml``: ``hydra.sweeper.params`` and comma lists in
  ``hydra.overrides.task``) that no job dir has.

Method identity = the job's overrides minus ignorable keys (``seed``, ``hydra.*``, ...); its
label = ``config.label`` or ``config.experiment.label`` or results.json's ``method_label``,
else the overrides. ``wandb:<entity>/<project>[/<group>]`` reads runs through ``wandb.Api()``
instead (the only path that touches the network), filtered on the server by W&B group, paper table
(config ``paper_table``) and scale (config ``scale``) when given.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

DEFAULT_IGNORE = ("seed", "hydra.*", "paths.*", "cache.*", "logger", "logger.*", "resume", "trainer.devices",
                  "trainer.enable_progress_bar")
FAILURE_MARKERS = ("failed.json", "error", "error.txt")
SWEEP_SUMMARY = "sweep_summary.json"
CURVE_KEY = "eval/curve"
OPTIMAL_FRONTIER_KEY = "eval/optimal_frontier"   # the built-in task's exact best reward at each KL
_MISSING = object()
_TEMPERATURE_SUFFIX = re.compile(r"@T([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")


def canonical_metric_key(key: str) -> str:
    """``eval/win_rate@T1.0`` and ``eval/win_rate@T1`` name the same metric."""
    match = _TEMPERATURE_SUFFIX.search(key)
    if not match:
        return key
    return key[: match.start()] + f"@T{float(match.group(1)):g}"


def normalize_value(value: Any) -> str:
    if value is None:
        return "null"
    text = str(value).strip().lower()
    return "null" if text in ("none", "null", "~") else text


def same_value(a: Any, b: Any) -> bool:
    """Config values compared as numbers when both are numbers, else as lower-case text."""
    na, nb = normalize_value(a), normalize_value(b)
    try:
        return math.isclose(float(na), float(nb), rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return na == nb


@dataclass
class Run:
    """One job: its metrics, config, overrides and whether it finished."""

    run_id: str
    status: str                      # ok | failed | interrupted | running | missing
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    path: Path | None = None
    method_label: str | None = None  # results.json's own label, if any
    curve: list[dict[str, float]] = field(default_factory=list)   # eval/curve: one dict per evaluation
    optimal_frontier: list[dict[str, float]] = field(default_factory=list)   # eval/optimal_frontier: [{kl, true_reward}]
    signal: str | None = None        # interrupted: the signal that stopped it
    last_checkpoint: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def seed(self) -> Any:
        value = self.setting("seed")
        if value is _MISSING:
            return None
        try:
            return int(value)
        except (TypeError, ValueError):
            return value

    def setting(self, key: str) -> Any:
        """An override's value, else the config's at the dotted ``key`` (a group's ``name``)."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return _MISSING
        if isinstance(node, dict):
            return node.get("name", _MISSING)
        return node

    def has_setting(self, key: str, value: Any) -> bool:
        current = self.setting(key)
        return current is not _MISSING and same_value(current, value)

    def metric(self, keys: str | Sequence[str]) -> float | None:
        """The first of ``keys`` this run logged (temperature suffixes compared as numbers)."""
        for key in [keys] if isinstance(keys, str) else keys:
            value = self.metrics.get(canonical_metric_key(key))
            if value is not None:
                return value
        return None

    @property
    def label(self) -> str | None:
        for path in ("label", "experiment.label"):
            node: Any = self.config
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, str) and node and "${" not in node:
                return node
        return self.method_label

    @property
    def scale(self) -> str | None:
        if isinstance(self.overrides.get("scale"), str):
            return self.overrides["scale"]
        for path in (("scale",), ("experiment", "scale")):
            node: Any = self.config
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, str):
                return node
        return None


@dataclass
class Method:
    """Runs that differ only in ignorable settings (seeds)."""

    label: str
    identity: tuple[tuple[str, str], ...]
    runs: list[Run]

    def values(self, keys: str | Sequence[str], where: dict[str, Any] | None = None,
               scale: float = 1.0) -> list[float]:
        """Finite values of a metric over this method's runs that satisfy ``where``."""
        out = []
        for run in self.runs:
            if where and not all(run.has_setting(k, v) for k, v in where.items()):
                continue
            value = run.metric(keys)
            if value is not None and math.isfinite(value):
                out.append(value * scale)
        return out


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float   # sample std over seeds (ddof=1); nan when n == 1
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat | None":
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(statistics.fmean(values), std, len(values))


# ---------------------------------------------------------------- reading runs

def collect_runs(source: str | os.PathLike, group: str | None = None, table: str | None = None,
                 scale: str | None = None) -> list[Run]:
    """All runs under a multirun dir (plus *missing* ones, see the module docstring), or of a W&B
    project given as ``wandb:<entity>/<project>[/<group>]`` (``group``, ``table``, ``scale`` filter it)."""
    text = str(source)
    if text.startswith("wandb:"):
        return collect_wandb_runs(text[len("wandb:"):], group=group, table=table, scale=scale)
    root = Path(text).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"runs source {text!r} is neither a directory nor wandb:<entity>/<project>")
    runs = [read_job_dir(job, root) for job in find_job_dirs(root)]
    return runs + missing_runs(root, runs)


def is_job_dir(path: Path) -> bool:
    return ((path / ".hydra").is_dir() or (path / "results.json").is_file()
            or any((path / marker).is_file() for marker in FAILURE_MARKERS))


def find_job_dirs(root: Path) -> list[Path]:
    jobs = []
    for current, dirs, _files in os.walk(root):
        path = Path(current)
        if is_job_dir(path):
            jobs.append(path)
            dirs[:] = []          # a job's own subfolders (checkpoints, wandb, ...) are not jobs
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(jobs, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(path))]


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """Hydra override strings -> {key: value}; ``+``/``++`` dropped, ``~key`` -> '<deleted>'."""
    out: dict[str, str] = {}
    for raw in lines:
        line = str(raw).strip()
        if not line:
            continue
        if line.startswith("~"):
            out[line[1:].split("=", 1)[0]] = "<deleted>"
            continue
        key, _, value = line.lstrip("+").partition("=")
        out[key.strip()] = value.strip()
    return out


def read_job_dir(job: Path, root: Path) -> Run:
    run_id = str(job.relative_to(root)) if job != root else job.name
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(_load_yaml(overrides_file) or []) if overrides_file.is_file() else {}
    hydra_config = job / ".hydra" / "config.yaml"
    config = _load_yaml(hydra_config) if hydra_config.is_file() else {}
    run = Run(run_id=run_id, status="ok", config=config if isinstance(config, dict) else {},
              overrides=overrides, path=job)
    results_file = job / "results.json"
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text(encoding="utf-8"))
            if not isinstance(results, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            run.status, run.error = "failed", f"{results_file}: unreadable ({error})"
            return run
        if isinstance(results.get("config"), dict):
            run.config = results["config"]
        if isinstance(results.get("method_label"), str):
            run.method_label = results["method_label"]
        run.metrics = numeric_metrics(results)
        run.curve = parse_curve(results.get(CURVE_KEY))
        run.optimal_frontier = parse_curve(results.get(OPTIMAL_FRONTIER_KEY))
    for marker in FAILURE_MARKERS:
        if (job / marker).is_file():
            run.status, run.error = "failed", _marker_text(job / marker)
            record = _marker_json(job / marker)
            run.last_checkpoint = record.get("last_checkpoint") if isinstance(record.get("last_checkpoint"), str) else None
            if record.get("interrupted") is True:
                # killed from outside (preemption, SIGTERM, Ctrl-C): not the method's failure
                run.status = "interrupted"
                run.signal = str(record.get("signal") or "unknown signal")
                run.error = f"interrupted by {run.signal}"
            return run
    if not results_file.is_file():
        run.status = "failed"
        run.error = "no results.json (crashed, killed or still running)" + _log_tail(job)
    return run


def parse_curve(raw: Any) -> list[dict[str, float]]:
    """``eval/curve`` as a list of {key: finite float} (keys without their ``eval/`` prefix)."""
    if not isinstance(raw, list):
        return []
    curve = []
    for point in raw:
        if not isinstance(point, dict):
            continue
        clean = {str(k).removeprefix("eval/"): float(v) for k, v in point.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if clean:
            curve.append(clean)
    return curve


def numeric_metrics(results: dict[str, Any]) -> dict[str, float]:
    flat = {k: v for k, v in results.items() if k not in ("config", "metrics", "method_label")}
    if isinstance(results.get("metrics"), dict):
        flat.update(results["metrics"])
    return {canonical_metric_key(str(k)): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _load_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except yaml.YAMLError:
        return None


def _marker_json(path: Path) -> dict[str, Any]:
    if path.suffix != ".json":
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _marker_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            return text or path.name
        if isinstance(data, dict):
            parts = [str(data[k]) for k in ("exception", "type", "error", "message") if data.get(k)]
            if parts:
                return ": ".join(dict.fromkeys(parts))
        return json.dumps(data)
    return text or path.name


def _log_tail(job: Path) -> str:
    """The last line of the job's Hydra log that looks like an error, if any."""
    for log in sorted(job.glob("*.log")):
        lines = [l.strip() for l in log.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()]
        errors = [l for l in lines if re.search(r"(Error|Exception|Traceback)", l)]
        if errors:
            return f"; {log.name}: {errors[-1][:300]}"
    return ""


# ---------------------------------------------------------------- launched and planned jobs

def read_sweep_summary(root: Path) -> dict[str, Any]:
    """``<multirun dir>/sweep_summary.json`` (written by the sweep callback), or {}."""
    path = root / SWEEP_SUMMARY
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _split_sweep_values(value: Any) -> list[str] | None:
    """Hydra's basic sweeper values: ``a,b,c`` or ``range(start, stop[, step])``; None: unsupported."""
    text = str(value).strip()
    match = re.fullmatch(r"range\(\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)", text)
    if match:
        start, stop, step = int(match[1]), int(match[2]), int(match[3] or 1)
        return [str(v) for v in range(start, stop, step)] if step else None
    if any(ch in text for ch in "()[]{}'\""):
        return None   # choice(), glob(), lists, quoting: not expanded here
    return [v.strip() for v in text.split(",")]


def planned_jobs(root: Path) -> list[dict[str, str]]:
    """The sweep's grid from ``multirun.yaml`` (each job's overrides), or [] when it cannot be read."""
    path = root / "multirun.yaml"
    config = _load_yaml(path) if path.is_file() else None
    hydra = config.get("hydra") if isinstance(config, dict) else None
    if not isinstance(hydra, dict):
        return []
    params: dict[str, Any] = dict((hydra.get("sweeper") or {}).get("params") or {})
    task = (hydra.get("overrides") or {}).get("task") or []
    params.update(parse_overrides(task))   # the command line wins over the config's sweeper params
    axes = []
    for key, value in params.items():
        values = _split_sweep_values(value)
        if values is None:
            return []
        axes.append([(key.lstrip("+"), v) for v in values])
    if not axes or all(len(a) == 1 for a in axes):
        return []
    grid = [{}]
    for axis in axes:
        grid = [{**g, k: v} for g in grid for k, v in axis]
    return grid


def _same_overrides(a: dict[str, str], b: dict[str, str]) -> bool:
    return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)


def missing_runs(root: Path, runs: Sequence[Run]) -> list[Run]:
    """Jobs launched (sweep_summary.json) or planned (multirun.yaml) with no job dir here."""
    present_dirs = {r.path.name for r in runs if r.path is not None}
    present = [r.overrides for r in runs]
    missing = []
    for job in read_sweep_summary(root).get("jobs") or []:
        if not isinstance(job, dict) or str(job.get("dir")) in present_dirs:
            continue
        overrides = parse_overrides(job.get("overrides") or [])
        if any(_same_overrides(overrides, p) for p in present):
            continue
        missing.append(Run(run_id=str(job.get("dir") or f"job {job.get('num')}"), status="missing",
                           overrides=overrides, error=f"listed in {SWEEP_SUMMARY} ({job.get('status')}) but its "
                                                      "dir is gone" + (f": {job['error']}" if job.get("error") else "")))
        present.append(overrides)
    for overrides in planned_jobs(root):
        if any(_same_overrides(overrides, p) for p in present):
            continue
        name = " ".join(f"{k}={v}" for k, v in overrides.items())
        missing.append(Run(run_id=f"(not started) {name}", status="missing", overrides=overrides,
                           error="in the sweep's grid (multirun.yaml) but never started"))
        present.append(overrides)
    return missing


# ---------------------------------------------------------------- W&B

def parse_wandb_source(path: str) -> tuple[str, str | None]:
    """``entity/project[/group]`` -> ("entity/project", group or None)."""
    parts = path.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"wandb source must look like wandb:<entity>/<project>[/<group>], got wandb:{path}")
    return "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)


def wandb_filters(group: str | None = None, table: str | None = None, scale: str | None = None) -> dict[str, Any]:
    """The server-side run filter (W&B's MongoDB-style query): only this sweep's group, table, scale."""
    filters: dict[str, Any] = {}
    if group:
        filters["group"] = group
    if table:
        filters["config.paper_table"] = table
    if scale:
        filters["config.scale"] = scale
    return filters


HISTORY_KEYS = ("eval/kl_ref", "eval/true_reward", "eval/safe_rate")


def wandb_history_curve(wb_run: Any) -> list[dict[str, float]]:
    """The run's evaluations from its W&B history (rows that logged ``eval/kl_ref``), or []."""
    history = getattr(wb_run, "history", None)
    if not callable(history):
        return []
    try:
        rows = history(keys=list(HISTORY_KEYS), pandas=False)
    except Exception:  # noqa: BLE001 - a curve is optional; the final point is in the summary
        return []
    curve = []
    for row in rows or []:
        if isinstance(row, dict) and row.get("eval/kl_ref") is not None:
            curve.append({**{k: v for k, v in row.items() if not str(k).startswith("_")},
                          "step": row.get("_step", row.get("step"))})
    return parse_curve(curve)


def collect_wandb_runs(path: str, group: str | None = None, table: str | None = None,
                       scale: str | None = None) -> list[Run]:
    """Runs of a W&B project, filtered by group (from the path or ``group``), table and scale.

    The filter goes to the server (so a big project is not pulled run by run); it is applied again
    here, since a run's scale may also be set by an override.
    """
    project, path_group = parse_wandb_source(path)
    if group and path_group and group != path_group:
        raise ValueError(f"two W&B groups given: {path_group!r} (in the source) and {group!r}")
    group = group or path_group
    import wandb

    runs = []
    filters = wandb_filters(group, table, scale)
    for wb_run in wandb.Api().runs(project, filters=filters or None):
        if getattr(wb_run, "job_type", None) in ("sft", "estimator"):  # stage runs of a job, not jobs
            continue
        config = {k: v for k, v in dict(wb_run.config).items() if not str(k).startswith("_")}
        summary = getattr(wb_run.summary, "_json_dict", None)
        if summary is None:
            summary = dict(wb_run.summary)
        metrics = numeric_metrics({k: v for k, v in summary.items() if not str(k).startswith("_")})
        raw_overrides = config.get("overrides") or config.get("hydra_overrides") or []
        state = str(getattr(wb_run, "state", "finished"))
        status = {"finished": "ok", "running": "running"}.get(state, "failed")
        run = Run(run_id=f"{wb_run.id} ({wb_run.name})", status=status, metrics=metrics, config=config,
                  overrides=parse_overrides(raw_overrides) if isinstance(raw_overrides, list) else {},
                  error=None if status == "ok" else f"W&B state: {state}")
        run.curve = parse_curve(summary.get(CURVE_KEY)) or wandb_history_curve(wb_run)
        if group and getattr(wb_run, "group", group) != group:
            continue
        if table and run.setting("paper_table") is not _MISSING and not run.has_setting("paper_table", table):
            continue
        if scale and run.scale is not None and run.scale != scale and not run.has_setting("scale", scale):
            continue
        runs.append(run)
    return runs


# ---------------------------------------------------------------- grouping

def is_ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def method_identity(run: Run, ignore: Sequence[str]) -> tuple[tuple[str, str], ...]:
    kept = tuple(sorted((k, v) for k, v in run.overrides.items() if not is_ignored(k, ignore)))
    if kept:
        return kept
    return (("label", run.label or "default"),)


def group_methods(runs: Sequence[Run], ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Method]:
    """Finished runs grouped by identity, in order of first appearance, with unique labels."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(method_identity(run, ignore), []).append(run)
    methods = []
    for identity, members in groups.items():
        label = members[0].label or overrides_label(identity)
        methods.append(Method(label, identity, members))
    _disambiguate(methods)
    return methods


def overrides_label(identity: tuple[tuple[str, str], ...]) -> str:
    if identity and identity[0][0] == "label" and len(identity) == 1:
        return identity[0][1]
    return ", ".join(f"{k}={v}" for k, v in identity) or "default"


def _disambiguate(methods: list[Method]) -> None:
    by_label: dict[str, list[Method]] = {}
    for method in methods:
        by_label.setdefault(method.label, []).append(method)
    for label, same in by_label.items():
        if len(same) < 2:
            continue
        common = set.intersection(*(set(m.identity) for m in same))
        for method in same:
            extra = ", ".join(f"{k}={v}" for k, v in method.identity if (k, v) not in common)
            method.label = f"{label} [{extra}]" if extra else label
