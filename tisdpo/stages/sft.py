"""SFT stage: base model -> SFT checkpoint (cached; shared by every job of a sweep)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from tisdpo.modules.sft import SFTModule
from tisdpo.runtime.cache import RESUME_SUBDIR, stable_hash
from tisdpo.runtime.callbacks import stage_every_n_steps
from tisdpo.stages.context import RunContext
from tisdpo.stages.data import rows_fingerprint
from tisdpo.runtime.fit import fit_stage, save_trained
from tisdpo.stages.loaders import sft_loader, tokenize_sft
from tisdpo.runtime.loggers import RUN_RECORD, stage_logger
from tisdpo.stages.start_models import base_model, base_model_identity, stage_device

log = logging.getLogger(__name__)


def train_sft(model, examples, tokenizer, cfg: DictConfig, *, optim: DictConfig, batch_size: int, max_steps: int,
              seed: int, checkpoint_dir: Path | None = None, job_type: str = "sft", run_name: str | None = None,
              record: Path | None = None):
    """Plain next-token SFT with the given recipe (``optim``, ``batch_size``, ``max_steps``: the SFT
    stage's ``sft.*``, or an estimator's own); ``cfg`` gives only the run's trainer, checkpoint and
    logger settings.

    With ``checkpoint_dir`` (inside an artifact's build dir) it checkpoints there and resumes from
    what a killed earlier attempt left. Its curves go to their own W&B run (``job_type``, ``run_name``;
    ``record``: the artifact's wandb_run.json naming that run), see ``loggers.stage_logger``.
    Returns the trainer (``fit.save_trained`` writes the model, gathered from its shards under FSDP)."""
    L.seed_everything(seed, workers=True, verbose=False)
    module = SFTModule(model, optim, total_steps=max_steps)
    loader = sft_loader(examples, tokenizer, int(batch_size), shuffle=True, seed=seed)
    return fit_stage(cfg.trainer, module, loader, max_steps=max_steps, checkpoint_dir=checkpoint_dir,
                     checkpoint_every=stage_every_n_steps(cfg), model=model,
                     gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing")),
                     logger=stage_logger(cfg, job_type, run_name or job_type, record=record))


def sft_stage(ctx: RunContext) -> Path | None:
    """Path of the SFT checkpoint dir, or None when the given model is already SFT'd."""
    cfg, data, cache = ctx.cfg, ctx.data, ctx.cache
    if cfg.model.get("is_sft", False):
        log.info("stage sft        skipped (model.is_sft=true)")
        cache.events.append({"stage": "sft", "reused": None, "skipped": True})
        return None
    key_fields = {
        "model": base_model_identity(cfg),
        "sft": OmegaConf.to_container(cfg.sft, resolve=True),
        "data": rows_fingerprint(data.sft_rows),
        "tokenizer": len(data.tokenizer),
        "max_prompt_length": int(cfg.dataset.max_prompt_length),
        "seed": cfg.seed,
    }

    def build(out: Path) -> None:
        model = base_model(cfg, data.tokenizer)
        examples = tokenize_sft(data.sft_rows, data.tokenizer, cfg.dataset, int(cfg.sft.max_length))
        trainer = train_sft(model, examples, data.tokenizer, cfg, optim=cfg.sft.optim, batch_size=int(cfg.sft.batch_size),
                            max_steps=int(cfg.sft.max_steps), seed=cfg.seed,
                            checkpoint_dir=out / RESUME_SUBDIR / "sft", run_name=f"sft-{stable_hash(key_fields)}",
                            record=out / RUN_RECORD)
        if save_trained(trainer, model, out):
            data.tokenizer.save_pretrained(out)

    # collective: under DDP/FSDP every rank trains it with the run's strategy; rank 0 writes it
    return cache.get_or_build("sft", key_fields, build, device=stage_device(cfg), collective=True).path
