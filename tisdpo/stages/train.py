"""Preference training stage: the policy, initialised from the SFT model, against a frozen reference."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from tisdpo.models.lora import policy_and_reference
from tisdpo.models.sharding import is_sharded
from tisdpo.losses.record import BoundLoss
from tisdpo.kernels.scoring import output_head
from tisdpo.modules.preference import SUMS, PreferenceModule, heldout_metrics
from tisdpo.runtime.cache import launch_rank
from tisdpo.runtime.callbacks import RNGStateCallback, SignalCheckpoint
from tisdpo.runtime.callbacks import VerifiedCheckpoint
from tisdpo.runtime.checkpoints import CHECKPOINT_DIR
from tisdpo.runtime.run_dir import train_checkpoint
from tisdpo.runtime.fit import accumulation, fit_stage, optimizer_steps, trained_state_dict, world_size
from tisdpo.stages.loaders import length_grouped, preference_loader
from tisdpo.stages.context import RunContext
from tisdpo.stages.start_models import frozen_dtype
from tisdpo.runtime.sharded import reference_placement

log = logging.getLogger(__name__)


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}


class ValidateAtStart(Callback):
    """Validation on the initial weights, before the first step (not on a resumed run): the "before"
    of every val/ metric, kept in ``metrics`` (results.json ``val_step0/...``) and logged at step 0.
    Run under a forked RNG, so training draws exactly what it would without it.

    ``precomputed``: the step-0 metrics already known without a pass (``train.validation=heldout``
    with the validation pairs' cached reference log-probs: :func:`reference_heldout_metrics`); they are
    logged at step 0 and the validation loop does not run."""

    def __init__(self, precomputed: dict[str, float] | None = None) -> None:
        self.metrics: dict[str, float] = {}
        self.precomputed = precomputed

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step != 0 or trainer.sanity_checking:
            return
        if self.precomputed is not None:
            for logger in trainer.loggers:
                logger.log_metrics(dict(self.precomputed), step=0)
            self.metrics = {f"val_step0/{k.removeprefix('val/')}": v for k, v in self.precomputed.items()}
            log.info("validation at step 0 (the reference's, from its cached log-probs; no pass): %s",
                     {k: round(v, 4) for k, v in self.metrics.items()})
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        first_loop_iter = trainer._logger_connector._first_loop_iter
        with torch.random.fork_rng(devices=[]):
            trainer.validating = True
            loop.run()
            trainer.training = True
        trainer._logger_connector._first_loop_iter = first_loop_iter
        self.metrics = {f"val_step0/{k.removeprefix('val/')}": v
                        for k, v in metrics_to_floats(trainer.callback_metrics).items() if k.startswith("val/")}
        pl_module.policy.train()


class ValidationProgress(Callback):
    """A log line with progress and ETA every ``every_s`` seconds of a validation pass (Lightning's own
    bar draws only on a terminal; a long pass on a real model must not run in silence in run.log)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._start = self._last = 0.0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        now = time.perf_counter()
        if trainer.sanity_checking or now - self._last < self.every_s:
            return
        self._last = now
        total = trainer.num_val_batches[dataloader_idx] if trainer.num_val_batches else 0
        done = batch_idx + 1
        eta = (now - self._start) / done * max(0, total - done) if total else float("nan")
        log.info("validation (step %d): %d/%s batches, %.0fs elapsed, ETA %.0fs", trainer.global_step, done,
                 total or "?", now - self._start, eta)


def reference_heldout_metrics(val_examples: list[dict]) -> dict[str, float] | None:
    """The held-out metrics (``train.validation=heldout``, ``PreferenceModule.heldout_sums``) at step 0,
    from the validation pairs' cached reference log-probs alone, with no forward pass; None when the
    pairs carry none (then the pass runs).

    At step 0 the policy IS the reference (same weights), so every implicit reward β Σ_t log π/π_ref
    is 0 (accuracy 0: a tie is no success; margins 0), the KL to the reference is 0, and the policy's
    sequence log-probs are the reference's: ``val_step0/logps/accuracies`` is the reference's own
    preference accuracy, share of pairs with log π_ref(y_w|x) > log π_ref(y_l|x), with its Wilson
    interval over all the pairs: the "before" of every row."""
    if not val_examples or any(f"{side}_reference_logps" not in val_examples[0] for side in ("chosen", "rejected")):
        return None
    chosen = [float(ex["chosen_reference_logps"].sum()) for ex in val_examples]   # 0.0 off the response
    rejected = [float(ex["rejected_reference_logps"].sum()) for ex in val_examples]
    n = len(val_examples)
    sums = dict.fromkeys(SUMS, 0.0)
    sums.update(n_pairs=float(n), logps_correct=float(sum(c > r for c, r in zip(chosen, rejected))),
                logps_chosen=sum(chosen), logps_rejected=sum(rejected))
    if "chosen_reference_hidden" in val_examples[0]:  # a pass would measure the KL: it is 0 here
        sums.update(kl_pairs=float(n), kl_tokens=float(sum(len(ex[f"{side}_reference_hidden"]) for ex in val_examples
                                                           for side in ("chosen", "rejected"))))
    return heldout_metrics(sums)


def validated_last_step(val_every: int, max_steps: int) -> bool:
    """Whether Lightning's own schedule validates after the last step (then a final validation would
    repeat it on the same weights)."""
    return val_every > 0 and max_steps % min(val_every, max_steps) == 0


def write_data_preview(path: Path, examples: list[dict], tokenizer, n: int = 3) -> None:
    """The first ``n`` training rows decoded exactly as the model sees them (special tokens and chat
    template included), the prompt/response boundary marked."""
    lines = []
    for i, example in enumerate(examples[:n]):
        n_prompt = len(example["prompt_input_ids"])
        lines.append(f"=== training row {i} (dataset row {example.get('index')}) ===")
        for side in ("chosen", "rejected"):
            ids = example[f"{side}_input_ids"]
            prompt = tokenizer.decode(ids[:n_prompt], skip_special_tokens=False)
            response = tokenizer.decode(ids[n_prompt:], skip_special_tokens=False)
            lines.append(f"--- {side}: {n_prompt} prompt + {len(ids) - n_prompt} response tokens ---")
            lines.append(f"{prompt}⟦PROMPT|RESPONSE⟧{response}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def train_stage(
    ctx: RunContext,
    loss: BoundLoss,
    *,
    policy,
    reference,
    train_examples: list[dict],
    val_examples: list[dict],
    logger,
    online_weights=None,
    callbacks: list | None = None,
) -> tuple[PreferenceModule, dict[str, float]]:
    """Fit the preference module; returns it and the final validation metrics (val/...).

    The examples carry their reference log-probs when the reference stage cached them
    (``stages/reference_logps.reference_logps_stage``); the module then goes without the reference
    unless the loss runs it every step (a KL term, KTO's mismatched pairs, the triplet anchors).
    A reference-free loss (SimPO, TPO) never gets one."""
    cfg, tokenizer, output_dir = ctx.cfg, ctx.tokenizer, ctx.output_dir
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    carries_reference = bool(train_examples) and "chosen_reference_logps" in train_examples[0]
    module_reference = reference
    if loss.reference_free or (carries_reference and not loss.needs_reference_model):
        # every batch carries what the loss needs of the reference: the module goes without it
        # (never moved to the accelerator; the caller keeps it for evaluation)
        module_reference = None
    placement = reference_placement(cfg, module_reference)
    world = world_size(cfg.trainer)
    batch_size = int(cfg.train.batch_size)
    accumulate = accumulation(batch_size, int(cfg.train.grad_accum), cfg.train.get("global_batch_size"), world)
    max_steps = optimizer_steps(cfg.train.get("max_steps"), cfg.train.get("epochs"), len(train_examples), batch_size,
                                world, accumulate)
    log.info("preference training: %d optimiser steps of %d pairs (%d per device x %d device(s) x %d accumulated)",
             max_steps, batch_size * world * accumulate, batch_size, world, accumulate)
    validation = str(cfg.train.get("validation") or "loss")
    val_beta = float(cfg.loss.get("beta", 0.1))
    module = PreferenceModule(
        policy, module_reference, loss, cfg.optim, total_steps=max_steps,
        logits_chunk_size=int(cfg.train.logits_chunk_size), check_finite=bool(cfg.train.check_finite),
        online_weights=online_weights, pad_token_id=tokenizer.pad_token_id,
        shared_prefix=bool(cfg.train.get("shared_prefix", False)),
        validation=validation, val_beta=val_beta,
        # heldout: the reference's logits at the response positions are its head of its cached hidden states
        reference_head=output_head(reference) if validation == "heldout" and reference is not None else None,
    )
    train_loader = preference_loader(
        train_examples, tokenizer, int(cfg.train.batch_size), shuffle=True, seed=cfg.seed,
        num_workers=int(cfg.train.num_workers), pad_to_multiple_of=cfg.train.get("pad_to_multiple_of"),
    )
    if cfg.train.get("group_by_length"):
        train_loader = length_grouped(train_loader, int(cfg.train.batch_size), cfg.seed)
    val_loader = preference_loader(val_examples, tokenizer, int(cfg.train.eval_batch_size), shuffle=False, seed=cfg.seed,
                                   pad_to_multiple_of=cfg.train.get("pad_to_multiple_of"))
    # sha256 sidecars, no partial files on a failed write, no last-v1.ckpt (checkpoints.VerifiedCheckpoint)
    checkpoint = VerifiedCheckpoint(
        dirpath=output_dir / CHECKPOINT_DIR, every_n_train_steps=int(cfg.checkpoint.every_n_steps),
        save_last=True, save_top_k=-1 if cfg.checkpoint.get("keep_all") else 1, save_weights_only=False,
    )
    val_every = int(cfg.train.val_every_n_steps)
    if launch_rank() == 0 and train_examples and "prompt_input_ids" in train_examples[0]:
        write_data_preview(output_dir / "data_preview.txt", train_examples, tokenizer)
    # heldout: step 0 from the cached reference log-probs (the policy is the reference), no pass
    at_start = (ValidateAtStart(reference_heldout_metrics(val_examples) if validation == "heldout" else None)
                if val_every > 0 else None)
    trainer = fit_stage(
        cfg.trainer, module, train_loader, max_steps=max_steps, val_loader=val_loader if val_every > 0 else None,
        ckpt_path=train_checkpoint(cfg, output_dir), logger=logger, default_root_dir=str(output_dir),
        callbacks=[checkpoint, RNGStateCallback(), SignalCheckpoint(output_dir / CHECKPOINT_DIR), *placement,
                   *([at_start, ValidationProgress()] if at_start else []), *(callbacks or [])],
        val_check_interval=min(val_every, max_steps) if val_every > 0 else None,
        check_val_every_n_epoch=None, limit_val_batches=1.0 if val_every > 0 else 0,
        accumulate_grad_batches=accumulate, model=policy, gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing")),
        # no_grad instead of inference_mode in validation: TI-DPO's attribution needs enable_grad there.
        inference_mode=False,
    )
    start = at_start.metrics if at_start else {}
    if validated_last_step(val_every, max_steps) and trainer.global_step == max_steps:
        # Lightning validated after the last step: the same weights, no second pass
        final = {k: v for k, v in metrics_to_floats(trainer.callback_metrics).items() if k.startswith("val/")}
        if "val/n_pairs" in final:  # (a run resumed at its last step validated nothing here: validate below)
            return module, {**start, **final}
    final = trainer.validate(module, val_loader, verbose=False)
    return module, {**start, **metrics_to_floats(final[0] if final else {})}


def models_for_eval(ctx: RunContext, module, reference):
    """The trained policy and the reference as whole models on this process, for evaluation and export;
    (None, None) on ranks other than 0.

    Under FSDP the policy's parameters are shards spread over the ranks (and the reference's too, with
    ``train.reference_placement`` auto/shard). Every rank takes part in gathering the policy's full
    state dict; rank 0 loads it into a fresh copy of the initial model and rebuilds the reference from
    the initial weights (frozen, so they are the reference's), and evaluates alone on whole models."""
    if not is_sharded(module.policy):
        return (module.policy, reference) if module.global_rank == 0 else (None, None)
    state = trained_state_dict(module.trainer, module.policy)  # collective
    if state is None:
        return None, None
    policy, reference = policy_and_reference(ctx.start_model(), ctx.cfg.model.get("lora"),
                                             reference_dtype=frozen_dtype(ctx.cfg))
    policy.load_state_dict(state)
    log.info("policy consolidated from %d FSDP ranks for evaluation and export", module.trainer.world_size)
    return policy, reference
