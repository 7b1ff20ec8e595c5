"""Estimator-model stage: train TIS-DPO's contrastive pair pi+/pi- (cached; resumable).

    dpo_pair: pi+ = DPO on the pairs, pi- = DPO on the label-swapped pairs, both from the SFT model;
    sft_pair: pi+ = SFT on the chosen responses, pi- = SFT on the rejected ones (from the base
              model, or from the SFT model with ``estimator.init=sft``).
"""
from __future__ import annotations

import functools
import gc
import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from tisdpo.losses import dpo_loss
from tisdpo.models.loading import frozen_copy
from tisdpo.losses.record import BoundLoss
from tisdpo.modules.preference import PreferenceModule
from tisdpo.runtime.cache import RESUME_SUBDIR
from tisdpo.runtime.callbacks import stage_every_n_steps
from tisdpo.runtime.fit import accumulation, fit_stage, optimizer_steps, save_trained, world_size
from tisdpo.stages.loaders import preference_loader, tokenize_sft
from tisdpo.runtime.loggers import RUN_RECORD, stage_logger, stage_run_name
from tisdpo.stages.start_models import frozen_dtype, initial_model, master_dtype
from tisdpo.runtime.sharded import reference_placement
from tisdpo.stages.sft import train_sft

log = logging.getLogger(__name__)


def swap_pair(example: dict) -> dict:
    """The example with chosen and rejected exchanged (the data pi- is trained on)."""
    swapped = dict(example)
    for key in ("input_ids", "labels", "attention_mask", "weights"):
        if f"chosen_{key}" in example:
            swapped[f"chosen_{key}"], swapped[f"rejected_{key}"] = example[f"rejected_{key}"], example[f"chosen_{key}"]
    return swapped


def train_dpo_model(cfg: DictConfig, init_dir: Path | None, examples: list[dict], tokenizer, *, seed: int,
                    checkpoint_dir: Path | None = None, run_name: str = "estimator", record: Path | None = None):
    """A DPO model trained from ``init_dir`` (None: the given model, ``model.is_sft=true``) on
    ``examples`` with the estimator's settings (checkpointed in, and resumed from, ``checkpoint_dir``
    when given); returns (model, trainer)."""
    est = cfg.estimator
    L.seed_everything(seed, workers=True, verbose=False)
    policy = initial_model(cfg, init_dir, tokenizer)
    reference = frozen_copy(policy).to(frozen_dtype(cfg) or policy.dtype)
    loss = BoundLoss("dpo", functools.partial(dpo_loss, beta=float(est.beta)))
    # The DPO baseline's recipe, batch included: the global batch and length of the run's training
    # (under DDP/FSDP with the run's strategy, the reference placed like the policy's).
    batch_size, world = int(est.batch_size), world_size(cfg.trainer)
    accumulate = accumulation(batch_size, int(est.get("grad_accum") or 1), est.get("global_batch_size"), world)
    steps = optimizer_steps(est.get("max_steps"), est.get("epochs"), len(examples), batch_size, world, accumulate)
    module = PreferenceModule(policy, reference, loss, est.optim, total_steps=steps,
                              logits_chunk_size=int(cfg.train.logits_chunk_size))
    loader = preference_loader(examples, tokenizer, batch_size, shuffle=True, seed=seed)
    trainer = fit_stage(cfg.trainer, module, loader, max_steps=steps, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=stage_every_n_steps(cfg), accumulate_grad_batches=accumulate, model=policy,
                        gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing")),
                        callbacks=reference_placement(cfg, reference),
                        logger=stage_logger(cfg, "estimator", run_name, record=record))
    return policy, trainer


def train_sft_model(cfg: DictConfig, init, rows: list[dict], tokenizer, *, seed: int,
                    checkpoint_dir: Path | None = None, run_name: str = "estimator", record: Path | None = None):
    """An SFT model trained from ``init`` on {prompt, response} rows with the estimator's settings;
    returns (model, trainer)."""
    est = cfg.estimator
    examples = tokenize_sft(rows, tokenizer, cfg.dataset, int(cfg.sft.max_length))
    trainer = train_sft(init, examples, tokenizer, cfg, optim=est.optim, batch_size=int(est.batch_size),
                        max_steps=int(est.max_steps), seed=seed,
                        checkpoint_dir=checkpoint_dir, job_type="estimator", run_name=run_name, record=record)
    return init, trainer


def train_pair(cfg: DictConfig, kind: str, *, out: Path, sft_dir: Path | None, train_rows: list[dict],
               train_examples: list[dict], tokenizer) -> None:
    """Write pi+ to out/positive and pi- to out/negative: DPO on the data and on the swapped data
    (``kind="dpo"``, from the SFT model), or SFT on the chosen and on the rejected responses
    (``kind="sft"``, from the base model or, with ``estimator.init=sft``, from ours).

    ``out`` is the artifact's stable build dir: each model checkpoints in out/_resume/<side> and is
    marked done once saved, so a killed build resumes where it stopped (pi+ is not trained again)."""
    name = cfg.estimator.name
    work = out / RESUME_SUBDIR

    def stage_run(side: str) -> dict:  # each model's W&B run, named in the artifact's wandb_run.json
        return {"run_name": stage_run_name("estimator", out, side), "record": out / RUN_RECORD}

    if kind == "dpo":
        # from our SFT model, or (model.is_sft=true: sft_dir is None) from the given released SFT model
        trainers = {
            "positive": lambda: train_dpo_model(cfg, sft_dir, train_examples, tokenizer, seed=cfg.seed,
                                                checkpoint_dir=work / "positive", **stage_run("positive")),
            "negative": lambda: train_dpo_model(cfg, sft_dir, [swap_pair(e) for e in train_examples], tokenizer,
                                                seed=cfg.seed + 1, checkpoint_dir=work / "negative",
                                                **stage_run("negative")),
        }
    elif kind == "sft":
        start_dir = sft_dir if cfg.estimator.init == "sft" else None  # init=base: from the base model

        def sft_side(side: str, key: str, offset: int):
            rows = [{"prompt": r["prompt"], "response": r[key]} for r in train_rows]
            return lambda: train_sft_model(cfg, initial_model(cfg, start_dir, tokenizer), rows, tokenizer,
                                           seed=cfg.seed + offset, checkpoint_dir=work / side, **stage_run(side))

        trainers = {side: sft_side(side, key, offset)
                    for side, key, offset in (("positive", "chosen", 0), ("negative", "rejected", 1))}
    else:
        raise ValueError(f"estimator={name}: pair_models={kind!r} is not 'dpo' or 'sft'")
    for side, train in trainers.items():
        done = work / f"{side}.done"
        if done.is_file():
            log.info("estimator %s: pi %s already trained by the interrupted build", name, side)
            continue
        model, trainer = train()
        if save_trained(trainer, model, out / side):  # rank 0 (under FSDP: gathered from every rank)
            done.parent.mkdir(parents=True, exist_ok=True)
            done.touch()
        # pi+ (its copy of the reference, optimiser state, the trainer holding them) is freed before
        # pi- is built: the stage peaks at one pair of models, as DPO's training does
        del model, trainer
        gc.collect()
