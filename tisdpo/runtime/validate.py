"""Config checks that run before any model or dataset loads: one clear line per mistake.

Every value that would train nonsense without complaint (``loss.beta=0``, a NaN learning rate,
``eval.n_prompts=0``) or fail deep inside with a traceback (``seed=-1``) is refused here, as a
:class:`ConfigError` naming the option, its value and the valid range. ``run.py`` also calls
:func:`override_problem` on the command line before Hydra composes: Lightning Trainer keys the
pipeline sets itself (``trainer.max_steps``) fail Hydra's struct check with no hint otherwise.
"""
from __future__ import annotations

import glob
import math
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tisdpo.checks import ABSENT as _ABSENT
from tisdpo.checks import ConfigError
from tisdpo.checks import flag as _flag
from tisdpo.checks import get as _get
from tisdpo.checks import in_range as _check
from tisdpo.checks import number as _number
from tisdpo.checks import one_of as _one_of
from tisdpo.constants import CONF_DIR
from tisdpo.registry import estimator_record, group_names, loss_record


# Lightning Trainer arguments the pipeline passes itself (tisdpo/runtime/fit.py, train_stage.py):
# a value under `trainer` would be overwritten, or clash. Per key: the option to use instead
# (None: none), a note, and whether the value carries over as it is (same meaning, same units).
PIPELINE_TRAINER_KEYS: dict[str, tuple[str | None, str | None, bool]] = {
    "max_steps": ("train.max_steps", "sft.max_steps and estimator.max_steps set the other stages", True),
    "max_epochs": ("train.max_steps", "every stage trains for a number of steps, not epochs", False),
    "accumulate_grad_batches": ("train.grad_accum", None, True),
    "val_check_interval": ("train.val_every_n_steps", "validation every N optimizer steps", False),
    "check_val_every_n_epoch": ("train.val_every_n_steps", "validation every N optimizer steps", False),
    "limit_val_batches": ("train.val_every_n_steps", "0 turns validation off", False),
    "enable_checkpointing": ("checkpoint.every_n_steps", "0 turns checkpoints off", False),
    "logger": ("logger", "logger=csv, logger=wandb or logger=none", False),
    "callbacks": (None, "the pipeline sets its own callbacks", False),
    "inference_mode": (None, "validation runs without it: TI-DPO's attribution needs gradients there", False),
}

# Names of the dataset adapters (tisdpo.data.ADAPTERS), written out so that this module imports no
# torch: run.py calls it before Hydra composes, and `--help` must stay instant; tests/test_config_values.py
# checks they agree. Losses and estimators are the conf/loss and conf/estimator files, and each checks
# its own options through its record (tisdpo.registry; the records load torch only when asked).
DATASET_NAMES = ("hh", "pku_saferlhf", "tldr", "ultrafeedback")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
SEED_MAX = 2**32 - 1  # numpy and Lightning's seed_everything take 32-bit seeds





def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _kinds(kinds) -> str:
    return " or ".join(sorted(kinds))


# ---------------------------------------------------------------------------------------
# the command line, before Hydra composes
# ---------------------------------------------------------------------------------------
_TRAINER_OVERRIDE = re.compile(r"^\+{0,2}trainer\.([A-Za-z_]\w*)=(.*)$", re.S)


def trainer_key_problem(key: str, value: Any = _ABSENT) -> str | None:
    """The one-line message for a Lightning key the pipeline sets itself, else None."""
    if key not in PIPELINE_TRAINER_KEYS:
        return None
    option, note, same = PIPELINE_TRAINER_KEYS[key]
    if option is None:
        return f"trainer.{key} is controlled by the pipeline and cannot be configured ({note})"
    use = f"{option}={value}" if same and value is not _ABSENT else option
    return f"trainer.{key} is controlled by the pipeline: use {use} instead" + (f" ({note})" if note else "")


def override_problem(args: Iterable[str]) -> str | None:
    """The first command-line override of a pipeline-set Lightning key (``trainer.max_steps=5``,
    ``+trainer.max_steps=5``), as one line; None when there is none. Called by run.py before
    Hydra composes: there, ``trainer.max_steps=5`` fails the struct check without a hint, and
    ``+trainer.max_steps=5`` is silently overwritten by train.max_steps."""
    for arg in args:
        match = _TRAINER_OVERRIDE.match(arg)
        if match:
            problem = trainer_key_problem(match.group(1), match.group(2))
            if problem:
                return problem
    return None


def _check_path(value, option: str) -> None:
    if value and not Path(str(value)).expanduser().exists() and str(value).startswith((".", "/", "~")):
        raise ConfigError(f"{option}={value!r}: no such file or directory")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (one line) for the first config value that cannot work."""
    _check_choices(cfg)
    _check_dataset(cfg)
    _check_pairs(cfg)
    _check_model(cfg)
    _check_train(cfg)
    _check_optim(cfg, "optim")
    _check_sft(cfg)
    _check_loss(cfg)
    _check_estimator(cfg)
    _check_eval(cfg)
    _check_generation_backends(cfg)
    _check_run_options(cfg)
    _check_trainer(cfg)


def gpu_present() -> bool:
    """Whether this machine shows a GPU, without importing torch: an NVIDIA or AMD device node that
    CUDA_VISIBLE_DEVICES does not hide (macOS: Lightning's "gpu" is MPS, assumed present)."""
    if sys.platform == "darwin":
        return True
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def check_devices(cfg: DictConfig) -> None:
    """A run that asks for a GPU (``trainer=gpu``/ddp/fsdp, ``scale=paper``) on a machine without one
    fails here, in one line, before any stage runs (not after a whole CPU reference pass). Separate
    from :func:`validate_config`, which checks a config on any machine."""
    accelerator = str(_get(cfg, "trainer.accelerator") if _get(cfg, "trainer.accelerator") is not _ABSENT else "cpu")
    if accelerator in ("gpu", "cuda") and not gpu_present():
        scale = f" (scale={cfg.get('scale')} brings it)" if cfg.get("scale") == "paper" else ""
        raise ConfigError(f"trainer.accelerator={accelerator}{scale} but this machine has no GPU: "
                          f"use trainer=cpu (scale=paper: with a model and lengths a CPU runs) or run on a GPU machine")


# ---------------------------------------------------------------------------------------
# value helpers: each names the option, its value and the valid range
# ---------------------------------------------------------------------------------------
def _check_path(value, option: str) -> None:
    if value and not Path(str(value)).expanduser().exists() and str(value).startswith((".", "/", "~")):
        raise ConfigError(f"{option}={value!r}: no such file or directory")


# ---------------------------------------------------------------------------------------
# the groups
# ---------------------------------------------------------------------------------------
def _check_choices(cfg: DictConfig) -> None:
    """The loss and the estimator exist, and fit each other by kind: a loss that takes token weights
    names the kinds it takes (offline scores, online weights) and each estimator gives one kind."""
    loss, estimator = cfg.loss.name, cfg.estimator.name
    losses = group_names("loss")
    if loss not in losses:
        raise ConfigError(f"loss={loss!r} is not one of {losses}")
    estimators = group_names("estimator")
    if estimator not in estimators:
        raise ConfigError(f"estimator.name={estimator!r} is not one of {', '.join(estimators)}")
    takes = loss_record(cfg.loss).token_weights
    gives = estimator_record(estimator).kind
    fitting = [e for e in estimators if estimator_record(e).kind in takes]
    if takes and gives is None:
        if loss_record(cfg.loss).weights_required:
            raise ConfigError(f"loss={loss} needs token weights: add estimator=<one of {', '.join(fitting)}>")
    elif takes and gives not in takes:
        raise ConfigError(f"estimator={estimator} gives {gives} weights, and loss={loss} takes {_kinds(takes)} weights; "
                          f"valid: {', '.join(fitting)}")
    elif not takes and gives is not None:
        weighted = [name for name in losses if _takes_weights(name)]
        raise ConfigError(
            f"estimator={estimator} has no effect with loss={loss}: only {', '.join(weighted)} use token "
            "weights (drop the estimator, or use one of those losses)"
        )


def _takes_weights(loss_name: str) -> bool:
    node = OmegaConf.load(CONF_DIR / "loss" / f"{loss_name}.yaml")
    node = node.get("loss", node)  # a loss file in the _global_ package (tidpo) keeps its node under `loss`
    return bool(loss_record(node).token_weights)


def _check_dataset(cfg: DictConfig) -> None:
    ds = cfg.dataset
    datasets = ["synthetic", *sorted(DATASET_NAMES)]
    if ds.name not in datasets:
        raise ConfigError(f"dataset.name={ds.name!r} is not one of {', '.join(datasets)}")
    _check(cfg, "dataset.max_length", low=2, integer=True)
    prompt_length = _number("dataset.max_prompt_length", ds.max_prompt_length, integer=True)
    if not 0 < prompt_length < int(ds.max_length):
        raise ConfigError(
            f"dataset.max_prompt_length={ds.max_prompt_length} must be positive and below dataset.max_length={ds.max_length}"
        )
    if not 0.0 <= _number("dataset.label_noise", ds.get("label_noise") or 0.0, integer=False) <= 1.0:
        raise ConfigError(f"dataset.label_noise={ds.label_noise} must be a share in [0, 1]")
    if ds.get("truncation_mode") not in ("keep_end", "keep_start"):
        raise ConfigError(f"dataset.truncation_mode={ds.get('truncation_mode')!r} is not one of keep_end, keep_start")
    template = ds.get("prompt_template")
    if template is not None and (not isinstance(template, str) or "{prompt}" not in template):
        raise ConfigError(f"dataset.prompt_template={template!r} must be a string holding '{{prompt}}' (or null: the prompt as given)")
    for option in ("limit", "test_limit"):
        _check(cfg, f"dataset.{option}", low=1, integer=True, nullable=True, note="null: every row")
    _check(cfg, "dataset.min_test_pairs", low=1, integer=True, nullable=True,
           note="null: the test split as the files give it")
    _check_local_only(cfg)
    for option in ("n_sft", "n_train_pairs", "n_test_pairs"):
        _check(cfg, f"dataset.task.{option}", low=1, integer=True)
    _check(cfg, "dataset.task.seed", low=0, high=SEED_MAX, integer=True)
    _check(cfg, "dataset.task.bt_temperature", low=0, low_open=True)
    for option in ("path", "test_path"):
        if ds.get(option):
            _check_data_file(f"dataset.{option}", ds[option])


def _check_local_only(cfg: DictConfig) -> None:
    """``dataset.local_only`` (the ``scale=small`` dataset configs): the run reads local files, never the
    hub. A table whose data has no local sample (TL;DR) fails here, in one line naming the table, the
    data and the option to set; a missing sample names ``paths.data_dir``."""
    ds = cfg.dataset
    if not ds.get("local_only") or ds.name == "synthetic":
        return
    scale = f"scale={cfg.get('scale')}" if cfg.get("scale") else "dataset.local_only=true"
    table = f"paper table {cfg.paper_table}" if cfg.get("paper_table") else f"dataset={ds.name}"
    if not ds.get("path"):
        raise ConfigError(
            f"{scale}: {table} has no local data: no sample of {ds.name} ({ds.get('hub_id')}) is in paths.data_dir; "
            f"set dataset.path=<a local .json/.jsonl/.parquet file of {ds.name} rows in the hub schema> "
            "(and dataset.test_path=<its held-out file>, or its last rows are held out)")
    for option in ("path", "test_path"):
        value = ds.get(option)
        if value and not Path(str(value)).expanduser().exists():
            raise ConfigError(f"dataset.{option}={value!r}: no such file ({scale} reads the real data samples from "
                              f"paths.data_dir: set TISDPO_DATA or paths.data_dir=<the folder holding "
                              f"{Path(str(value)).name}>, or dataset.{option}=<the file>)")


def _check_pairs(cfg: DictConfig) -> None:
    """``dataset.pairs``: human, or pairs the SFT model generates (RLCD, pipeline/pairs_stage.py);
    a real dataset has no other source of contrastive pairs, so anything but human generates there."""
    _one_of(cfg, "dataset.pairs", ("human", "contrastive", "generated"))
    pairs = cfg.dataset.get("pairs", "human")
    if pairs == "human" or (pairs == "contrastive" and cfg.dataset.name == "synthetic"):
        return  # the built-in task samples contrastive pairs from its own prefixed distributions
    for option in ("max_new_tokens", "n_train", "n_test"):
        _check(cfg, f"dataset.generation.{option}", low=1, integer=True, nullable=True)
    _check(cfg, "dataset.generation.batch_size", low=1, integer=True)
    _check(cfg, "dataset.generation.temperature", low=0, note="0: greedy decoding")
    _check(cfg, "dataset.generation.top_p", low=0, high=1, low_open=True)
    template = _get(cfg, "dataset.generation.template")
    if template is not _ABSENT and not (isinstance(template, str) and "{system}" in template and "{prompt}" in template):
        raise ConfigError(f"dataset.generation.template={template!r} must be a string holding '{{system}}' and '{{prompt}}'")
    positive, negative = _get(cfg, "dataset.generation.positive_system"), _get(cfg, "dataset.generation.negative_system")
    if positive is not _ABSENT and positive == negative:
        raise ConfigError("dataset.generation.positive_system and negative_system are the same: the generated pairs "
                          "would have no contrast (RLCD labels the positive prompt's answer chosen)")


def _check_data_file(option: str, value: Any) -> None:
    path = Path(str(value)).expanduser()
    if not path.exists():
        raise ConfigError(f"{option}={value!r}: no such file")
    if path.is_dir():
        raise ConfigError(f"{option}={value!r} is a directory: give the data file itself "
                          f"({', '.join(LOCAL_DATA_SUFFIXES)})")
    if not path.name.lower().endswith(LOCAL_DATA_SUFFIXES):
        raise ConfigError(f"{option}={value!r}: unsupported file type; use one of {', '.join(LOCAL_DATA_SUFFIXES)}")


def _check_model(cfg: DictConfig) -> None:
    _check_path(cfg.model.get("name_or_path"), "model.name_or_path")
    _check_path(cfg.model.get("tokenizer"), "model.tokenizer")
    if cfg.dataset.name != "synthetic" and not (cfg.model.get("tokenizer") or cfg.model.get("name_or_path")):
        raise ConfigError(f"dataset={cfg.dataset.name} needs a tokenizer: set model.tokenizer or model.name_or_path")
    _check(cfg, "seed", low=0, high=SEED_MAX, integer=True)
    _check(cfg, "torch_threads", low=1, integer=True, nullable=True, note="null: torch's default, every core")


def _check_train(cfg: DictConfig) -> None:
    for option in ("batch_size", "eval_batch_size", "grad_accum", "logits_chunk_size"):
        _check(cfg, f"train.{option}", low=1, integer=True)
    _check(cfg, "train.max_steps", low=1, integer=True, nullable=True, note="null: train.epochs passes over the data")
    _check(cfg, "train.epochs", low=0, low_open=True, nullable=True)
    _check(cfg, "train.global_batch_size", low=1, integer=True, nullable=True,
           note="null: train.batch_size x devices x train.grad_accum")
    if _get(cfg, "train.max_steps") is None and not _get(cfg, "train.epochs"):
        raise ConfigError("train.max_steps=null needs train.epochs (how many passes over the training pairs)")
    global_batch = _get(cfg, "train.global_batch_size")
    if global_batch not in (_ABSENT, None) and int(global_batch) % int(cfg.train.batch_size):
        raise ConfigError(f"train.global_batch_size={global_batch} is not a multiple of train.batch_size="
                          f"{cfg.train.batch_size}")
    _check(cfg, "train.val_every_n_steps", low=0, integer=True, note="0: no validation during training")
    _check(cfg, "train.num_workers", low=0, integer=True)
    _check(cfg, "train.pad_to_multiple_of", low=1, integer=True, nullable=True)
    for option in ("check_finite", "reference_cache", "shared_prefix", "gradient_checkpointing", "group_by_length"):
        _flag(cfg, f"train.{option}")
    if _get(cfg, "train.validation") is not _ABSENT:
        _one_of(cfg, "train.validation", ("loss", "heldout"))


def _check_optim(cfg: DictConfig, node: str) -> None:
    """An optimiser node (optim, sft.optim, estimator.optim): lr, warm-up, schedule."""
    if _get(cfg, node) in (_ABSENT, None):
        return
    for option in (f"{node}.lr", f"{node}.optimizer.lr"):
        _check(cfg, option, low=0, low_open=True)
    _check(cfg, f"{node}.optimizer.weight_decay", low=0)
    _check(cfg, f"{node}.warmup_steps", low=0, integer=True)
    _one_of(cfg, f"{node}.schedule", ("constant", "linear", "cosine"))


def _check_sft(cfg: DictConfig) -> None:
    sft = cfg.get("sft") or {}
    if sft.get("max_length") is not None and _number("sft.max_length", sft.max_length, integer=True) < 2:
        raise ConfigError(f"sft.max_length={sft.max_length} leaves no room for a prompt and a response (>= 2)")
    _check(cfg, "sft.batch_size", low=1, integer=True)
    if not cfg.model.get("is_sft", False):  # the SFT stage runs
        _check(cfg, "sft.max_steps", low=1, integer=True, note="or model.is_sft=true to skip the SFT stage")
        _check_optim(cfg, "sft.optim")


def _check_loss(cfg: DictConfig) -> None:
    """The loss's own checks: its record's (each loss bounds its own hyperparameters: β > 0 for a
    preference margin, β ≥ 0 for GRPO's KL penalty)."""
    record = loss_record(cfg.loss)
    if record.check is not None:
        record.check(cfg)


def _check_estimator(cfg: DictConfig) -> None:
    """The estimator's own checks (its record); the optimiser of its model pair, when it trains one."""
    record = estimator_record(cfg.estimator.name)
    if record.check is not None:
        record.check(cfg)
    if record.pair_models is not None:
        _check_optim(cfg, "estimator.optim")


def _check_eval(cfg: DictConfig) -> None:
    ev = cfg.get("eval") or {}
    _check(cfg, "eval.max_new_tokens", low=1, integer=True, nullable=True,
           note="null: as long as the longest training response")
    if not ev.get("enabled", False):
        return
    _check(cfg, "eval.n_prompts", low=1, integer=True, note="with eval enabled; eval=none turns evaluation off")
    _check(cfg, "eval.samples_per_prompt", low=1, integer=True)
    if not (ev.get("name") == "benchmarks" and ev.get("batch_size") == "auto"):  # lm-eval sizes its own batches
        _check(cfg, "eval.batch_size", low=1, integer=True)
    _check(cfg, "eval.top_p", low=0, high=1, low_open=True, nullable=True)
    _check(cfg, "eval.every_n_steps", low=0, integer=True, note="0: no curve during training")
    _check(cfg, "eval.curve_n_prompts", low=1, integer=True)
    if _get(cfg, "eval.unfinished") is not _ABSENT:
        _one_of(cfg, "eval.unfinished", ("exclude", "penalize", "keep"))
    _check(cfg, "eval.unfinished_reward")
    temperatures = _get(cfg, "eval.temperatures")
    if temperatures is _ABSENT:
        return
    if not OmegaConf.is_list(temperatures) or len(temperatures) == 0:
        raise ConfigError(f"eval.temperatures={temperatures!r} must be a non-empty list, e.g. [1.0]")
    for i, value in enumerate(temperatures):
        if _number(f"eval.temperatures[{i}]", value, integer=False) < 0:
            raise ConfigError(f"eval.temperatures[{i}]={value} must be >= 0 (0: greedy decoding)")


def _check_generation_backends(cfg: DictConfig) -> None:
    """``eval.generation`` and ``dataset.generation``: the sampling backend (hf, or vllm: an engine on a
    model directory, tisdpo/eval/vllm_backend.py) and the vLLM engine's size."""
    for node in ("eval.generation", "dataset.generation"):
        _one_of(cfg, f"{node}.backend", ("hf", "vllm"))
        _check(cfg, f"{node}.gpu_memory_utilization", low=0, high=1, low_open=True, nullable=True,
               note="the share of the GPU's memory vLLM takes")
        _check(cfg, f"{node}.tensor_parallel_size", low=1, integer=True, nullable=True)
    evaluates = (cfg.get("eval") or {}).get("enabled", False)
    if evaluates and _get(cfg, "eval.generation.backend") == "vllm" and _get(cfg, "export.enabled") is False:
        raise ConfigError("eval.generation.backend=vllm samples from the exported policy <run dir>/policy: "
                          "keep export.enabled=true")


def _check_run_options(cfg: DictConfig) -> None:
    for option in ("every_n_steps", "stage_every_n_steps"):
        _check(cfg, f"checkpoint.{option}", low=0, integer=True, note="0: off")
    _flag(cfg, "checkpoint.keep_all")
    resume = cfg.get("resume")
    if resume not in (None, False, True) and str(resume).lower() not in ("true", "false", "none", "null", ""):
        if not Path(str(resume)).expanduser().exists():
            raise ConfigError(f"resume={resume!r}: no such run dir or checkpoint (resume=true continues the current "
                              "run dir, resume=<run dir> continues that run)")


def _check_trainer(cfg: DictConfig) -> None:
    """Keys that reached the trainer node anyway (``+trainer.max_steps=5``, a yaml file)."""
    trainer = cfg.get("trainer") or {}
    for key in trainer:
        problem = trainer_key_problem(str(key), trainer[key])
        if problem:
            raise ConfigError(problem)
