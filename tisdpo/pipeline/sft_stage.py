"""SFT stage: base model -> SFT checkpoint (cached; shared by every job of a sweep)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from tisdpo.models.loading import build_model
from tisdpo.modules.sft import SFTModule
from tisdpo.pipeline.cache import RESUME_SUBDIR, ArtifactCache
from tisdpo.pipeline.data import PreparedData, rows_fingerprint
from tisdpo.pipeline.loaders import build_trainer, sft_loader, tokenize_sft

log = logging.getLogger(__name__)


def model_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the base model's initial weights."""
    return {
        "name_or_path": cfg.model.get("name_or_path"),
        "config": OmegaConf.to_container(cfg.model.config, resolve=True) if cfg.model.get("config") else None,
        "dtype": cfg.model.get("dtype"),
        "init_seed": cfg.seed if not cfg.model.get("name_or_path") else None,
    }


def base_model(cfg: DictConfig, tokenizer):
    return build_model(
        name_or_path=cfg.model.get("name_or_path"),
        config=OmegaConf.to_container(cfg.model.config, resolve=True) if cfg.model.get("config") else None,
        tokenizer=tokenizer, dtype=cfg.model.get("dtype"), seed=cfg.seed,
        attn_implementation=cfg.model.get("attn_implementation"),
    )


def train_sft(model, examples, tokenizer, cfg: DictConfig, *, max_steps: int, seed: int,
              checkpoint_dir: Path | None = None):
    """Plain next-token SFT with Lightning; returns the trained model (in place).

    With ``checkpoint_dir`` (inside an artifact's build dir) it checkpoints there and resumes from
    what a killed earlier attempt left."""
    from tisdpo.pipeline.resume import stage_checkpointing, stage_every_n_steps

    L.seed_everything(seed, workers=True, verbose=False)
    module = SFTModule(model, cfg.sft.optim, total_steps=max_steps)
    callbacks, resume_from = stage_checkpointing(checkpoint_dir, stage_every_n_steps(cfg))
    trainer = build_trainer(
        cfg.trainer, max_steps=max_steps, logger=False, enable_checkpointing=bool(callbacks), callbacks=callbacks,
        limit_val_batches=0, enable_model_summary=False,
    )
    trainer.fit(module, sft_loader(examples, tokenizer, int(cfg.sft.batch_size), shuffle=True, seed=seed),
                ckpt_path=resume_from)
    return model


def sft_stage(cfg: DictConfig, data: PreparedData, cache: ArtifactCache) -> Path | None:
    """Path of the SFT checkpoint dir, or None when the given model is already SFT'd."""
    if cfg.model.get("is_sft", False):
        log.info("stage sft        skipped (model.is_sft=true)")
        cache.events.append({"stage": "sft", "reused": None, "skipped": True})
        return None
    spec = {
        "model": model_identity(cfg),
        "sft": OmegaConf.to_container(cfg.sft, resolve=True),
        "data": rows_fingerprint(data.sft_rows),
        "tokenizer": len(data.tokenizer),
        "max_prompt_length": int(cfg.dataset.max_prompt_length),
        "seed": cfg.seed,
    }

    def build(out: Path) -> None:
        model = base_model(cfg, data.tokenizer)
        examples = tokenize_sft(data.sft_rows, data.tokenizer, cfg.dataset, int(cfg.sft.max_length))
        train_sft(model, examples, data.tokenizer, cfg, max_steps=int(cfg.sft.max_steps), seed=cfg.seed,
                  checkpoint_dir=out / RESUME_SUBDIR / "sft")
        model.save_pretrained(out)
        data.tokenizer.save_pretrained(out)

    return cache.get_or_build("sft", spec, build).path
