"""Load the policy, the frozen reference and the tokenizer.

A model comes from one of three places, in this order of precedence:
  1. ``name_or_path``: a hub id or a local directory written by ``save_pretrained``;
  2. ``config``: a dict of ``transformers.LlamaConfig`` kwargs (the tiny default), with the
     vocabulary size taken from the tokenizer so the two can never disagree.
The reference is always a separate frozen copy in eval mode (LoRA runs reuse the base
weights instead; see ``tisdpo.models.lora``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, option: str = "model.dtype") -> torch.dtype | None:
    """``auto``/None -> None (the checkpoint's own dtype); ``option`` names the setting in errors."""
    if name in (None, "auto"):
        return None
    if name not in _DTYPES:
        raise ValueError(f"{option}={name!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).expanduser().exists()


def load_tokenizer(name_or_path: str, option: str = "model.tokenizer", padding_side: str | None = None):
    """A tokenizer from a hub id or a local dir; guarantees a pad token (EOS when absent).

    ``option`` names the setting in errors; ``padding_side`` (left/right) is set when given.
    """
    if not name_or_path:
        raise ValueError(f"{option} is required")
    name_or_path = str(name_or_path)
    if name_or_path.startswith((".", "/", "~")) and not _is_local(name_or_path):
        raise FileNotFoundError(f"{option}={name_or_path!r}: tokenizer path does not exist")
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{option}={name_or_path!r}: the tokenizer has neither a pad nor an EOS token")
        # Decoder-only checkpoints often ship without a pad token; padded positions are
        # always masked out of the loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def build_model(
    *,
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    tokenizer=None,
    dtype: str | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Build a causal LM from a hub id / local dir, or from a LlamaConfig dict."""
    torch_dtype = resolve_dtype(dtype)
    if name_or_path:
        if name_or_path.startswith((".", "/", "~")) and not _is_local(name_or_path):
            raise FileNotFoundError(f"model path {name_or_path!r} does not exist (option model.name_or_path)")
        kwargs: dict[str, Any] = {}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(os.path.expanduser(name_or_path), **kwargs)
    if config is None:
        raise ValueError("model: give either model.name_or_path or model.config")
    cfg = dict(config)
    if tokenizer is not None:
        cfg["vocab_size"] = len(tokenizer)
        cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
        cfg.setdefault("bos_token_id", tokenizer.bos_token_id)
        cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
    # Random init must not depend on whatever consumed the global RNG before us.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy with gradients off and dropout off: the reference policy."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference
