"""Evaluate finished runs again: ``python -m tisdpo.evaluate <run dir | sweep dir> [overrides]``.

A table is trained by one sweep and judged by the next. For each run this

1. composes its config: the run's own ``run_config.json`` (what trained it) with ``overrides`` on
   top: ``eval=<preset>`` swaps the whole eval group (as ``python run.py eval=<preset>`` would),
   ``key=value`` sets an existing key, ``+key=value`` adds one;
2. loads the exported policy ``<run dir>/policy/`` and, for ``eval=synthetic`` (KL and the
   comparison samples), the reference: the run's SFT artifact ``<cache.dir>/sft/<key>`` (the key
   from results.json ``stages``; rebuilt under the same key if the cache lost it), or the base model
   when the run skipped SFT;
3. runs the eval stage (samples.json and judge outputs go to the run dir, as in training) and
   merges its metrics into ``results.json``: earlier keys are kept, the keys it computes are
   overwritten, and ``evaluations`` records ``{time, overrides, keys}`` of each re-evaluation;
4. logs the new metrics into the run's own W&B run (``job_type=eval``) when it had one.

A sweep dir: every job dir below it with a results.json, DPO jobs first; with a judges config
that compares with another run's samples (``baseline_from: samples``) and no
``eval.baseline_samples`` given, each job's baseline is the DPO job of the same seed (label or
loss ``dpo``), whose samples this same command has just written.

Bad input (not a run or sweep dir, no policy/, an unknown override or option) is one line on
stderr and exit status 2.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import tisdpo.resolvers  # noqa: F401  (the ${slug:...} resolver the configs use)
from tisdpo.errors import UserError
from tisdpo import jsonio
from tisdpo.jsonio import write_json_atomic
from tisdpo.models.loading import build_model
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages.data import prepare_data
from tisdpo.stages.evaluation import check_eval_options, eval_stage
from tisdpo.stages.export import POLICY_DIR
from tisdpo.runtime.loggers import finish_logging, open_run_logger
from tisdpo.stages.start_models import frozen_dtype, initial_model, master_dtype, stage_device
from tisdpo.runtime.run_dir import RUN_CONFIG, config_differences
from tisdpo.stages.context import RunContext
from tisdpo.stages.sft import sft_stage
from tisdpo.runtime.validate import validate_config

log = logging.getLogger("tisdpo.evaluate")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
RESULTS = "results.json"
SAMPLES = "samples.json"
# Config groups an evaluation may swap; any other group would describe a different run.
SWAPPABLE_GROUPS = ("eval",)


class EvaluateError(UserError):
    """Bad input to the eval-only command: one line, exit status 2."""


# ---------------------------------------------------------------- which runs
def is_run_dir(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file()


def find_runs(target: Path) -> list[Path]:
    """``[target]`` for a run dir; every run dir with a results.json below a sweep dir."""
    if not target.is_dir():
        raise EvaluateError(f"{target}: no such directory (give a run dir or a sweep dir)")
    if is_run_dir(target):
        if not (target / RESULTS).is_file():
            raise EvaluateError(f"{target}: the run has no {RESULTS} (not finished); evaluate a finished run")
        return [target]
    runs = sorted(p.parent for p in target.rglob(RESULTS) if is_run_dir(p.parent))
    if not runs:
        raise EvaluateError(f"{target}: not a run dir ({RUN_CONFIG} missing) and no finished run below it")
    return runs


def check_policy(run_dir: Path) -> Path:
    policy = run_dir / POLICY_DIR
    if not (policy / "config.json").is_file():
        hint = " (exported as a LoRA adapter: re-export with export.merge_lora=true)" \
            if (policy / "adapter_config.json").is_file() else " (export.enabled=false, or a run from before the export)"
        raise EvaluateError(f"{run_dir}: no exported policy in {policy}{hint}")
    return policy


def read_json(path: Path) -> dict[str, Any]:
    """``jsonio.read_json``, with an unreadable file as one line (status 2)."""
    try:
        return jsonio.read_json(path)
    except (OSError, ValueError) as error:
        raise EvaluateError(f"{path}: unreadable ({error})") from None


# ---------------------------------------------------------------- the config
def _group_node(group: str, choice: str) -> Any:
    """The ``group`` node of the primary config composed with ``group=choice``, interpolations kept
    (they resolve against the run's config, e.g. ``${cache.dir}``)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        composed = compose("config", overrides=[f"{group}={choice}"])
    return OmegaConf.to_container(composed[group], resolve=False)


def compose_eval_config(run_config: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The run's config with ``overrides`` applied (see the module docstring)."""
    cfg = OmegaConf.create(run_config)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise EvaluateError(f"bad override: {str(error).splitlines()[0]}") from None
    for override in parsed:
        key, value = override.key_or_group, override.value()
        if override.is_delete():
            raise EvaluateError(f"{override.input_line}: deleting keys is not supported here; set the key instead")
        if (CONF_DIR / key).is_dir() and "." not in key:
            if key not in SWAPPABLE_GROUPS:
                raise EvaluateError(f"{override.input_line}: evaluation may swap only {', '.join(SWAPPABLE_GROUPS)}; "
                                    f"{key}={value} would describe another run")
            try:
                cfg[key] = _group_node(key, str(value))
            except HydraException as error:
                raise EvaluateError(f"{override.input_line}: {str(error).splitlines()[0]}") from None
            continue
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>" and not override.is_add():
            raise EvaluateError(f"{override.input_line}: {key} is not an option of this run's config "
                                f"(+{key}=... adds one)")
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise EvaluateError(f"config: {str(error).splitlines()[0]}") from None
    return cfg


# ---------------------------------------------------------------- the models
def sft_dir_of(results: dict[str, Any], cfg: DictConfig, data, run_dir: Path) -> Path | None:
    """The run's SFT artifact (None when the run skipped SFT): the recorded key under
    ``<cache.dir>/sft/``, rebuilt under the same key when the cache no longer has it."""
    event = next((e for e in results.get("stages") or [] if e.get("stage") == "sft"), None)
    if event is not None and event.get("skipped"):
        return None
    if event is not None and event.get("key"):
        path = Path(str(cfg.cache.dir)).expanduser() / "sft" / str(event["key"])
        if path.is_dir():
            return path
        log.warning("the run's SFT artifact %s is gone: building it again (same key, same data)", path)
    cache = ArtifactCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    return sft_stage(RunContext(cfg=cfg, output_dir=run_dir, cache=cache, data=data))


def load_models(run_dir: Path, cfg: DictConfig, data, results: dict[str, Any]):
    """(policy, reference) on the evaluation device; the reference only where the eval uses it."""
    device = stage_device(cfg)
    policy = build_model(name_or_path=str(run_dir / POLICY_DIR), dtype=master_dtype(cfg)).to(device)
    if cfg.eval.name != "synthetic":
        return policy, None
    reference = initial_model(cfg, sft_dir_of(results, cfg, data, run_dir), data.tokenizer)
    dtype = frozen_dtype(cfg)
    reference = reference.to(device=device, dtype=dtype) if dtype is not None else reference.to(device)
    reference.requires_grad_(False)
    return policy, reference


# ---------------------------------------------------------------- one run
def merge_results(results: dict[str, Any], metrics: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``results`` with ``metrics`` merged in (their keys overwritten, the rest kept) and the
    evaluation recorded under ``evaluations``."""
    merged = {**results, **metrics}
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "overrides": list(overrides),
             "keys": sorted(metrics)}
    merged["evaluations"] = [*(results.get("evaluations") or []), entry]
    return merged


def log_to_wandb(run_dir: Path, metrics: dict[str, Any], results: dict[str, Any]) -> None:
    """The new metrics into the run's own W&B run (job_type eval), when it had one; then that run's
    end-of-run records (samples table, results artifact) again, and it is closed."""
    logger = open_run_logger(run_dir, job_type="eval")
    if not logger:
        return
    logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    finish_logging(logger, run_dir, results)


def check_results_config(run_dir: Path, results: dict[str, Any], run_config: dict[str, Any]) -> None:
    """A results.json whose ``config`` disagrees with run_config.json (beta, the model, the data:
    anything that changes the trained policy; eval options may differ) is not the results of the
    policy evaluated here: merging new metrics into it would mix two runs. Refused in one line."""
    recorded = results.get("config")
    if not isinstance(recorded, dict):
        return
    differences = config_differences(run_config, json.loads(json.dumps(recorded, default=str)))
    if differences:
        shown = "; ".join(differences[:4]) + (f"; ... ({len(differences)} in all)" if len(differences) > 4 else "")
        raise EvaluateError(f"{run_dir / RESULTS}: its config differs from {RUN_CONFIG} ({shown}): it is not the "
                            f"results of the policy in {run_dir}; restore it or re-run the job")


def evaluate_run(run_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Evaluate one finished run with ``overrides``; returns the new metrics (also merged into its results.json)."""
    check_policy(run_dir)
    results = read_json(run_dir / RESULTS)
    run_config = read_json(run_dir / RUN_CONFIG)
    check_results_config(run_dir, results, run_config)
    cfg = compose_eval_config(run_config, overrides)
    validate_config(cfg)
    if not cfg.eval.get("enabled", False):
        raise EvaluateError(f"eval={cfg.eval.get('name')}: evaluation is off; give an eval preset, e.g. eval=synthetic")
    check_eval_options(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    data = prepare_data(cfg)
    policy, reference = load_models(run_dir, cfg, data, results)
    log.info("evaluating %s with eval=%s", run_dir, cfg.eval.name)
    metrics = eval_stage(cfg, data, policy, reference, run_dir)
    merged = merge_results(results, metrics, overrides)
    write_json_atomic(run_dir / RESULTS, merged)
    log.info("%s: merged %d keys into %s", run_dir, len(metrics), RESULTS)
    log_to_wandb(run_dir, metrics, merged)
    return metrics


# ---------------------------------------------------------------- a sweep
def is_dpo(run_config: dict[str, Any]) -> bool:
    label = str(run_config.get("label") or "")
    loss = str((run_config.get("loss") or {}).get("name") or "")
    return label.lower() == "dpo" or (not label and loss == "dpo")


def _needs_baseline(run_config: dict[str, Any], overrides: Sequence[str]) -> bool:
    """A judges evaluation comparing with another run's samples, none given."""
    if any(o.split("=", 1)[0].lstrip("+") == "eval.baseline_samples" for o in overrides):
        return False
    ev = compose_eval_config(run_config, overrides).eval
    return ev.get("name") == "judges" and ev.get("baseline_from") == "samples" and bool(ev.get("pairwise"))


def plan_sweep(runs: Sequence[Path], overrides: Sequence[str]) -> list[tuple[Path, list[str]]]:
    """(run dir, its overrides) in evaluation order: DPO jobs first, every other job with its
    seed's DPO samples as the win-rate baseline when the eval config wants one."""
    configs = {run: read_json(run / RUN_CONFIG) for run in runs}
    dpo_by_seed: dict[Any, Path] = {}
    for run in runs:
        if is_dpo(configs[run]):
            dpo_by_seed.setdefault(configs[run].get("seed"), run)
    ordered = sorted(runs, key=lambda r: (not is_dpo(configs[r]), str(r)))
    plan = []
    for run in ordered:
        extra: list[str] = []
        baseline = dpo_by_seed.get(configs[run].get("seed"))
        if not is_dpo(configs[run]) and baseline is not None and _needs_baseline(configs[run], overrides):
            extra = [f"eval.baseline_samples={baseline / SAMPLES}"]
        plan.append((run, [*overrides, *extra]))
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    target, overrides = Path(argv[0]).expanduser(), argv[1:]
    try:
        runs = find_runs(target)
        for run in runs:
            check_policy(run)
        plan = plan_sweep(runs, overrides) if len(runs) > 1 or not is_run_dir(target) else [(runs[0], overrides)]
        for run, run_overrides in plan:
            evaluate_run(run, run_overrides)
    except (UserError, HydraException) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
