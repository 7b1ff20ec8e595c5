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
from omegaconf import DictConfig, OmegaConf, open_dict

from tisdpo.checks import ConfigError
from tisdpo.models.loading import build_model, gguf_identity, is_gguf, resolve_dtype, resolve_gguf_file, save_dequantised
from tisdpo.runtime.cache import ArtifactCache


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


def gguf_source(cfg: DictConfig) -> tuple[Path, str] | None:
    """(the GGUF file, the option that named it) when the model is a GGUF file: ``model.gguf_file``
    (a path; a file name inside the directory ``model.name_or_path``; or ``pkg:<package>/<file>``),
    or a ``.gguf`` path given as ``model.name_or_path``; else None."""
    spec, name = cfg.model.get("gguf_file"), cfg.model.get("name_or_path")
    if spec:
        spec = str(spec)
        if name and not is_gguf(name) and not spec.startswith("pkg:") and not Path(spec).is_absolute():
            folder = Path(str(name)).expanduser()
            if folder.is_dir():  # transformers' convention: name_or_path=<dir> gguf_file=<file in it>
                spec = str(folder / spec)
        return resolve_gguf_file(spec, "model.gguf_file"), "model.gguf_file"
    if name and is_gguf(name):
        return resolve_gguf_file(str(name), "model.name_or_path"), "model.name_or_path"
    return None


def materialise_model(cfg: DictConfig) -> None:
    """A GGUF model is dequantised once into the artifact cache (stage ``model``) as a plain HF
    directory with its tokenizer; ``model.name_or_path`` (and a ``model.tokenizer`` that followed
    it or was unset) then name that directory, so every stage loads it like any checkpoint.
    Nothing to do for other models. The base model's identity stays the GGUF file's."""
    try:  # a missing file or package, a non-GGUF file: one line naming the option
        source = gguf_source(cfg)
    except (FileNotFoundError, ImportError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if source is None:
        return
    path, _ = source
    identity = gguf_identity(path)
    cache = ArtifactCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    artifact = cache.get_or_build("model", {"gguf": identity, "dtype": "float32"},
                                  lambda out: save_dequantised(path, out))
    spec_tokenizer = cfg.model.get("tokenizer")
    with open_dict(cfg.model):
        keep_tokenizer = spec_tokenizer and not is_gguf(spec_tokenizer) and spec_tokenizer != cfg.model.get("name_or_path")
        cfg.model.gguf_file = str(path)
        cfg.model.gguf_identity = identity
        cfg.model.name_or_path = str(artifact.path)
        if not keep_tokenizer:
            cfg.model.tokenizer = str(artifact.path)


def base_model_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines the base model's initial weights."""
    gguf = cfg.model.get("gguf_identity")
    if gguf is None and gguf_source(cfg) is not None:
        gguf = gguf_identity(gguf_source(cfg)[0])
    if gguf is not None:  # not the cache dir it was dequantised into: the file itself
        gguf = OmegaConf.to_container(gguf) if isinstance(gguf, DictConfig) else dict(gguf)
    return {
        "name_or_path": gguf if gguf is not None else cfg.model.get("name_or_path"),
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
