"""The models a run starts from: the base model, and the initial model (the SFT checkpoint or the base).

One identity per model, used in every cache key that depends on it (SFT artifact, estimator
models, token scores, reference log-probs), so a change of base model invalidates all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tisdpo.models.loading import build_model


def _model_config(cfg: DictConfig) -> dict | None:
    return OmegaConf.to_container(cfg.model.config, resolve=True) if cfg.model.get("config") else None


def base_model_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the base model's initial weights."""
    return {
        "name_or_path": cfg.model.get("name_or_path"),
        "config": _model_config(cfg),
        "dtype": cfg.model.get("dtype"),
        "init_seed": cfg.seed if not cfg.model.get("name_or_path") else None,
    }


def base_model(cfg: DictConfig, tokenizer):
    """The hub / local model (``model.name_or_path``), or one built from ``model.config`` with seeded init."""
    return build_model(
        name_or_path=cfg.model.get("name_or_path"), config=_model_config(cfg),
        tokenizer=tokenizer, dtype=cfg.model.get("dtype"), seed=cfg.seed,
        attn_implementation=cfg.model.get("attn_implementation"),
    )


def initial_model(cfg: DictConfig, sft_dir: Path | None, tokenizer):
    """The model preference training (and the estimators) start from: the SFT checkpoint, or the
    base model when the SFT stage was skipped (``model.is_sft=true``)."""
    if sft_dir is not None:
        return build_model(name_or_path=str(sft_dir), dtype=cfg.model.get("dtype"))
    return base_model(cfg, tokenizer)


def initial_model_identity(cfg: DictConfig, sft_dir: Path | None) -> dict[str, Any]:
    """What determines :func:`initial_model`'s weights: the SFT artifact (content-addressed by its
    key) or the base model."""
    if sft_dir is not None:
        return {"sft": Path(sft_dir).name}
    return {"model": base_model_identity(cfg)}
