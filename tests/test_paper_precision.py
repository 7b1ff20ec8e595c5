"""Paper-scale precision on a CPU: fp32 master weights under model.dtype=bfloat16, the exported
policy, and the device each stage ran on.

A bf16 weight rounds an RMSprop update at lr 5e-7 away (its resolution near 0.02 is ~1e-4); the
policy must keep fp32 master weights, whatever ``model.dtype`` (the frozen models' storage) says.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

from tests.conftest import SHARED_DATA, compose_config
from tisdpo.stages.runner import run

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory) -> Path:
    """A randomly initialised Llama saved in fp32 with save_pretrained (no weights can be downloaded)."""
    out = tmp_path_factory.mktemp("llama")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "gpt2_tokenizer"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _decoder_changed_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    changed = total = 0
    for name, value in before.items():
        if ".layers." not in name:  # decoder layers only: embeddings of unseen tokens may stay
            continue
        changed += int((after[name].float() != value.float()).sum())
        total += value.numel()
    return changed / total


def test_paper_optimiser_on_bf16_model_dtype_updates_fp32_master_weights(tmp_path, random_llama):
    cfg = compose_config([
        "model=hf", f"model.name_or_path={random_llama}", f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}",
        "model.is_sft=true", "model.dtype=bfloat16", "dataset=pku_saferlhf",
        f"dataset.path={SHARED_DATA / 'pku_saferlhf_safer_pairs_5k.json'}", "dataset.limit=120",
        "dataset.max_length=96", "dataset.max_prompt_length=48", "eval=none", "train.max_steps=30",
        "train.batch_size=4", "train.eval_batch_size=8", "train.val_every_n_steps=0", "checkpoint.every_n_steps=30",
    ], tmp_path)
    assert cfg.optim.optimizer._target_ == "torch.optim.RMSprop" and float(cfg.optim.lr) == 5e-7  # comes with model=hf
    results = run(cfg)

    exported = Path(results["export/policy_dir"])
    policy = AutoModelForCausalLM.from_pretrained(exported)
    assert policy.dtype == torch.float32, "exported in the master weights' precision"
    before = AutoModelForCausalLM.from_pretrained(random_llama).state_dict()
    share = _decoder_changed_share(before, policy.state_dict())
    assert share > 0.9, f"only {share:.1%} of decoder weights moved: updates rounded away"
    stages = {event["stage"]: event for event in results["stages"]}
    assert stages["train"]["device"] == "cpu" and stages["reference_logps"]["device"] == "cpu"


def test_the_same_updates_round_away_in_bf16_weights():
    """Why master weights matter: the same RMSprop step leaves most bf16 weights unchanged."""
    torch.manual_seed(0)
    weights = torch.randn(4096) * 0.02
    changed = {}
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(weights.to(dtype).clone())
        optimiser = torch.optim.RMSprop([p], lr=5e-7)
        start = p.detach().clone()
        for _ in range(30):
            p.grad = torch.randn_like(p) * 1e-3
            optimiser.step()
        changed[dtype] = float((p.detach() != start).float().mean())
    assert changed[torch.float32] > 0.99 and changed[torch.bfloat16] < 0.5, changed
