"""Preference optimisation: a trainable policy against a frozen reference.

One step: chosen and rejected go through the policy in ONE forward pass ([2B, T]; for losses
that need only log-probs, optionally one packed row per pair so the prompt runs once, see
``tisdpo.kernels.shared_prefix``); the reference runs under ``no_grad`` (or its per-token log-probs come precomputed with the batch);
per-token log-probs are gathered over response tokens; the loss comes from
``tisdpo.losses`` and sees only per-token tensors. Metrics use TRL's names so that runs
can be compared side by side with TRL's DPOTrainer in W&B.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from tisdpo.data.collate import concat_pair
from tisdpo.kernels.logprobs import head_position_kl, head_token_logps, per_position_kl, token_logps
from tisdpo.kernels.scoring import chunked_head, last_hidden, output_head
from tisdpo.losses.record import BoundLoss, StepContext
from tisdpo.models.sharding import finish_backward, is_sharded
from tisdpo.modules.optim import last_checkpoint_note
from tisdpo.modules.policy import PolicyModule
from tisdpo.kernels.shared_prefix import PackedPairs, pack_pairs, packed_logps, packing_matches, packing_supported

log = logging.getLogger(__name__)

VALIDATION_MODES = ("loss", "heldout")
# The sums a validation pass accumulates over its held-out pairs (per rank; summed over ranks at the
# end of the pass): the metrics are ratios of these, never means of per-batch means.
SUMS = ("n_pairs", "rewards_correct", "logps_correct", "rewards_chosen", "rewards_rejected", "logps_chosen",
        "logps_rejected", "kl_chosen", "kl_rejected", "kl_tokens", "kl_pairs")


def wilson_interval(successes: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% at the default z):

        centre = (k + z²/2) / (n + z²),  half = z √(k(n − k)/n + z²/4) / (n + z²)

    for k successes in n trials; (0, 1) when n is 0. Unlike the normal approximation it stays inside
    [0, 1] and is not degenerate at 0% or 100% (an accuracy of 0 at step 0, where every implicit
    reward is 0, still gets an interval)."""
    if n <= 0:
        return 0.0, 1.0
    k = min(max(float(successes), 0.0), float(n))
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z * math.sqrt(k * (n - k) / n + z2 / 4) / (n + z2)
    return max(0.0, centre - half), min(1.0, centre + half)


def heldout_metrics(sums: dict[str, float], *, rewards: bool = True) -> dict[str, float]:
    """val/... metrics from the sums of one validation pass over all its held-out pairs.

    Always: ``val/n_pairs`` and the Wilson 95% intervals ``val/{rewards,logps}/accuracy_ci_low|high``.
    With ``rewards`` (``train.validation=heldout``; the loss's own metrics otherwise): the means
    ``val/rewards/{chosen,rejected,margins,accuracies}``, ``val/logps/{chosen,rejected,accuracies}``
    and, when the pass had the reference's distribution, ``val/kl_to_ref/{chosen,rejected,per_token}``."""
    n = float(sums.get("n_pairs", 0.0))
    out: dict[str, float] = {"val/n_pairs": n}
    if n <= 0:
        return out
    for name in ("rewards", "logps"):
        low, high = wilson_interval(sums[f"{name}_correct"], n)
        out[f"val/{name}/accuracy_ci_low"], out[f"val/{name}/accuracy_ci_high"] = low, high
    if not rewards:
        return out
    out.update({
        "val/rewards/chosen": sums["rewards_chosen"] / n,
        "val/rewards/rejected": sums["rewards_rejected"] / n,
        "val/rewards/margins": (sums["rewards_chosen"] - sums["rewards_rejected"]) / n,
        "val/rewards/accuracies": sums["rewards_correct"] / n,
        "val/logps/chosen": sums["logps_chosen"] / n,
        "val/logps/rejected": sums["logps_rejected"] / n,
        "val/logps/accuracies": sums["logps_correct"] / n,
    })
    if sums.get("kl_pairs", 0.0) >= n:
        out["val/kl_to_ref/chosen"] = sums["kl_chosen"] / n
        out["val/kl_to_ref/rejected"] = sums["kl_rejected"] / n
        out["val/kl_to_ref/per_token"] = (sums["kl_chosen"] + sums["kl_rejected"]) / max(sums["kl_tokens"], 1.0)
    return out


class PreferenceModule(PolicyModule):
    def __init__(
        self,
        policy,
        reference,
        loss: BoundLoss,
        optim_cfg: Any,
        total_steps: int | None = None,
        logits_chunk_size: int = 256,
        check_finite: bool = True,
        online_weights: Callable | None = None,
        pad_token_id: int = 0,
        shared_prefix: bool = False,
        head_chunks: bool = True,
        validation: str = "loss",
        val_beta: float = 0.1,
        reference_head: torch.Tensor | None = None,
    ):
        super().__init__(policy, reference, loss, optim_cfg, total_steps=total_steps,
                         logits_chunk_size=logits_chunk_size, check_finite=check_finite)
        # What validation measures (train.validation): "loss" = the training loss and its own metrics on
        # the held-out pairs; "heldout" = the loss-free held-out metrics of heldout_sums (same for every
        # method). Both end with the Wilson intervals over all pairs (on_validation_epoch_end).
        if validation not in VALIDATION_MODES:
            raise ValueError(f"validation={validation!r} is not one of {', '.join(VALIDATION_MODES)}")
        self.validation = validation
        self.val_beta = float(val_beta)
        # The reference's output head [V, H] (heldout: its logits from the cached hidden states, for the
        # KL); kept out of the module's parameters and state dict like the reference.
        object.__setattr__(self, "reference_head", reference_head)
        self._val_sums: dict[str, float] = {}
        self.online_weights = online_weights  # TI-DPO: weights from the current policy each step
        self.pad_token_id = pad_token_id
        # Log-prob-only losses: chosen and rejected packed into one row per pair, the prompt run
        # once (tisdpo.kernels.shared_prefix); checked against the standard forward on first use.
        self.shared_prefix = shared_prefix
        self._packing_checked = False
        # Log-probs and KL from the last hidden states through the output head in chunks (forward and
        # backward): the [2B, T, V] logits never exist (kernels/logprobs.head_token_logps). Where the
        # model allows it (output_head); else the full logits and the chunked logits kernels.
        self.head_chunks = head_chunks

    def _head(self, model, batch) -> torch.Tensor | None:
        if not self.head_chunks or model is None or is_sharded(model):
            return None
        return chunked_head(model, concat_pair(batch, "input_ids"))

    def forward_hidden(self, model, batch) -> torch.Tensor:
        return last_hidden(model, concat_pair(batch, "input_ids"), concat_pair(batch, "attention_mask"))

    # -- forward -----------------------------------------------------------------------
    def forward_logits(self, model, batch) -> torch.Tensor:
        return model(
            input_ids=concat_pair(batch, "input_ids"),
            attention_mask=concat_pair(batch, "attention_mask"),
            use_cache=False,
        ).logits

    def packed_pairs(self, batch: dict[str, torch.Tensor]) -> PackedPairs | None:
        """The batch packed for the shared-prefix forward; None when off, for KL losses (they need
        full logits), when a pair's prompts differ, or when the model failed the first-use check."""
        if not self.shared_prefix or self.loss.kl_direction is not None:
            return None
        if self._head(self.policy, batch) is not None:
            return None  # a real vocabulary: the chunked head (no [B, T, V] logits) beats running the prompt once
        packed = pack_pairs(batch, self.pad_token_id)
        if packed is not None and not self._packing_checked:
            self._packing_checked = True
            was_training = self.policy.training
            self.policy.eval()  # no dropout in the comparison
            try:
                ok, why = packing_supported(self.policy), "flash attention or a sliding window"
                if ok:
                    ok, diff = packing_matches(self.policy, batch, packed, self.chunk)
                    why = f"packed log-probs differ from the standard forward by {diff:.3g}"
            except Exception as error:  # noqa: BLE001 (a model that rejects the packed inputs)
                ok, why = False, f"{type(error).__name__}: {error}"
            finally:
                self.policy.train(was_training)
            if not ok:
                log.warning("shared-prefix packing is off for this model (%s); using the standard forward", why)
                self.shared_prefix = False
                return None
        return packed

    def compute(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics (unprefixed, TRL names) for one batch."""
        batch_size = batch["chosen_input_ids"].shape[0]
        labels = concat_pair(batch, "labels")
        packed = self.packed_pairs(batch)
        policy_hidden = reference_hidden = None
        policy_head = self._head(self.policy, batch) if packed is None else None
        needs_reference_model = not self.loss.reference_free and (
            "chosen_reference_logps" not in batch or self.loss.kl_direction is not None)
        reference_head = self._head(self.reference, batch) if policy_head is not None and needs_reference_model else None
        if policy_head is not None and self.loss.kl_direction is not None and reference_head is None:
            policy_head = None  # the KL needs both sides in one form
        if packed is not None:  # no full logits needed: the prompt once per pair
            policy_logits, policy_logps, mask = None, packed_logps(self.policy, packed, self.chunk), packed.mask
        elif policy_head is not None:  # no [2B, T, V] logits: the head in chunks, forward and backward
            policy_logits = None
            policy_hidden = self.forward_hidden(self.policy, batch)
            policy_logps, mask = head_token_logps(policy_hidden, policy_head, labels, chunk_size=self.chunk)
        else:
            policy_logits = self.forward_logits(self.policy, batch)
            policy_logps, mask = token_logps(policy_logits, labels, chunk_size=self.chunk)

        reference_logits = None
        if self.loss.reference_free:  # SimPO: the loss ignores the reference; zeros keep the contract
            reference_logps = torch.zeros_like(policy_logps).detach()
        elif "chosen_reference_logps" in batch and self.loss.kl_direction is None:
            reference_logps = concat_pair(batch, "reference_logps")[:, : policy_logps.shape[1]]
        else:
            with torch.no_grad():
                if packed is not None:
                    reference_logps = packed_logps(self.reference, packed, self.chunk)
                elif reference_head is not None:
                    reference_hidden = self.forward_hidden(self.reference, batch)
                    reference_logps, _ = head_token_logps(reference_hidden, reference_head, labels, chunk_size=self.chunk)
                else:
                    reference_logits = self.forward_logits(self.reference, batch)
                    reference_logps, _ = token_logps(reference_logits, labels, chunk_size=self.chunk)

        kwargs: dict[str, Any] = {}
        if self.loss.kl_direction is not None and policy_hidden is not None:
            sides = ((reference_hidden, reference_head), (policy_hidden, policy_head))
            first, second = sides if self.loss.kl_direction == "ref_policy" else sides[::-1]
            kl = head_position_kl(*first, *second, mask, chunk_size=self.chunk)
            kwargs["chosen_kl"], kwargs["rejected_kl"] = kl[:batch_size], kl[batch_size:]
        elif self.loss.kl_direction is not None:
            first, second = (
                (reference_logits, policy_logits) if self.loss.kl_direction == "ref_policy" else (policy_logits, reference_logits)
            )
            kl = per_position_kl(first, second, mask, chunk_size=self.chunk)
            kwargs["chosen_kl"], kwargs["rejected_kl"] = kl[:batch_size], kl[batch_size:]

        if self.loss.uses_weights:
            if self.online_weights is not None:
                chosen_w, rejected_w = self.online_weights(self.step_context(batch))
                weights = torch.cat([chosen_w, rejected_w], dim=0)
            elif "chosen_weights" in batch:
                weights = concat_pair(batch, "weights")
            else:
                weights = None
            if weights is not None:
                weights = weights[:, 1:].to(policy_logps.dtype)  # shifted like the labels
                kwargs["chosen_weights"], kwargs["rejected_weights"] = weights[:batch_size], weights[batch_size:]

        if self.loss.extra_inputs is not None:
            kwargs.update(self.loss.extra_inputs(self.step_context(batch)))
        mask = mask.to(policy_logps.dtype)
        losses, chosen_rewards, rejected_rewards = self.loss.fn(
            policy_logps[:batch_size], policy_logps[batch_size:],
            reference_logps[:batch_size], reference_logps[batch_size:],
            mask[:batch_size], mask[batch_size:],
            **kwargs,
        )
        loss = losses.mean()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": (policy_logps[:batch_size] * mask[:batch_size]).sum(-1).mean().detach(),
            "logps/rejected": (policy_logps[batch_size:] * mask[batch_size:]).sum(-1).mean().detach(),
            # the model's own preference by sequence log-prob (at step 0: the reference's, the "before")
            "logps/accuracies": ((policy_logps[:batch_size] * mask[:batch_size]).sum(-1)
                                 > (policy_logps[batch_size:] * mask[batch_size:]).sum(-1)).float().mean().detach(),
        }
        if "chosen_kl" in kwargs:
            metrics["kl/chosen"] = (kwargs["chosen_kl"] * mask[:batch_size]).sum(-1).mean().detach()
            metrics["kl/rejected"] = (kwargs["rejected_kl"] * mask[batch_size:]).sum(-1).mean().detach()
        if self.loss.auxiliary is not None:
            aux, aux_metrics = self.loss.auxiliary(self.step_context(batch, policy_logps, reference_logps, mask))
            loss = loss + aux
            metrics.update(aux_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics

    def step_context(self, batch, policy_logps=None, reference_logps=None, mask=None) -> StepContext:
        """What the loss's hooks and online weights see of this step (never the module itself)."""
        trainer = self._trainer
        return StepContext(
            policy=self.policy, reference=self.reference, batch=batch, step=int(self.global_step),
            strategy=trainer.strategy if trainer is not None else None, pad_token_id=self.pad_token_id,
            chunk_size=self.chunk, policy_logps=policy_logps, reference_logps=reference_logps, mask=mask,
        )

    # -- Lightning hooks ---------------------------------------------------------------
    def _log_metrics(self, split: str, metrics: dict[str, torch.Tensor], batch_size: int, on_step: bool):
        self.log_dict(
            {f"{split}/{k}": v for k, v in metrics.items()},
            on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step,
        )

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute(batch)
        if self.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.global_step} on examples {batch['index'].tolist()}; "
                + last_checkpoint_note(self._trainer)
            )
        # Lightning writes step metrics every trainer.log_every_n_steps steps; each self.log costs
        # ~1 ms of Python, so the metrics are handed over only on those steps.
        if self._logs_this_step():
            self._log_metrics("train", metrics, batch["chosen_input_ids"].shape[0], on_step=True)
        if self._trainer is None or self.trainer.progress_bar_callback is not None:
            self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch["chosen_input_ids"].shape[0])
        self._last_indices = batch["index"]
        return loss

    def _logs_this_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return True
        try:
            return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)
        except AttributeError:  # a Lightning without this (private) property: log every step
            return True

    # -- held-out metrics ----------------------------------------------------------------
    @torch.no_grad()
    def heldout_sums(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss-free held-out metrics of one batch, as sums over its pairs (``train.validation=heldout``).

        - Implicit reward (DPO's, whatever the training loss): r(y) = β Σ_t [log π_θ(y_t|x,y_<t) −
          log π_ref(y_t|x,y_<t)] over the response tokens, β = ``val_beta`` (the loss's β); accuracy =
          share of pairs with r(y_w) > r(y_l) (a tie is not a success: 0 at step 0, where r = 0).
        - Log-prob preference: share of pairs with log π_θ(y_w|x) > log π_θ(y_l|x) (at step 0 the
          reference's own accuracy, the "before").
        - KL to the reference on the held-out responses: Σ_t KL(π_θ(·|x,y_<t) ‖ π_ref(·|x,y_<t)) over the
          response positions of y_w and of y_l, teacher-forced on the dataset's responses. Each term
          is the exact KL of two next-token distributions over the whole vocabulary (no sampling: the
          responses are not the policy's samples, so a log-ratio at the observed tokens would not
          estimate a KL); the sum is the sequence-level KL of TDPO's sequential KL along those
          prefixes. Computed from the hidden states through the output heads in chunks
          (``kernels.logprobs.head_position_kl``: no [N, T, V] logits); the reference's side comes from
          its hidden states cached with the pairs (``stages/reference_logps.validation_reference_stage``).
          Reported per response (``chosen``, ``rejected``) and per token.

        The reference's log-probs and hidden states come with the batch (cached); the reference model
        is run only when they do not (its hidden states then give the KL)."""
        batch_size = batch["chosen_input_ids"].shape[0]
        labels = concat_pair(batch, "labels")
        head = output_head(self.policy) if self.head_chunks and not is_sharded(self.policy) else None
        hidden = None
        if head is not None:
            hidden = self.forward_hidden(self.policy, batch)
            logps, mask = head_token_logps(hidden, head, labels, chunk_size=self.chunk)
        else:
            logps, mask = token_logps(self.forward_logits(self.policy, batch), labels, chunk_size=self.chunk)
        reference_hidden = reference_head = None  # the reference's side of the KL, when there is one
        if hidden is not None and self.reference_head is not None and "reference_hidden" in batch:
            reference_head = self.reference_head.to(hidden.device)
            reference_hidden = hidden.new_zeros(hidden.shape)
            reference_hidden[:, :-1][mask] = batch["reference_hidden"].to(hidden.dtype)
        if "chosen_reference_logps" in batch:
            reference_logps = concat_pair(batch, "reference_logps")[:, : logps.shape[1]].to(logps.dtype)
        elif self.reference is not None:
            forward_head = output_head(self.reference) if head is not None else None
            if forward_head is not None:
                forward_hidden = self.forward_hidden(self.reference, batch)
                reference_logps, _ = head_token_logps(forward_hidden, forward_head, labels, chunk_size=self.chunk)
                if reference_hidden is None:
                    reference_hidden, reference_head = forward_hidden, forward_head
            else:
                reference_logps, _ = token_logps(self.forward_logits(self.reference, batch), labels, chunk_size=self.chunk)
        else:
            raise ValueError("train.validation=heldout: the validation pairs carry no reference log-probs and the "
                             "module has no reference model")
        maskf = mask.to(logps.dtype)
        policy_seq, reference_seq = (logps * maskf).sum(-1), (reference_logps * maskf).sum(-1)
        rewards = self.val_beta * (policy_seq - reference_seq)
        chosen, rejected = rewards[:batch_size], rewards[batch_size:]
        sums = {
            "n_pairs": float(batch_size),
            "rewards_correct": float((chosen > rejected).sum()),
            "logps_correct": float((policy_seq[:batch_size] > policy_seq[batch_size:]).sum()),
            "rewards_chosen": float(chosen.sum()), "rewards_rejected": float(rejected.sum()),
            "logps_chosen": float(policy_seq[:batch_size].sum()), "logps_rejected": float(policy_seq[batch_size:].sum()),
        }
        if reference_hidden is not None:
            kl = head_position_kl(hidden, head, reference_hidden, reference_head, mask, chunk_size=self.chunk).sum(-1)
            sums.update({"kl_chosen": float(kl[:batch_size].sum()), "kl_rejected": float(kl[batch_size:].sum()),
                         "kl_tokens": float(mask.sum()), "kl_pairs": float(batch_size)})
        return sums

    def on_validation_epoch_start(self):
        self._val_sums = dict.fromkeys(SUMS, 0.0)

    def _add_sums(self, sums: dict[str, float]) -> None:
        for key, value in sums.items():
            self._val_sums[key] = self._val_sums.get(key, 0.0) + value

    def validation_step(self, batch, batch_idx):
        if self.validation == "heldout":
            self._add_sums(self.heldout_sums(batch))
            return
        _, metrics = self.compute(batch)
        batch_size = batch["chosen_input_ids"].shape[0]
        self._log_metrics("val", metrics, batch_size, on_step=False)
        # counts for the intervals over all pairs (a batch's accuracy is a share of its pairs)
        self._add_sums({"n_pairs": float(batch_size),
                        "rewards_correct": float(metrics["rewards/accuracies"]) * batch_size,
                        "logps_correct": float(metrics["logps/accuracies"]) * batch_size})

    def on_validation_epoch_end(self):
        """The pass's metrics over ALL its held-out pairs: the sums of every batch (and rank), then the
        ratios and the Wilson intervals (never a mean of per-batch accuracies or intervals)."""
        sums = torch.tensor([self._val_sums.get(key, 0.0) for key in SUMS], dtype=torch.float64, device=self.device)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        metrics = heldout_metrics(dict(zip(SUMS, sums.tolist())), rewards=self.validation == "heldout")
        if trainer is not None:
            for key, value in metrics.items():
                self.log(key, value, on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        # TI-DPO's attribution ran a backward in validation that no loss backward follows: under FSDP
        # its units are left mid-backward until FSDP's own cleanup runs (outside the root's forward)
        if self.online_weights is not None and is_sharded(self.policy):
            finish_backward(self.trainer.strategy.model)
