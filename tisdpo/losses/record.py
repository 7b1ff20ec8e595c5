"""One record per loss: everything the rest of the system asks of it, beside its pure function.

A loss file ``tisdpo/losses/<name>.py`` holds the pure function (formula in its docstring) and a
module-level ``RECORD = LossRecord(...)``; ``conf/loss/<name>.yaml`` names the function as its
``_target_``. The registry (``registry.py``) finds the record through that ``_target_``, so a new
loss is those two files and nothing else.

What a record answers:
- ``kl(hparams)``: which per-position KL the loss needs with these hyperparameters (None, or
  ``REF_POLICY`` = KL(π_ref‖π_θ) as TDPO, ``POLICY_REF`` = KL(π_θ‖π_ref) as TIS-DPO's η);
- ``token_weights``: the kinds of token weights it takes (``OFFLINE`` scores attached to the data,
  ``ONLINE`` weights computed from the policy each step); an estimator fits a loss by kind;
- ``reference_free``: the loss ignores the reference (SimPO): no reference log-prob pass;
- ``extra_inputs(ctx)``: more keyword inputs computed each step (KTO's mismatched-pair reference point);
- ``auxiliary(node, tokenizer, chunk_size)``: a term added to the loss each step (TI-DPO's triplet),
  built once from the loss's config node; None when the node turns it off;
- ``check(cfg)``: its hyperparameter checks (one ``ConfigError`` line each, ``tisdpo.checks``);
- ``config_keys``: keys of its config node that are not arguments of the function;
- ``pairwise``: False for a method that does not train on preference pairs (GRPO, online).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

REF_POLICY = "ref_policy"   # KL(π_ref‖π_θ) = per_position_kl(ref_logits, policy_logits)   (TDPO)
POLICY_REF = "policy_ref"   # KL(π_θ‖π_ref) = per_position_kl(policy_logits, ref_logits)   (TIS-DPO η)
OFFLINE = "offline"         # weights from scores computed before training, attached to the examples
ONLINE = "online"           # weights computed from the current policy every step


def no_kl(hparams: Mapping[str, Any]) -> Optional[str]:
    return None


@dataclass(frozen=True)
class StepContext:
    """What a loss's hooks (and online token weights) may see of one training step.

    ``policy_logps``/``reference_logps``/``mask`` are [2B, T] (chosen rows first) once computed;
    ``strategy`` is Lightning's (collective decisions under FSDP); ``step`` the optimiser step.
    """

    policy: Any
    reference: Any
    batch: Mapping[str, Any]
    step: int
    strategy: Any = None
    pad_token_id: int = 0
    chunk_size: int = 256
    policy_logps: Any = None
    reference_logps: Any = None
    mask: Any = None

    @property
    def batch_size(self) -> int:
        return int(self.batch["chosen_input_ids"].shape[0])


@dataclass(frozen=True)
class LossRecord:
    fn: Callable[..., tuple]
    kl: Callable[[Mapping[str, Any]], Optional[str]] = no_kl
    token_weights: frozenset = frozenset()
    weights_required: bool = False
    reference_free: bool = False
    extra_inputs: Optional[Callable[[StepContext], dict]] = None
    auxiliary: Optional[Callable[..., Optional[Callable[[StepContext], tuple]]]] = None
    check: Optional[Callable[[Any], None]] = None
    config_keys: tuple[str, ...] = ()
    pairwise: bool = True    # False: not a preference-pair loss (GRPO trains online from samples)


@dataclass
class BoundLoss:
    """A configured loss: the record, its function with the hyperparameters bound, and what the
    record's questions answer for these hyperparameters."""

    name: str
    fn: Callable[..., tuple]
    record: Optional[LossRecord] = None   # None: a plain log-prob loss (the estimator models' DPO)
    kl_direction: Optional[str] = None
    auxiliary: Optional[Callable[[StepContext], tuple]] = None

    @property
    def uses_weights(self) -> bool:
        return self.record is not None and bool(self.record.token_weights)

    @property
    def reference_free(self) -> bool:
        return self.record is not None and self.record.reference_free

    @property
    def extra_inputs(self) -> Optional[Callable[[StepContext], dict]]:
        return self.record.extra_inputs if self.record is not None else None

    @property
    def needs_reference_model(self) -> bool:
        """True when something beyond the per-token log-probs runs the reference every step
        (a KL term, KTO's mismatched pairs, the triplet anchors): cached log-probs do not suffice."""
        return self.kl_direction is not None or self.extra_inputs is not None or self.auxiliary is not None
