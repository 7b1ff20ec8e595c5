"""LoRA through ``peft``: the policy trains adapters only; the reference is the same module with
the adapters disabled, so the weights exist once in memory.

``model.lora`` (null = full fine-tuning)::

    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}

``policy_and_reference(policy, model.lora)`` returns the (possibly wrapped) policy and its
reference: a frozen deep copy without LoRA, an :class:`AdapterDisabledReference` view with it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from tisdpo.models.loading import frozen_copy

DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "bias": "none"}


def lora_config(options: Mapping[str, Any]):
    from peft import LoraConfig, TaskType

    unknown = sorted(set(options) - set(DEFAULTS) - {"modules_to_save"})
    if unknown:
        raise ValueError(f"model.lora has unknown option(s) {unknown}; valid: {sorted(DEFAULTS)} + modules_to_save")
    o = {**DEFAULTS, **dict(options)}
    target = o["target_modules"]
    if not isinstance(target, str):
        target = list(target)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=int(o["r"]), lora_alpha=float(o["alpha"]), lora_dropout=float(o["dropout"]),
        target_modules=target, bias=str(o["bias"]), modules_to_save=o.get("modules_to_save"),
    )


def apply_lora(model, options: Mapping[str, Any]):
    """``model`` wrapped in a peft ``PeftModelForCausalLM``: base weights frozen, adapters trainable."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(options))


class AdapterDisabledReference:
    """The frozen reference of a LoRA policy: the policy itself, adapters disabled, no grad, eval mode.

    Quacks like the model for what the pipeline asks of a reference (``__call__``, ``forward``,
    ``generate``, ``parameters``, ``device``, ``config``...): every call runs inside
    ``policy.disable_adapter()`` with dropout off, restoring the policy's train/eval mode after.
    ``to``/``eval``/``train``/``requires_grad_`` are no-ops: the policy's own device and mode
    belong to the training loop. Holds no tensor of its own.
    """

    def __init__(self, policy):
        if not hasattr(policy, "disable_adapter"):
            raise TypeError(f"{type(policy).__name__} has no disable_adapter(): not a peft model")
        object.__setattr__(self, "policy", policy)

    @contextlib.contextmanager
    def _base(self):
        policy = self.policy
        was_training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter(), torch.no_grad():
                yield policy
        finally:
            policy.train(was_training)

    def __call__(self, *args, **kwargs):
        with self._base() as policy:
            return policy(*args, **kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        with self._base() as policy:
            return policy.generate(*args, **kwargs)

    # the reference is frozen and follows the policy: nothing to move, nothing to switch
    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    @property
    def training(self) -> bool:
        return False

    def parameters(self, recurse: bool = True):
        """The base weights (shared with the policy; the adapters are not part of the reference)."""
        return (p for name, p in self.policy.named_parameters(recurse=recurse) if "lora_" not in name)

    def __getattr__(self, name):
        if name == "policy" or name.startswith("__"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.policy, name)

    def __setattr__(self, name, value):
        raise AttributeError(f"the LoRA reference is a read-only view of the policy (tried to set {name!r})")


def policy_and_reference(policy, lora_options: Mapping[str, Any] | None, reference_dtype: torch.dtype | None = None):
    """(policy, reference): full fine-tuning -> (policy, frozen deep copy, stored in ``reference_dtype``
    when given: a frozen model needs no fp32 master copy); LoRA -> (peft policy, disabled-adapter view)."""
    if not lora_options:
        reference = frozen_copy(policy)
        return policy, reference.to(reference_dtype) if reference_dtype is not None else reference
    policy = apply_lora(policy, lora_options)
    return policy, AdapterDisabledReference(policy)


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
