"""Config checks that run before any model or dataset loads: one clear line per mistake."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tisdpo.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Which estimators each weighted loss can use; every other loss takes no weights.
COMPATIBLE_ESTIMATORS = {
    "tisdpo": ("prompt", "sft_pair", "dpo_pair", "random", "uniform"),
    "tidpo": ("gradient", "uniform", "random"),
}


class ConfigError(UserError):
    """A config value that cannot work: one line naming the option, exit status 2."""


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_path(value, option: str) -> None:
    if value and not Path(str(value)).expanduser().exists() and str(value).startswith((".", "/", "~")):
        raise ConfigError(f"{option}={value!r}: no such file or directory")


def validate_config(cfg: DictConfig) -> None:
    from tisdpo.losses import LOSSES

    loss, estimator = cfg.loss.name, cfg.estimator.name
    if loss not in LOSSES:
        raise ConfigError(f"loss={loss!r} is not one of {sorted(LOSSES)}")
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
    ds = cfg.dataset
    from tisdpo.data.adapters import ADAPTERS

    datasets = ["synthetic", *sorted(ADAPTERS)]
    if ds.name not in datasets:
        raise ConfigError(f"dataset.name={ds.name!r} is not one of {', '.join(datasets)}")
    if not 0 < int(ds.max_prompt_length) < int(ds.max_length):
        raise ConfigError(
            f"dataset.max_prompt_length={ds.max_prompt_length} must be positive and below dataset.max_length={ds.max_length}"
        )
    if not 0.0 <= float(ds.get("label_noise") or 0.0) <= 1.0:
        raise ConfigError(f"dataset.label_noise={ds.label_noise} must be a share in [0, 1]")
    if ds.get("truncation_mode") not in ("keep_end", "keep_start"):
        raise ConfigError(f"dataset.truncation_mode={ds.get('truncation_mode')!r} is not one of keep_end, keep_start")
    for option in ("path", "test_path"):
        if ds.get(option):
            if not Path(str(ds[option])).expanduser().exists():
                raise ConfigError(f"dataset.{option}={ds[option]!r}: no such file")
    _check_path(cfg.model.get("name_or_path"), "model.name_or_path")
    _check_path(cfg.model.get("tokenizer"), "model.tokenizer")
    if cfg.dataset.name != "synthetic" and not (cfg.model.get("tokenizer") or cfg.model.get("name_or_path")):
        raise ConfigError(f"dataset={cfg.dataset.name} needs a tokenizer: set model.tokenizer or model.name_or_path")
    if int(cfg.train.batch_size) < 1 or int(cfg.train.max_steps) < 1:
        raise ConfigError("train.batch_size and train.max_steps must be >= 1")
    _check_lengths(cfg)
    _check_run_options(cfg)


def _check_lengths(cfg: DictConfig) -> None:
    """Lengths and sizes that leave nothing to train on (dataset lengths are checked above)."""
    sft = cfg.get("sft") or {}
    if sft.get("max_length") is not None and int(sft.max_length) < 2:
        raise ConfigError(f"sft.max_length={sft.max_length} leaves no room for a prompt and a response (>= 2)")
    for option, value in (("sft.batch_size", sft.get("batch_size")), ("train.eval_batch_size", cfg.train.get("eval_batch_size")),
                          ("eval.max_new_tokens", (cfg.get("eval") or {}).get("max_new_tokens"))):
        if value is not None and int(value) < 1:
            raise ConfigError(f"{option}={value} must be >= 1")


def _check_run_options(cfg: DictConfig) -> None:
    if int(cfg.train.get("grad_accum", 1)) < 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} must be >= 1")
    checkpoint = cfg.get("checkpoint") or {}
    for option in ("every_n_steps", "stage_every_n_steps"):
        if checkpoint.get(option) is not None and int(checkpoint[option]) < 0:
            raise ConfigError(f"checkpoint.{option}={checkpoint[option]} must be >= 0 (0: off)")
    resume = cfg.get("resume")
    if resume not in (None, False, True) and str(resume).lower() not in ("true", "false", "none", "null", ""):
        if not Path(str(resume)).expanduser().exists():
            raise ConfigError(f"resume={resume!r}: no such run dir or checkpoint (resume=true continues the current "
                              "run dir, resume=<run dir> continues that run)")
