"""The models a run starts from, their precision and the device each stage runs on.

Precision: trainable models (policy, SFT, estimator models pi+/pi-) load and are updated in
``model.master_dtype`` (float32: a bf16 weight rounds small updates away, see README "Precision");
their compute dtype follows ``trainer.precision`` (bf16-mixed: autocast). Frozen models (the
reference, scoring models) are stored in ``model.dtype``.

One identity per model, used in every cache key that depends on it (SFT artifact, estimator
models, token scores, reference log-probs), so a change of base model invalidates all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.models.loading import build_model, resolve_dtype


def _model_config(cfg: DictConfig) -> dict | None:
    return OmegaConf.to_container(cfg.model.config, resolve=True) if cfg.model.get("config") else None


def master_dtype(cfg: DictConfig) -> str:
    """The dtype trainable models are loaded and updated in (``model.master_dtype``, default float32)."""
    return str(cfg.model.get("master_dtype") or "float32")


def frozen_dtype(cfg: DictConfig) -> torch.dtype | None:
    """The dtype frozen copies are stored in (``model.dtype``; None: as loaded)."""
    return resolve_dtype(cfg.model.get("dtype"))


def stage_device(cfg: DictConfig) -> torch.device:
    """The device the non-Lightning stages (scoring, reference log-probs, evaluation) run on: the
    accelerator ``trainer.accelerator`` asks for, where one is present."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def base_model_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the base model's initial weights."""
    return {
        "name_or_path": cfg.model.get("name_or_path"),
        "config": _model_config(cfg),
        "dtype": master_dtype(cfg),
        "init_seed": cfg.seed if not cfg.model.get("name_or_path") else None,
    }


def base_model(cfg: DictConfig, tokenizer):
    """The hub / local model (``model.name_or_path``), or one built from ``model.config`` with seeded init."""
    return build_model(
        name_or_path=cfg.model.get("name_or_path"), config=_model_config(cfg),
        tokenizer=tokenizer, dtype=master_dtype(cfg), seed=cfg.seed,
        attn_implementation=cfg.model.get("attn_implementation"),
    )


def initial_model(cfg: DictConfig, sft_dir: Path | None, tokenizer):
    """The model preference training (and the estimators) start from: the SFT checkpoint, or the
    base model when the SFT stage was skipped (``model.is_sft=true``)."""
    if sft_dir is not None:
        return build_model(name_or_path=str(sft_dir), dtype=master_dtype(cfg))
    return base_model(cfg, tokenizer)


def initial_model_identity(cfg: DictConfig, sft_dir: Path | None) -> dict[str, Any]:
    """What determines :func:`initial_model`'s weights: the SFT artifact (content-addressed by its
    key) or the base model."""
    if sft_dir is not None:
        return {"sft": Path(sft_dir).name}
    return {"model": base_model_identity(cfg)}
