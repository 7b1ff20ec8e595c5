"""Methods by name: the ``conf/loss`` and ``conf/estimator`` groups are the only lists.

A loss is found through its yaml's ``_target_`` (``tisdpo.losses.<file>.<function>``): the module
that defines the function holds ``RECORD`` (``tisdpo.losses.record.LossRecord``). An estimator
``<name>`` is the module ``tisdpo.weights.estimators.<name>`` and its ``ESTIMATOR``
(``tisdpo.weights.estimators.record.EstimatorRecord``). Records are imported on demand, so this
module stays light: ``run.py`` and config validation use it before torch loads.
"""
from __future__ import annotations

import importlib
from typing import Any

from tisdpo.checks import ConfigError
from tisdpo.constants import CONF_DIR

ESTIMATOR_PACKAGE = "tisdpo.weights.estimators"


def group_names(group: str) -> list[str]:
    """The choices of a config group: its yaml files (``_``-prefixed files are shared parts)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def _import(module_name: str, option: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the module exists but one of its own imports is missing
            raise
        raise ConfigError(f"{option}: no module {module_name}") from None


def loss_record(loss_cfg) -> Any:
    """The ``RECORD`` of the module that defines the loss node's ``_target_``."""
    target = str(loss_cfg.get("_target_") or "")
    if "." not in target:
        raise ConfigError(f"loss={loss_cfg.get('name')!r}: its yaml needs `_target_: tisdpo.losses.<file>.<function>`")
    module_name = target.rsplit(".", 1)[0]
    record = getattr(_import(module_name, f"loss._target_={target}"), "RECORD", None)
    if record is None or not hasattr(record, "fn"):
        raise ConfigError(f"loss._target_={target}: {module_name} defines no `RECORD = LossRecord(...)`")
    return record


def estimator_record(name: str) -> Any:
    """The ``ESTIMATOR`` of ``tisdpo.weights.estimators.<name>``."""
    module_name = f"{ESTIMATOR_PACKAGE}.{name}"
    record = getattr(_import(module_name, f"estimator={name}"), "ESTIMATOR", None)
    if record is None or not hasattr(record, "kind"):
        raise ConfigError(f"estimator={name}: {module_name} defines no `ESTIMATOR = EstimatorRecord(...)`")
    return record
