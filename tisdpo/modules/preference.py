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
from typing import Any, Callable

import torch

from tisdpo.data.collate import concat_pair
from tisdpo.kernels.logprobs import head_position_kl, head_token_logps, per_position_kl, token_logps
from tisdpo.kernels.scoring import chunked_head, last_hidden
from tisdpo.losses.record import BoundLoss, StepContext
from tisdpo.models.sharding import finish_backward, is_sharded
from tisdpo.modules.optim import last_checkpoint_note
from tisdpo.modules.policy import PolicyModule
from tisdpo.kernels.shared_prefix import PackedPairs, pack_pairs, packed_logps, packing_matches, packing_supported

log = logging.getLogger(__name__)


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
    ):
        super().__init__(policy, reference, loss, optim_cfg, total_steps=total_steps,
                         logits_chunk_size=logits_chunk_size, check_finite=check_finite)
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

    def validation_step(self, batch, batch_idx):
        _, metrics = self.compute(batch)
        self._log_metrics("val", metrics, batch["chosen_input_ids"].shape[0], on_step=False)

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        # TI-DPO's attribution ran a backward in validation that no loss backward follows: under FSDP
        # its units are left mid-backward until FSDP's own cleanup runs (outside the root's forward)
        if self.online_weights is not None and is_sharded(self.policy):
            finish_backward(self.trainer.strategy.model)
