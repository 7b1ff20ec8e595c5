"""LoRA through peft: only the adapters train, the reference is the base with the adapters disabled
(equal to the untouched base model, never changed, never copied)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("peft")

from tests.conftest import compose_config  # noqa: E402
from tisdpo.data.collate import PreferenceCollator  # noqa: E402
from tisdpo.kernels.logprobs import token_logps  # noqa: E402
from tisdpo.models.loading import build_model  # noqa: E402
from tisdpo.models.lora import AdapterDisabledReference, policy_and_reference  # noqa: E402
from tisdpo.modules.preference import PreferenceModule  # noqa: E402
from tisdpo.runtime.fit import build_trainer
from tisdpo.stages.loaders import preference_loader, tokenize_pairs  # noqa: E402
from tisdpo.losses.registry import bind_loss  # noqa: E402
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig  # noqa: E402

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
OPTIM = OmegaConf.create({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                          "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 0.0}})


@pytest.fixture(scope="module")
def data():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=32, n_test_pairs=8))
    tokenizer = task.tokenizer()
    cfg = compose_config([], tiny=False)
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, cfg.dataset, "train")
    return tokenizer, examples


def _logps(model, batch):
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    with torch.no_grad():
        return token_logps(model(input_ids=ids, attention_mask=attention, use_cache=False).logits, labels)[0]


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_lora_trains_adapters_only_and_the_reference_is_the_base(data):
    tokenizer, examples = data
    base = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
    pristine = copy.deepcopy(base).eval()  # the test's own copy, to compare against
    policy, reference = policy_and_reference(base, LORA)
    assert isinstance(reference, AdapterDisabledReference)

    # one copy of the weights: every tensor the reference computes with is one of the policy's
    policy_storages = _storages(policy.parameters())
    assert _storages(reference.parameters()) <= policy_storages
    assert _storages(reference.buffers()) <= _storages(policy.buffers())
    base_numel = sum(p.numel() for p in pristine.parameters())
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_numel = sum(p.numel() for p in trainable.values())
    assert sum(p.numel() for p in policy.parameters()) == base_numel + lora_numel
    assert lora_numel < 0.5 * base_numel

    spec = bind_loss(compose_config(["loss=dpo"], tiny=False).loss)
    module = PreferenceModule(policy, reference, spec, OPTIM, total_steps=4, pad_token_id=tokenizer.pad_token_id)
    assert sum(p.numel() for p in module.parameters()) == base_numel + lora_numel  # no reference copy registered
    frozen_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in trainable.items()}

    trainer = build_trainer(compose_config([], tiny=False).trainer, max_steps=4, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(module, preference_loader(examples, tokenizer, 8, shuffle=True, seed=0))

    for name, before in frozen_before.items():  # the base (= the reference) did not move
        assert torch.equal(dict(policy.named_parameters())[name], before), name
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainable.items())  # the adapters did

    batch = PreferenceCollator(tokenizer.pad_token_id)(examples[:8])
    expected = _logps(pristine, batch)
    assert torch.allclose(_logps(reference, batch), expected, atol=1e-6)  # reference == untouched base
    assert not torch.allclose(_logps(policy, batch), expected, atol=1e-3)  # the policy learned something
    policy.train()  # a reference call switches dropout off for itself and restores the policy's mode
    reference(input_ids=batch["chosen_input_ids"][:1])
    assert policy.training and not reference.training
    assert not torch.allclose(_logps(policy, batch), expected, atol=1e-3)  # adapters enabled again after it


def test_full_finetuning_keeps_a_frozen_copy(data):
    tokenizer, _ = data
    base = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
    policy, reference = policy_and_reference(base, None)
    assert policy is base and not isinstance(reference, AdapterDisabledReference)
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert not _storages(reference.parameters()) & _storages(policy.parameters())


def test_lora_pipeline_end_to_end(tmp_path):
    from tisdpo.stages.runner import run

    lora = "model.lora={r:4,alpha:8,dropout:0.0,target_modules:all-linear}"
    results = run(compose_config([lora, "eval.n_prompts=8", "eval.max_new_tokens=8"], tmp_path))
    assert results["train/steps"] == 6
    assert math.isfinite(results["val/loss"]) and 0.0 < results["val/loss"] < 2.0
    assert "eval/kl_ref" in results  # the evaluation sampled from the disabled-adapter reference
    assert [e["stage"] for e in results["stages"]].count("reference_logps") == 1


def test_lora_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown option"):
        from tisdpo.models.lora import lora_config

        lora_config({"rank": 4})
