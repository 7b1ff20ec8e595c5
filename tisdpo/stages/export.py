"""Export the trained policy as a Hugging Face directory any evaluator can read.

``<run dir>/policy/``: safetensors weights, config, generation config and tokenizer, so
``AutoModelForCausalLM.from_pretrained(<run dir>/policy)`` loads it (lm-evaluation-harness, vLLM,
``python -m tisdpo.evaluate``). Written in the master weights' precision unless ``export.dtype``
says otherwise; LoRA adapters are merged into the base weights unless ``export.merge_lora=false``
(then the adapter directory is written, which peft loads on top of the base model).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from tisdpo.models.lora import is_lora
from tisdpo.models.loading import resolve_dtype

log = logging.getLogger(__name__)

POLICY_DIR = "policy"


def export_policy(policy, tokenizer, output_dir: Path, export_cfg: DictConfig | None) -> Path | None:
    """Write ``<output_dir>/policy`` (atomically: a partial export is never left under that name);
    returns its path, or None with ``export.enabled=false``."""
    export_cfg = export_cfg or {}
    if not export_cfg.get("enabled", True):
        return None
    final = Path(output_dir) / POLICY_DIR
    tmp = final.with_name(f".{POLICY_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = policy
    if is_lora(model) and export_cfg.get("merge_lora", True):
        # merge into the base weights: the end of the run, so the policy may be changed in place
        model = model.merge_and_unload()
    dtype = resolve_dtype(export_cfg.get("dtype"), option="export.dtype")
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log.info("exported the policy to %s (AutoModelForCausalLM.from_pretrained loads it)", final)
    return final
