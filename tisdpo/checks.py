"""Config value checks that name the option, its value and the valid range in one line.

Torch-free and Hydra-free beyond OmegaConf, so ``run.py`` and every loss or estimator record can
use them before anything heavy loads. Each check passes when the option is absent: a record
checks the keys its own config node has.
"""
from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tisdpo.errors import UserError

ABSENT = object()


class ConfigError(UserError):
    """A config value that cannot work: one line naming the option, exit status 2."""


def get(cfg: DictConfig, option: str) -> Any:
    """The value at a dotted option, or ABSENT when this config has no such key."""
    return OmegaConf.select(cfg, option, default=ABSENT)


def number(option: str, value: Any, *, integer: bool) -> float | int:
    kind = "a whole number" if integer else "a number"
    # bools are ints in Python, and "true" for a step count is a typo, not 1
    if value is None or isinstance(value, bool):
        raise ConfigError(f"{option}={value!r} must be {kind}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}={value!r} must be {kind}") from None
    if not math.isfinite(as_float):
        raise ConfigError(f"{option}={value} must be a finite number")
    if integer:
        if as_float != int(as_float):
            raise ConfigError(f"{option}={value} must be {kind}")
        return int(as_float)
    return as_float


def in_range(cfg: DictConfig, option: str, *, low: float | None = None, high: float | None = None,
             low_open: bool = False, high_open: bool = False, integer: bool = False,
             nullable: bool = False, note: str = "") -> None:
    """``option`` is a number within [low, high] (open ends where asked); absent keys pass."""
    value = get(cfg, option)
    if value is ABSENT or (value is None and nullable):
        return
    found = number(option, value, integer=integer)
    below = low is not None and (found <= low if low_open else found < low)
    above = high is not None and (found >= high if high_open else found > high)
    if below or above:
        raise ConfigError(f"{option}={value} must be {range_text(low, high, low_open, high_open, nullable)}"
                          + (f" ({note})" if note else ""))


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def range_text(low, high, low_open: bool, high_open: bool, nullable: bool) -> str:
    if low is not None and high is not None:
        text = f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{'>' if low_open else '>='} {_show(low)}"
    else:
        text = f"{'<' if high_open else '<='} {_show(high)}"
    return f"null or {text}" if nullable else text


def one_of(cfg: DictConfig, option: str, choices: tuple) -> None:
    value = get(cfg, option)
    if value is not ABSENT and value not in choices:
        raise ConfigError(f"{option}={value!r} is not one of {', '.join(map(str, choices))}")


def flag(cfg: DictConfig, option: str) -> None:
    value = get(cfg, option)
    if value is not ABSENT and value is not None and not isinstance(value, bool):
        raise ConfigError(f"{option}={value!r} must be true or false")


def low_high(cfg: DictConfig, node: str, *, allow_negative: bool = False) -> None:
    """Token weights in [low, high], low <= high; non-negative unless ``allow_negative``."""
    bound = None if allow_negative else 0
    note = "" if allow_negative else "token weights are non-negative"
    in_range(cfg, f"{node}.low", low=bound, note=note)
    in_range(cfg, f"{node}.high", low=bound, note=note)
    low, high = get(cfg, f"{node}.low"), get(cfg, f"{node}.high")
    if low is not ABSENT and high is not ABSENT and float(low) > float(high):
        raise ConfigError(f"{node}.low={low} must be <= {node}.high={high}")
