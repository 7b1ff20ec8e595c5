"""Experiment loggers from the `logger` config group: W&B is where runs are compared.

Every W&B run of a job carries the same identity: a group per sweep (or per single run), a
``job_type`` naming the stage (``sft``, ``estimator``, ``train``, ``eval``), tags (method label,
loss, estimator, dataset, scale, seed), and in its config the Hydra overrides and the code
version. SFT and estimator-model training log as their own runs in that group
(:func:`stage_logger`); the training run ends with its files as artifacts and its samples and
token weights as tables (:func:`finish_logging`). ``<run dir>/wandb_run.json`` names the W&B run
of a run dir, so ``resume`` and the eval-only command (:func:`open_run_logger`) continue it; the
same file in a cached artifact names the run that built it.

Offline unless the user asks for online (``logger.offline=false`` or ``WANDB_MODE=online``): an API
key in the environment is not a request to go online (a cluster node with a key and no outbound
access would wait on the network and fail). ``WANDB_MODE=offline`` wins over everything, the config
included; ``WANDB_MODE=disabled`` makes every W&B logger ``False`` (no files). Secrets (API keys,
tokens, Authorization headers) are redacted from the config W&B records (``redaction.redact_config``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from tisdpo.jsonio import write_json_atomic
from tisdpo.redaction import redact_config
from tisdpo.runtime.run_dir import RUN_CONFIG, parse_resume
from tisdpo.provenance import code_identity

log = logging.getLogger(__name__)

# "<dir>/wandb_run.json": the W&B run(s) that wrote a run dir or built a cached artifact.
RUN_RECORD = "wandb_run.json"
# Options of the `logger` group read here, not passed on to the logger class.
OWN_OPTIONS = ("upload_model", "table_rows", "weights_table_rows", "offline", "job_type")
GROUP_MAX = 128  # W&B's limit on a group name
TAG_MAX = 64     # W&B's limit on a tag
# Token-weight files of a run dir (tisdpo/weights/views.py), logged as one `weights` artifact.
WEIGHT_FILES = ("token_weights.html", "weights_hist.png", "weights.npz")
_DATE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# ---------------------------------------------------------------- mode


def wandb_disabled() -> bool:
    """``WANDB_MODE=disabled`` (or ``WANDB_DISABLED=true``): no W&B logger at all, so no files."""
    return (os.environ.get("WANDB_MODE", "").strip().lower() == "disabled"
            or os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"))


def wandb_offline_by_default(requested: bool | None) -> bool:
    """Offline unless the user asked for online: ``WANDB_MODE=offline`` (or ``dryrun``) always wins;
    else ``logger.offline`` (``requested``) when set; else online only for ``WANDB_MODE=online``.
    A ``WANDB_API_KEY`` alone never turns a run online."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "dryrun"):
        return True
    if requested is not None:
        return bool(requested)
    return mode not in ("online", "run")


def _is_wandb(node: DictConfig) -> bool:
    return str(node.get("_target_") or "").endswith("WandbLogger")


def _close_leftover_run() -> None:
    """A job that failed in a sweep's process leaves its W&B run open, and Lightning's WandbLogger
    would silently log the next job into it: close it (marked failed) first."""
    import wandb

    if wandb.run is not None:
        log.warning("closing W&B run %s, left open by an earlier job in this process", wandb.run.id)
        wandb.run.finish(exit_code=1)


# ---------------------------------------------------------------- identity


def code_version() -> dict[str, Any]:
    """The git commit and whether the tree was dirty; outside a checkout, the package version."""
    identity = code_identity()
    if identity["git_commit"]:
        return {"commit": identity["git_commit"], "dirty": bool(identity["dirty"])}
    return {"package": identity["version"] or "unknown"}


def hydra_overrides() -> list[str]:
    """The job's task overrides (``.hydra/overrides.yaml``), or [] outside a Hydra app."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _experiment_name(cfg: DictConfig) -> str:
    if HydraConfig.initialized():
        chosen = HydraConfig.get().runtime.choices.get("experiment")
        if chosen not in (None, "null", "None"):
            return str(chosen)
    return str(cfg.get("paper_table") or "adhoc")


def _dir_stamp(path: Path) -> str:
    """A dir's name, with its date folder when Hydra's default layout put it in one
    (``.../2025-01-31/12-00-00`` -> ``2025-01-31_12-00-00``)."""
    path = Path(path)
    if _DATE_DIR.match(path.parent.name):
        return f"{path.parent.name}_{path.name}"
    return path.name


def _recorded_run(run_dir: Path) -> dict[str, Any] | None:
    """The main W&B run recorded in ``<run dir>/wandb_run.json``, or None."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("id") else None


def run_group(cfg: DictConfig) -> str:
    """The W&B group of every run of this job: ``logger.group`` when set; a resumed run's recorded
    group; else ``<experiment or 'adhoc'>-<sweep dir>`` (every job of a sweep shares it), or
    ``<experiment or 'adhoc'>-<run dir>`` for a single run."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    output_dir = Path(str(cfg.paths.output_dir))
    if parse_resume(cfg.get("resume")).requested:
        recorded = _recorded_run(output_dir)
        if recorded and recorded.get("group"):
            return str(recorded["group"])
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        where = Path(str(HydraConfig.get().sweep.dir))
    else:
        where = output_dir
    return f"{_experiment_name(cfg)}-{_dir_stamp(where)}"[:GROUP_MAX]


def run_tags(cfg: DictConfig) -> list[str]:
    """``key:value`` tags for filtering in the W&B UI, then any ``logger.tags``."""
    values = {"label": cfg.get("label"), "loss": cfg.loss.get("name"), "estimator": cfg.estimator.get("name"),
              "dataset": cfg.dataset.get("name"), "scale": cfg.get("scale"), "seed": cfg.get("seed")}
    tags = [f"{k}:{v}" for k, v in values.items() if v is not None]
    tags += [str(t) for t in cfg.logger.get("tags") or []]
    return list(dict.fromkeys(t[:TAG_MAX] for t in tags))


def wandb_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The W&B config: the composed config plus the Hydra overrides (the report's W&B reader groups
    methods by them) and the code version."""
    return redact_config({**config_dict, "overrides": hydra_overrides(), "code_version": code_version()})


def stage_run_name(stage: str, build_dir: Path, side: str | None = None) -> str:
    """``<stage>-<key>[-<side>]`` for the W&B run that builds a cached artifact in ``build_dir``
    (the cache's ``.build-<key>``, or ``.tmp-<key>-<suffix>`` with the cache off)."""
    match = re.match(r"^\.(?:build|tmp)-([0-9a-f]+)", Path(build_dir).name)
    key = match.group(1) if match else Path(build_dir).name
    return "-".join([stage, key, *([side] if side else [])])


def _run_url(run) -> str | None:
    """The run's URL; None offline (asked offline, W&B prints a warning instead)."""
    return None if getattr(run, "offline", True) else getattr(run, "url", None)


def _new_run_id() -> str:
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- loggers


@dataclass
class RunContext:
    """What :func:`finish_logging` needs beyond the runner's arguments (kept on the logger)."""

    config: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    upload_model: bool = False
    table_rows: int = 1000
    weights_table_rows: int = 20


def _context(logger) -> RunContext:
    return getattr(logger, "tisdpo_context", None) or RunContext()


def _wandb_kwargs(node: DictConfig, **fixed: Any) -> dict[str, Any]:
    """The WandbLogger's arguments from the `logger` node: our own options taken out, and offline as
    wandb.init's ``mode`` (Lightning's ``offline=True`` rewrites WANDB_MODE for the whole process)."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    offline = wandb_offline_by_default(kwargs.get("offline"))
    for key in (*OWN_OPTIONS, "_target_", "_partial_"):
        kwargs.pop(key, None)
    kwargs.update(mode="offline" if offline else "online", **fixed)
    os.makedirs(kwargs["save_dir"], exist_ok=True)
    return kwargs


def _make(node: DictConfig, cls=None, **kwargs: Any) -> WandbLogger:
    """The configured logger class (``logger._target_``), or ``cls`` in its place; called directly,
    so the config dict reaches W&B as plain Python (``instantiate`` would wrap it in OmegaConf)."""
    _close_leftover_run()
    return (cls or get_class(str(node._target_)))(**kwargs)


def build_logger(cfg: DictConfig, config_dict: dict[str, Any]):
    """The training run's Lightning logger, or False (``logger=none``, or W&B disabled).

    For W&B: the run joins the job's group (recorded in ``config_dict["logger"]["group"]`` so
    results.json names it, as the report expects), and its id is kept in ``<run dir>/wandb_run.json``:
    a ``resume`` continues the same W&B run."""
    node = cfg.logger
    if not node.get("_target_"):
        return False
    if not _is_wandb(node):
        return instantiate(node)
    if wandb_disabled():
        log.info("W&B disabled (WANDB_MODE=disabled): no experiment logger")
        return False
    output_dir = Path(str(cfg.paths.output_dir))
    group = run_group(cfg)
    recorded = _recorded_run(output_dir) if parse_resume(cfg.get("resume")).requested else None
    run_id = str(node.get("id") or (recorded or {}).get("id") or _new_run_id())
    if isinstance(config_dict.get("logger"), dict):  # before wandb_config copies it (redacted)
        config_dict["logger"]["group"] = group
    kwargs = _wandb_kwargs(node, save_dir=str(output_dir), id=run_id, resume="allow", group=group,
                           job_type=node.get("job_type") or "train", tags=run_tags(cfg),
                           config=wandb_config(config_dict))
    if rank_zero_only.rank == 0:  # under DDP only rank 0 has a W&B run
        write_json_atomic(output_dir / RUN_RECORD, {
            "id": run_id, "project": kwargs.get("project"), "entity": kwargs.get("entity"), "group": group,
            "name": kwargs.get("name"), "job_type": kwargs["job_type"], "mode": kwargs["mode"]})
    logger = _make(node, **kwargs)
    logger.tisdpo_context = RunContext(
        config=config_dict, cache_dir=str(cfg.cache.dir) if cfg.get("cache") else None,
        upload_model=bool(node.get("upload_model", False)), table_rows=int(node.get("table_rows") or 1000),
        weights_table_rows=int(node.get("weights_table_rows") or 20))
    log.info("W&B run %s (%s, group %s) %s in %s", run_id, kwargs["job_type"], group, kwargs["mode"], output_dir)
    return logger


class StageWandbLogger(WandbLogger):
    """The W&B run of one stage's fit (SFT, an estimator model): finished when that fit ends, so the
    next stage's run, and the training run, start cleanly; the stage's record gets the run's URL."""

    def __init__(self, *args: Any, record: Path | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._record = record

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is None:
            return
        url = _run_url(self._experiment)
        if self._record is not None and url:
            _update_stage_record(self._record, self._experiment.id, url=url)
        self._experiment.finish(exit_code=0 if status == "success" else 1)
        self._experiment = None


def _stage_records(record: Path) -> list[dict[str, Any]]:
    try:
        runs = json.loads(Path(record).read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, dict)]


def _update_stage_record(record: Path, run_id: str, **fields: Any) -> None:
    runs = _stage_records(record)
    for entry in runs:
        if entry.get("id") == run_id:
            entry.update(fields)
    write_json_atomic(record, {"runs": runs})


def stage_logger(cfg: DictConfig, job_type: str, name: str, record: Path | None = None):
    """A W&B logger for one stage's training (``job_type`` sft / estimator; ``name`` e.g.
    ``sft-<key>``), in the job's group; False for ``logger=none``, a non-W&B logger, or W&B disabled
    (stage curves go to W&B only).

    ``record``: a ``wandb_run.json`` inside the artifact being built; the run is appended to it, so
    a run that later reuses the artifact can name the run that built it."""
    node = cfg.logger
    if not _is_wandb(node) or wandb_disabled():
        return False
    output_dir = Path(str(cfg.paths.output_dir))  # the job's run dir: its wandb/ holds every run of the job
    group = run_group(cfg)
    config = redact_config({"stage": job_type, "built_in": str(output_dir), "config": OmegaConf.to_container(cfg, resolve=True),
                            "overrides": hydra_overrides(), "code_version": code_version()})
    kwargs = _wandb_kwargs(node, save_dir=str(output_dir), id=_new_run_id(), name=name, group=group,
                           job_type=job_type, tags=[*run_tags(cfg), f"stage:{job_type}"], config=config)
    if record is not None:
        entry = {k: kwargs.get(k) for k in ("id", "name", "project", "entity", "group", "job_type", "mode")}
        write_json_atomic(record, {"runs": [*_stage_records(record), entry]})
    log.info("W&B stage run %s (%s, group %s)", name, job_type, group)
    return _make(node, cls=StageWandbLogger, record=record, **kwargs)


def open_run_logger(run_dir: str | os.PathLike, job_type: str = "eval", **kwargs: Any):
    """A logger into the W&B run recorded in ``<run dir>/wandb_run.json`` (the eval-only command
    logs into the run that trained the policy); False when that run had no W&B run or W&B is
    disabled. ``kwargs`` go to WandbLogger (e.g. ``mode="online"``). End with :func:`finish_logging`."""
    run_dir = Path(run_dir)
    recorded = _recorded_run(run_dir)
    if recorded is None or wandb_disabled():
        log.info("no W&B run to continue in %s (%s missing, or W&B disabled)", run_dir, RUN_RECORD)
        return False
    try:
        config = json.loads((run_dir / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        config = {}
    offline = wandb_offline_by_default(False if recorded.get("mode") == "online" else None)  # WANDB_MODE=offline wins
    settings = {"id": recorded["id"], "resume": "allow", "save_dir": str(run_dir), "project": recorded.get("project"),
                "entity": recorded.get("entity"), "name": recorded.get("name"), "group": recorded.get("group"),
                "job_type": job_type, "mode": "offline" if offline else "online", **kwargs}
    _close_leftover_run()
    logger = WandbLogger(**{k: v for k, v in settings.items() if v is not None})
    logger_cfg = config.get("logger") if isinstance(config.get("logger"), dict) else {}
    logger.tisdpo_context = RunContext(
        config=config, cache_dir=(config.get("cache") or {}).get("dir"),
        upload_model=bool(logger_cfg.get("upload_model", False)), table_rows=int(logger_cfg.get("table_rows") or 1000),
        weights_table_rows=int(logger_cfg.get("weights_table_rows") or 20))
    return logger


# ---------------------------------------------------------------- end of a run


def _cell(value: Any) -> Any:
    """A table cell: scalars as they are; lists and dicts as compact JSON (W&B column types stay simple)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return json.dumps(value, default=str)


def samples_table(samples: list[dict[str, Any]], max_rows: int):
    """``samples.json`` as a W&B Table: prompt, response, temperature, then every other field
    present (true reward and per-token true rewards on the built-in task, judge verdicts), minus
    token ids."""
    import wandb

    first = ["prompt", "response", "temperature", "reward", "safe"]
    rest = sorted({k for s in samples for k in s if k not in first and not k.endswith("_ids")})
    columns = [c for c in first if any(c in s for s in samples)] + rest
    rows = [[_cell(s.get(c)) for c in columns] for s in samples[:max_rows]]
    return wandb.Table(columns=columns, data=rows, allow_mixed_types=True)


def weights_table(npz_path: Path, max_rows: int):
    """The token weights of the first ``max_rows`` training responses per side (``weights.npz``, in
    training-set order): side, response index, length, mean/min/max and the weights themselves."""
    import wandb

    arrays = np.load(npz_path)
    rows = []
    for side in ("chosen", "rejected"):
        if f"{side}_weights" not in arrays:
            continue
        flat, lengths = arrays[f"{side}_weights"], arrays[f"{side}_lengths"]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for i, n in enumerate(lengths[:max_rows]):
            w = flat[starts[i]:starts[i] + n]
            stats = [float(w.mean()), float(w.min()), float(w.max())] if n else [None, None, None]
            rows.append([side, i, int(n), *stats, " ".join(f"{x:.3f}" for x in w)])
    return wandb.Table(columns=["side", "response", "n_tokens", "mean", "min", "max", "weights"], data=rows,
                       allow_mixed_types=True)


def _stage_provenance(results: dict[str, Any], cache_dir: str | None) -> dict[str, Any]:
    """``stages/<stage>/reused`` and ``stages/<stage>/built_by`` (the W&B run(s) that trained a cached
    artifact, from its wandb_run.json) for the summary."""
    summary: dict[str, Any] = {}
    for event in results.get("stages") or []:
        stage, key = event.get("stage"), event.get("key")
        if not stage or event.get("reused") is None:
            continue
        summary[f"stages/{stage}/reused"] = bool(event["reused"])
        if not key or not cache_dir:
            continue
        builders = _stage_records(Path(cache_dir).expanduser() / stage / key / RUN_RECORD)
        if builders:
            names = [b.get("url") or f"{b.get('project')}/{b.get('id')} ({b.get('name')})" for b in builders]
            summary[f"stages/{stage}/built_by"] = ", ".join(names)
            if event["reused"]:
                log.info("stage %s reused; built by W&B run %s", stage, summary[f"stages/{stage}/built_by"])
    return summary


def _log_artifacts(run, output_dir: Path, results: dict[str, Any], ctx: RunContext) -> list[str]:
    """results.json, run_config.json, the token-weight views and the exported policy as artifacts."""
    import wandb

    logged = []

    def log_artifact(artifact) -> None:
        run.log_artifact(artifact)
        logged.append(f"{artifact.name} ({artifact.type})")

    # The runner writes results.json after this call: the artifact gets the same content (with config).
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.json"
        write_json_atomic(path, {**results, "config": ctx.config})
        artifact = wandb.Artifact(f"results-{run.id}", type="results")
        artifact.add_file(str(path), name="results.json")  # copied now (policy "mutable"): tmp may go
        log_artifact(artifact)
    if (output_dir / RUN_CONFIG).is_file():
        artifact = wandb.Artifact(f"config-{run.id}", type="config")
        artifact.add_file(str(output_dir / RUN_CONFIG), name=RUN_CONFIG)
        log_artifact(artifact)
    weight_files = [output_dir / f for f in WEIGHT_FILES if (output_dir / f).is_file()]
    if weight_files:
        artifact = wandb.Artifact(f"weights-{run.id}", type="weights")
        for path in weight_files:
            artifact.add_file(str(path), name=path.name)
        log_artifact(artifact)
    policy_dir = Path(str(results.get("export/policy_dir") or output_dir / "policy"))
    if policy_dir.is_dir():
        artifact = wandb.Artifact(f"policy-{run.id}", type="model")
        if ctx.upload_model:
            artifact.add_dir(str(policy_dir))
        else:
            # By reference: a 7B policy is GBs, and hashing it would take minutes; its path names it.
            artifact.add_reference(f"file://{policy_dir.resolve()}", checksum=False)
        log_artifact(artifact)
    return logged


def finish_logging(logger, output_dir: Path, results: dict[str, Any]) -> None:
    """At the end of a run (W&B only): the token-weight page and histogram as media; samples and token
    weights as tables; results, config, token-weight views and the exported policy as artifacts;
    which run built each cached stage in the summary; then the W&B run is closed."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb  # optional at import time: only a W&B run gets here

    output_dir = Path(output_dir)
    ctx = _context(logger)
    run = logger.experiment
    media: dict[str, Any] = {}
    if (output_dir / "token_weights.html").is_file():
        media["weights/token_view"] = wandb.Html((output_dir / "token_weights.html").read_text())
    if (output_dir / "weights_hist.png").is_file():
        media["weights/histogram"] = wandb.Image(str(output_dir / "weights_hist.png"))
    if (output_dir / "samples.json").is_file():
        media["eval/samples"] = samples_table(json.loads((output_dir / "samples.json").read_text()), ctx.table_rows)
    if (output_dir / "weights.npz").is_file():
        media["weights/responses"] = weights_table(output_dir / "weights.npz", ctx.weights_table_rows)
    if media:
        run.log(media)
    run.summary.update(_stage_provenance(results, ctx.cache_dir))
    logged = _log_artifacts(run, output_dir, results, ctx)
    log.info("W&B run %s: %s; artifacts: %s", run.id, ", ".join(media) or "no media", ", ".join(logged))
    url = _run_url(run)
    if url and (output_dir / RUN_RECORD).is_file():
        write_json_atomic(output_dir / RUN_RECORD, {**(_recorded_run(output_dir) or {}), "url": url})
    run.finish()
