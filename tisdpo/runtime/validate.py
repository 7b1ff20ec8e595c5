"""Config checks that run before any model or dataset loads: one clear line per mistake.

Every value that would train nonsense without complaint (``loss.beta=0``, a NaN learning rate,
``eval.n_prompts=0``) or fail deep inside with a traceback (``seed=-1``) is refused here, as a
:class:`ConfigError` naming the option, its value and the valid range. ``run.py`` also calls
:func:`override_problem` on the command line before Hydra composes: Lightning Trainer keys the
pipeline sets itself (``trainer.max_steps``) fail Hydra's struct check with no hint otherwise.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tisdpo.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Which estimators each weighted loss can use; every other loss takes no weights.
COMPATIBLE_ESTIMATORS = {
    "tisdpo": ("prompt", "sft_pair", "dpo_pair", "random", "uniform", "oracle"),
    "tidpo": ("gradient", "uniform", "random"),
}

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

# Names of the losses (tisdpo.losses.LOSSES), dataset adapters (tisdpo.data.ADAPTERS) and weight
# transforms (tisdpo.weights.transforms.TRANSFORMS), written out so that this module imports no
# torch: run.py calls it before Hydra composes, and `--help` must stay instant.
# tests/test_config_values.py checks they agree with the registries.
LOSS_NAMES = ("dpo", "ipo", "kto", "tdpo", "tidpo", "tisdpo")
DATASET_NAMES = ("hh", "pku_saferlhf", "tldr", "ultrafeedback")
TRANSFORM_NAMES = ("exp_clamp", "rank_linear", "clamp_linear")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".parquet")
SEED_MAX = 2**32 - 1  # numpy and Lightning's seed_everything take 32-bit seeds

_ABSENT = object()


class ConfigError(UserError):
    """A config value that cannot work: one line naming the option, exit status 2."""


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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


# ---------------------------------------------------------------------------------------
# value helpers: each names the option, its value and the valid range
# ---------------------------------------------------------------------------------------
def _get(cfg: DictConfig, option: str) -> Any:
    """The value at a dotted option, or _ABSENT when this config has no such key."""
    return OmegaConf.select(cfg, option, default=_ABSENT)


def _number(option: str, value: Any, *, integer: bool) -> float | int:
    kind = "a whole number" if integer else "a number"
    # bools are ints in Python, and "true" for a step count is a typo, not 1
    if value is None or isinstance(value, bool):
        raise ConfigError(f"{option}={value!r} must be {kind}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}={value!r} must be {kind}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{option}={value} must be a finite number")
    if integer:
        if number != int(number):
            raise ConfigError(f"{option}={value} must be {kind}")
        return int(number)
    return number


def _check(cfg: DictConfig, option: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False,
           nullable: bool = False, note: str = "") -> None:
    """``option`` is a number within [low, high] (open ends where asked); absent keys pass."""
    value = _get(cfg, option)
    if value is _ABSENT or (value is None and nullable):
        return
    number = _number(option, value, integer=integer)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise ConfigError(f"{option}={value} must be {_range_text(low, high, low_open, high_open, nullable)}"
                          + (f" ({note})" if note else ""))


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _range_text(low, high, low_open: bool, high_open: bool, nullable: bool) -> str:
    if low is not None and high is not None:
        text = f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{'>' if low_open else '>='} {_show(low)}"
    else:
        text = f"{'<' if high_open else '<='} {_show(high)}"
    return f"null or {text}" if nullable else text


def _one_of(cfg: DictConfig, option: str, choices: tuple) -> None:
    value = _get(cfg, option)
    if value is not _ABSENT and value not in choices:
        raise ConfigError(f"{option}={value!r} is not one of {', '.join(map(str, choices))}")


def _flag(cfg: DictConfig, option: str) -> None:
    value = _get(cfg, option)
    if value is not _ABSENT and value is not None and not isinstance(value, bool):
        raise ConfigError(f"{option}={value!r} must be true or false")


def _check_path(value, option: str) -> None:
    if value and not Path(str(value)).expanduser().exists() and str(value).startswith((".", "/", "~")):
        raise ConfigError(f"{option}={value!r}: no such file or directory")


# ---------------------------------------------------------------------------------------
# the groups
# ---------------------------------------------------------------------------------------
def _check_choices(cfg: DictConfig) -> None:
    loss, estimator = cfg.loss.name, cfg.estimator.name
    if loss not in LOSS_NAMES:
        raise ConfigError(f"loss={loss!r} is not one of {sorted(LOSS_NAMES)}")
    estimators = [c for c in group_choices("estimator") if not c.startswith("_")]
    if estimator not in estimators:
        raise ConfigError(f"estimator.name={estimator!r} is not one of {', '.join(estimators)}")
    if loss in COMPATIBLE_ESTIMATORS:
        valid = COMPATIBLE_ESTIMATORS[loss]
        if estimator == "none":
            raise ConfigError(f"loss={loss} needs token weights: add estimator=<one of {', '.join(valid)}>")
        if estimator not in valid:
            raise ConfigError(f"estimator={estimator} cannot be used with loss={loss}; valid: {', '.join(valid)}")
    elif estimator != "none":
        raise ConfigError(
            f"estimator={estimator} has no effect with loss={loss}: only {', '.join(COMPATIBLE_ESTIMATORS)} use token "
            "weights (drop the estimator, or use loss=tisdpo / loss=tidpo)"
        )


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
    for option in ("n_sft", "n_train_pairs", "n_test_pairs"):
        _check(cfg, f"dataset.task.{option}", low=1, integer=True)
    _check(cfg, "dataset.task.seed", low=0, high=SEED_MAX, integer=True)
    _check(cfg, "dataset.task.bt_temperature", low=0, low_open=True)
    for option in ("path", "test_path"):
        if ds.get(option):
            _check_data_file(f"dataset.{option}", ds[option])


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
    name = cfg.loss.name
    # beta scales the log-ratio margin: 0 ignores the data, < 0 prefers the rejected response
    # (IPO's target margin is 1/(2 beta))
    _check(cfg, "loss.beta", low=0, low_open=True, note="the strength of the KL constraint")
    _check(cfg, "loss.label_smoothing", low=0, high=0.5, high_open=True,
           note="the assumed share of flipped labels; 0.5 would learn nothing")
    _check(cfg, "loss.alpha", low=0, note="the weight of the KL term")
    if name == "tdpo":
        _one_of(cfg, "loss.variant", ("tdpo1", "tdpo2"))
    if name == "tidpo":
        _one_of(cfg, "loss.base", ("dpo", "tdpo2"))
        _check_triplet(cfg)
    if name == "tisdpo":
        _flag(cfg, "loss.use_eta")
    if name == "kto":
        for option in ("desirable_weight", "undesirable_weight"):
            _check(cfg, f"loss.{option}", low=0, low_open=True)
    if name == "ipo":
        _flag(cfg, "loss.average_log_prob")


def _check_triplet(cfg: DictConfig) -> None:
    _check(cfg, "loss.triplet.gamma", low=0, note="the weight of the triplet term; 0 turns it off")
    _check(cfg, "loss.triplet.margin", low=0)
    _check(cfg, "loss.triplet.anchor_every", low=1, integer=True)
    _check(cfg, "loss.triplet.max_new_tokens", low=1, integer=True)
    _check(cfg, "loss.triplet.top_k", low=0, integer=True, note="0: no top-k filter")
    _check(cfg, "loss.triplet.top_p", low=0, high=1, low_open=True)
    _check(cfg, "loss.triplet.temperature", low=0, low_open=True, note="anchors are sampled")


def _check_estimator(cfg: DictConfig) -> None:
    name = cfg.estimator.name
    if name in ("dpo_pair", "sft_pair", "prompt"):
        _check(cfg, "estimator.score_batch_size", low=1, integer=True)
        _check_transform(cfg)
    if name in ("dpo_pair", "sft_pair"):
        _check(cfg, "estimator.max_steps", low=1, integer=True, nullable=name == "dpo_pair",
               note="null: estimator.epochs passes, as the run's own training")
        _check(cfg, "estimator.batch_size", low=1, integer=True)
        _check_optim(cfg, "estimator.optim")
    if name == "dpo_pair":
        _check(cfg, "estimator.beta", low=0, low_open=True, note="the strength of the KL constraint")
    if name == "sft_pair":
        _one_of(cfg, "estimator.init", ("base", "sft"))
    if name == "gradient":
        _check(cfg, "estimator.lam", low=0, high=1, note="1: no prior, 0: prior only")
        _one_of(cfg, "estimator.normalize", ("response", "sequence"))
        _check(cfg, "estimator.quality_every_n_steps", low=0, integer=True)
    if name == "random":
        _check_low_high(cfg, "estimator")


def _check_low_high(cfg: DictConfig, node: str) -> None:
    """Token weights in [low, high]: non-negative, and low <= high."""
    _check(cfg, f"{node}.low", low=0, note="token weights are non-negative")
    _check(cfg, f"{node}.high", low=0, note="token weights are non-negative")
    low, high = _get(cfg, f"{node}.low"), _get(cfg, f"{node}.high")
    if low is not _ABSENT and high is not _ABSENT and float(low) > float(high):
        raise ConfigError(f"{node}.low={low} must be <= {node}.high={high}")


def _check_transform(cfg: DictConfig) -> None:
    if _get(cfg, "estimator.transform") in (_ABSENT, None):
        return
    _one_of(cfg, "estimator.transform.name", TRANSFORM_NAMES)
    node = f"estimator.transform.{cfg.estimator.transform.name}"
    if cfg.estimator.transform.name == "exp_clamp":
        _check(cfg, f"{node}.k", low=0, low_open=True, note="the weight scale")
        _check(cfg, f"{node}.mu", low=0)
        for option in ("lower", "upper"):
            _check(cfg, f"{node}.{option}", integer=False)
        lower, upper = _get(cfg, f"{node}.lower"), _get(cfg, f"{node}.upper")
        if lower is not _ABSENT and upper is not _ABSENT and float(lower) > float(upper):
            raise ConfigError(f"{node}.lower={lower} must be <= {node}.upper={upper}")
        _flag(cfg, f"{node}.rescale_mean_one")
    else:
        _check_low_high(cfg, node)
        if cfg.estimator.transform.name == "clamp_linear":
            _check(cfg, f"{node}.bound", low=0, low_open=True)


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
