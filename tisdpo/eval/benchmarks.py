"""TI-DPO's benchmarks through lm-evaluation-harness, on an exported Hugging Face model directory.

The TI-DPO paper scores its policies on MMLU, GSM8K, GPQA, HumanEval, TruthfulQA and IFEval
(main table: each benchmark and their average; ablation table: the same benchmarks grouped by
capability; label-noise table: GSM8K accuracy). This runs ``lm_eval.simple_evaluate`` on the
policy exported by training (``<run dir>/policy/``: anything ``AutoModelForCausalLM`` loads) and
returns flat metrics:

- ``bench/<task>/<metric>`` and ``bench/<task>/<metric>_stderr`` for every metric lm-eval reports
  for a requested task. lm-eval names a metric ``<metric>,<filter>``: the filter ``none`` is
  dropped; a metric reported under one filter only, or under the task's ``eval.primary_filter``,
  gets the plain name too, and every non-``none`` filter is also kept as ``<metric>_<filter>``
  (``bench/gsm8k/exact_match`` = strict-match, ``bench/gsm8k/exact_match_flexible-extract``);
- ``bench/<task>/score``: the task's headline metric (``eval.metrics.<task>``), the one the paper
  tables read; ``bench/avg``: the mean headline over all tasks (the main table's Avg);
- ``bench/group/<name>``: the mean headline over the tasks of each ``eval.groups`` entry (the
  ablation table's capability columns).

Values are lm-eval's fractions (the tables scale them to %). ``eval.num_fewshot`` may be one number
or a mapping task -> shots; tasks are then evaluated in groups of equal shots with one model load.
Needs ``pip install lm-eval`` (HumanEval and IFEval need lm-eval's ``code``/``ifeval`` extras, and
HumanEval runs generated code: ``eval.allow_code_execution``).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PREFIX = "bench"
BACKENDS = ("hf", "vllm")


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg) else cfg


def _tasks(eval_cfg) -> list[str]:
    tasks = list(_plain(eval_cfg.get("tasks")) or [])
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"eval.tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    return tasks


# lm-eval's default metrics by output type, for a task yaml without a metric_list
DEFAULT_METRICS = {"multiple_choice": "acc", "loglikelihood": "acc", "generate_until": "exact_match",
                   "loglikelihood_rolling": "word_perplexity"}


def _task_manager(include_path, include_defaults: bool):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("eval=benchmarks needs lm-evaluation-harness: pip install 'lm-eval[ifeval]'") from error
    return TaskManager(include_path=str(Path(str(include_path)).expanduser()) if include_path else None,
                       include_defaults=include_defaults)


def task_first_metric(task: str, eval_cfg) -> str:
    """The first metric the task's yaml names (``metric_list``), else its output type's default:
    the headline of a task that ``eval.metrics`` does not name."""
    include_path = eval_cfg.get("include_path")
    return _first_metric(task, str(include_path) if include_path else None, bool(eval_cfg.get("include_defaults", True)))


@functools.lru_cache(maxsize=64)
def _first_metric(task: str, include_path: str | None, include_defaults: bool) -> str:
    manager = _task_manager(include_path, include_defaults)
    entry = manager.task_index.get(task)
    if entry is None:
        raise ValueError(f"eval.tasks: lm-eval knows no task {[task]} (add its yaml under eval.include_path)")
    config = dict(getattr(entry, "cfg", None) or {})
    if not config.get("metric_list") and getattr(entry, "yaml_path", None):
        from lm_eval.utils import load_yaml_config  # the yaml with its includes resolved
        config = {**load_yaml_config(yaml_path=str(entry.yaml_path)), **config}
    metric_list = config.get("metric_list") or []
    if metric_list and isinstance(metric_list[0], Mapping) and metric_list[0].get("metric"):
        return str(metric_list[0]["metric"])
    output_type = str(config.get("output_type") or "generate_until")
    if output_type not in DEFAULT_METRICS:
        raise ValueError(f"eval.metrics.{task} is not set and task {task!r} names no metric: set eval.metrics.{task}")
    return DEFAULT_METRICS[output_type]


def headline_metrics(eval_cfg) -> dict[str, str]:
    """task -> its headline metric name: ``eval.metrics.<task>``, else the first metric the task's
    yaml names (lm-eval's own order; a paper table sets the one it reads)."""
    metrics = dict(_plain(eval_cfg.get("metrics")) or {})
    for task in _tasks(eval_cfg):
        if task not in metrics:
            metrics[task] = task_first_metric(task, eval_cfg)
            log.info("eval.metrics.%s not set: the task's first metric, %s", task, metrics[task])
    return {t: str(metrics[t]) for t in _tasks(eval_cfg)}


def _groups(eval_cfg) -> dict[str, list[str]]:
    """The ``eval.groups`` whose tasks are all evaluated (``eval.tasks=[gsm8k]`` leaves out the rest)."""
    groups = {}
    tasks = set(_tasks(eval_cfg))
    for name, members in (_plain(eval_cfg.get("groups")) or {}).items():
        if not members or isinstance(members, str):
            raise ValueError(f"eval.groups.{name} must be a non-empty list of tasks, got {members!r}")
        if set(members) <= tasks:
            groups[str(name)] = list(members)
        else:
            log.info("eval.groups.%s skipped: %s not among eval.tasks", name, sorted(set(members) - tasks))
    return groups


def benchmark_metric_keys(eval_cfg) -> set[str]:
    """The keys ``run_benchmarks`` always writes for this config (each task may add more)."""
    keys = {f"{PREFIX}/avg"}
    for task, metric in headline_metrics(eval_cfg).items():
        keys |= {f"{PREFIX}/{task}/{metric}", f"{PREFIX}/{task}/{metric}_stderr", f"{PREFIX}/{task}/score"}
    keys |= {f"{PREFIX}/group/{name}" for name in _groups(eval_cfg)}
    return keys


def flatten_task_results(task: str, results: Mapping[str, Any], primary_filter: str | None = None) -> dict[str, float]:
    """lm-eval's ``{"<metric>,<filter>": value, "<metric>_stderr,<filter>": value}`` -> flat keys."""
    by_metric: dict[str, dict[str, tuple[float | None, float | None]]] = {}
    for raw_key, value in results.items():
        if "," not in raw_key:  # "alias", "name", ...: not a metric
            continue
        metric, filt = raw_key.split(",", 1)
        is_stderr = metric.endswith("_stderr")
        name = metric[: -len("_stderr")] if is_stderr else metric
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None  # lm-eval writes "N/A" for a stderr it could not compute
        value_pair = by_metric.setdefault(name, {}).get(filt, (None, None))
        by_metric[name][filt] = (value_pair[0], number) if is_stderr else (number, value_pair[1])
    flat: dict[str, float] = {}
    for metric, filters in by_metric.items():
        for filt, (value, stderr) in filters.items():
            names = []
            if filt == "none" or len(filters) == 1 or filt == primary_filter:
                names.append(metric)
            if filt != "none":
                names.append(f"{metric}_{filt}")
            for name in names:
                if value is not None:
                    flat.setdefault(f"{PREFIX}/{task}/{name}", value)
                if stderr is not None:
                    flat.setdefault(f"{PREFIX}/{task}/{name}_stderr", stderr)
    return flat


def summarise(flat: dict[str, float], eval_cfg) -> dict[str, float]:
    """Adds ``bench/<task>/score``, ``bench/avg`` and ``bench/group/<name>`` from the headlines."""
    out = dict(flat)
    headline: dict[str, float] = {}
    for task, metric in headline_metrics(eval_cfg).items():
        key = f"{PREFIX}/{task}/{metric}"
        if key not in flat:
            found = sorted(k for k in flat if k.startswith(f"{PREFIX}/{task}/") and not k.endswith("_stderr"))
            raise ValueError(f"eval.metrics.{task}={metric!r}: lm-eval reported no such metric for {task}; "
                             f"it reported {found}")
        headline[task] = out[f"{PREFIX}/{task}/score"] = flat[key]
    out[f"{PREFIX}/avg"] = _mean(headline.values())
    for name, members in _groups(eval_cfg).items():
        out[f"{PREFIX}/group/{name}"] = _mean(headline[t] for t in members)
    return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else math.nan


def _fewshot_groups(eval_cfg, tasks: list[str]) -> dict[int | None, list[str]]:
    """Tasks grouped by their number of shots (None = the task's own default)."""
    setting = _plain(eval_cfg.get("num_fewshot"))
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        if isinstance(setting, Mapping):
            shots = setting.get(task)
        else:
            shots = setting
        if shots is not None and (not isinstance(shots, int) or shots < 0):
            raise ValueError(f"eval.num_fewshot for {task}: {shots!r} is not a number of shots >= 0")
        groups.setdefault(shots, []).append(task)
    return groups


def _model_args(model_dir: str, eval_cfg) -> dict[str, Any]:
    args: dict[str, Any] = {"pretrained": str(model_dir)}
    if eval_cfg.get("dtype"):
        args["dtype"] = str(eval_cfg.dtype)
    if eval_cfg.get("max_length"):
        args["max_length"] = int(eval_cfg.max_length)
    args.update(_plain(eval_cfg.get("model_args")) or {})
    return args


@contextmanager
def _environment(allow_code_execution: bool):
    """HumanEval's code_eval metric refuses to run unless HF_ALLOW_CODE_EVAL=1."""
    old = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allow_code_execution:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if allow_code_execution:
            if old is None:
                os.environ.pop("HF_ALLOW_CODE_EVAL", None)
            else:
                os.environ["HF_ALLOW_CODE_EVAL"] = old


def run_benchmarks(model_dir: str | os.PathLike, eval_cfg, output_dir: str | os.PathLike) -> dict[str, float]:
    """Evaluate the model in ``model_dir`` on ``eval.tasks``; returns flat ``bench/...`` metrics and
    writes them, with lm-eval's task configs and versions, to ``<output_dir>/benchmarks.json``."""
    try:
        import lm_eval
        from lm_eval.api.registry import get_model
        from lm_eval.tasks import TaskManager
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("eval=benchmarks needs lm-evaluation-harness: pip install 'lm-eval[ifeval]'") from error

    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"run_benchmarks: {str(model_dir)!r} is not an exported Hugging Face model "
                                "directory (no config.json); training exports the policy to <run dir>/policy/")
    backend = str(eval_cfg.get("backend") or "hf")
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend={backend!r} is not one of {list(BACKENDS)}")
    tasks = _tasks(eval_cfg)
    headline_metrics(eval_cfg)  # fail on a missing headline before the expensive part
    _groups(eval_cfg)
    include_path = eval_cfg.get("include_path")
    if include_path and not Path(str(include_path)).expanduser().exists():
        raise FileNotFoundError(f"eval.include_path={include_path!r}: no such directory")
    task_manager = TaskManager(include_path=str(Path(str(include_path)).expanduser()) if include_path else None,
                               include_defaults=bool(eval_cfg.get("include_defaults", True)))
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"eval.tasks: lm-eval knows no task {unknown} (add its yaml under eval.include_path)")

    batch_size = eval_cfg.get("batch_size", "auto")
    # null: the accelerator where there is one, else the CPU (lm-eval's own default is cuda, which
    # fails on a CPU-only torch)
    device = eval_cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    extra = {"batch_size": batch_size, "device": device}
    lm = get_model(backend).create_from_arg_obj(_model_args(str(model_dir), eval_cfg),
                                                {k: v for k, v in extra.items() if v is not None})
    apply_chat_template = _plain(eval_cfg.get("apply_chat_template", False))
    primary = dict(_plain(eval_cfg.get("primary_filter")) or {})
    flat: dict[str, float] = {}
    samples: dict[str, Any] = {}
    provenance: dict[str, Any] = {"lm_eval_version": getattr(lm_eval, "__version__", "?"), "model_dir": str(model_dir),
                                  "backend": backend, "runs": []}
    with _environment(bool(eval_cfg.get("allow_code_execution", False))):
        for shots, group in _fewshot_groups(eval_cfg, tasks).items():
            log.info("lm-eval: %s (%s-shot) on %s", group, "default" if shots is None else shots, model_dir)
            output = lm_eval.simple_evaluate(
                model=lm, tasks=group, num_fewshot=shots, limit=eval_cfg.get("limit"),
                task_manager=task_manager, apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=bool(apply_chat_template), gen_kwargs=_plain(eval_cfg.get("gen_kwargs")),
                log_samples=bool(eval_cfg.get("log_samples", False)), random_seed=int(eval_cfg.get("seed", 0)),
                numpy_random_seed=int(eval_cfg.get("seed", 0)), torch_random_seed=int(eval_cfg.get("seed", 0)),
                fewshot_random_seed=int(eval_cfg.get("seed", 0)),
                confirm_run_unsafe_code=bool(eval_cfg.get("allow_code_execution", False)),
                bootstrap_iters=int(eval_cfg.get("bootstrap_iters", 1000)))
            if output is None:  # non-zero ranks under lm-eval's own multi-GPU runs
                return {}
            for task in group:
                if task not in output["results"]:
                    raise ValueError(f"lm-eval returned no results for task {task!r}")
                flat.update(flatten_task_results(task, output["results"][task], primary.get(task)))
                if eval_cfg.get("subtasks", False):
                    for sub in (output.get("group_subtasks") or {}).get(task, []):
                        flat.update(flatten_task_results(sub, output["results"].get(sub, {}), primary.get(sub)))
            provenance["runs"].append({"tasks": group, "num_fewshot": shots, "n-shot": output.get("n-shot"),
                                       "versions": output.get("versions"), "n-samples": output.get("n-samples"),
                                       "configs": output.get("configs")})
            samples.update(output.get("samples") or {})
    metrics = summarise(flat, eval_cfg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if samples:
        (out / "benchmark_samples.json").write_text(json.dumps(samples, default=str))
    (out / "benchmarks.json").write_text(json.dumps({"metrics": metrics, **provenance}, indent=1, default=str))
    return metrics
