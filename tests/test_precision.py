"""Precision and memory options: bf16-mixed on the CPU end to end, gradient checkpointing,
padding to a multiple, length-grouped batches."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tisdpo.data.collate import LengthGroupedSampler, PreferenceCollator
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.runtime.fit import build_trainer
from tisdpo.stages.loaders import preference_loader, tokenize_pairs
from tisdpo.losses.registry import bind_loss
from tisdpo.stages.loaders import length_grouped
from tisdpo.runtime.fit import enable_gradient_checkpointing
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
OPTIM = OmegaConf.create({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                          "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 0.0}})


@pytest.fixture(scope="module")
def data():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=48, n_test_pairs=8))
    tokenizer = task.tokenizer()
    cfg = compose_config([], tiny=False)
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, cfg.dataset, "train")
    return tokenizer, examples


def _module(tokenizer, loss="dpo"):
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
    spec = bind_loss(compose_config([f"loss={loss}"], tiny=False).loss)
    return PreferenceModule(policy, frozen_copy(policy), spec, OPTIM, total_steps=3, pad_token_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("loss", ["dpo", "tdpo"])  # tdpo: the per-position KL kernel under autocast too
def test_bf16_mixed_fit_on_cpu(data, loss):
    tokenizer, examples = data
    module = _module(tokenizer, loss)
    seen = []
    forward = module.forward_logits

    def recording(model, batch):
        logits = forward(model, batch)
        seen.append(logits.dtype)
        return logits

    module.forward_logits = recording
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer = build_trainer(compose_config(["trainer.precision=bf16-mixed"], tiny=False).trainer, max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, inference_mode=False,
                            log_every_n_steps=1)
    trainer.fit(module, preference_loader(examples, tokenizer, 8, shuffle=True, seed=0))
    assert seen and set(seen) == {torch.bfloat16}  # autocast ran the models in bf16
    assert all(p.dtype == torch.float32 for p in module.policy.parameters())  # fp32 master weights
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in module.policy.named_parameters())
    # per-token log-probs come out in fp32 from bf16 logits, with bf16 gradients into the model
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_value, _ = module.compute(batch)
    assert loss_value.dtype == torch.float32 and torch.isfinite(loss_value)


def test_bf16_mixed_pipeline_end_to_end(tmp_path):
    from tisdpo.stages.runner import run

    results = run(compose_config(["trainer.precision=bf16-mixed", "eval.n_prompts=8", "eval.max_new_tokens=8"], tmp_path))
    assert results["train/steps"] == 6 and math.isfinite(results["val/loss"])
    assert math.isfinite(results["eval/true_reward"])
    built = [e for e in results["stages"] if e["stage"] == "reference_logps"]
    assert built, "the reference cache is on by default for DPO"
    spec = json.loads((tmp_path / "cache" / "reference_logps" / built[0]["key"] / "key.json").read_text())
    assert spec["precision"] == "bf16-mixed"  # bf16 reference log-probs are cached apart from fp32 ones


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_gradient_checkpointing_same_loss_and_gradients(data, shared_prefix):
    tokenizer, examples = data
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples[:8])
    results = []
    for checkpointing in (False, True):
        module = _module(tokenizer)
        module.shared_prefix = shared_prefix
        with torch.no_grad():  # move off the reference so the DPO gradient is not trivial
            for p in module.policy.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if checkpointing:
            enable_gradient_checkpointing(module.policy)
            assert module.policy.is_gradient_checkpointing
        module.policy.train()
        loss, _ = module.compute(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) < 1e-6
    assert max(g.abs().max().item() for g in grads_a.values()) > 1e-4


def test_pad_to_multiple_of_does_not_change_the_loss(data):
    tokenizer, examples = data
    module = _module(tokenizer)
    plain = PreferenceCollator(tokenizer.pad_token_id)(examples[:8])
    padded = PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=48)(examples[:8])
    assert padded["chosen_input_ids"].shape[1] % 48 == 0 and padded["chosen_input_ids"].shape[1] > plain["chosen_input_ids"].shape[1]
    with torch.no_grad():
        a, _ = module.compute(plain)
        b, _ = module.compute(padded)
    assert torch.allclose(a, b, atol=1e-6)


def test_length_grouped_batches(data):
    tokenizer, examples = data
    sampler = LengthGroupedSampler.for_pairs(examples, batch_size=8, seed=0, mega=50)
    order = list(sampler)
    assert sorted(order) == list(range(len(examples)))  # a permutation: every pair once per epoch
    assert order == list(sampler)  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled each epoch

    def padded_tokens(indices):
        lengths = [max(len(examples[i]["chosen_input_ids"]), len(examples[i]["rejected_input_ids"])) for i in indices]
        return sum(max(lengths[k: k + 8]) * len(lengths[k: k + 8]) for k in range(0, len(lengths), 8))

    random_order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    assert padded_tokens(order) <= padded_tokens(random_order)
    first = order[:8]
    longest = max(max(len(examples[i]["chosen_input_ids"]), len(examples[i]["rejected_input_ids"])) for i in order)
    assert max(max(len(examples[i]["chosen_input_ids"]), len(examples[i]["rejected_input_ids"])) for i in first) == longest

    loader = length_grouped(preference_loader(examples, tokenizer, 8, shuffle=True, seed=0), 8, seed=0)
    assert isinstance(loader.sampler, LengthGroupedSampler)
    batches = list(loader)
    assert sum(b["index"].numel() for b in batches) == len(examples)


def test_train_options_are_in_the_config():
    cfg = compose_config([], tiny=False)
    assert cfg.train.reference_cache is True
    assert cfg.train.gradient_checkpointing is False and cfg.train.pad_to_multiple_of is None
    assert cfg.train.group_by_length is False
    assert cfg.trainer.precision == "32-true"


def test_step_metrics_reach_the_logger_every_n_steps(data, tmp_path):
    """Step metrics are handed to Lightning only on its logging steps: the logger still gets them all."""
    from lightning.pytorch.loggers import CSVLogger
    import pandas as pd

    tokenizer, examples = data
    module = _module(tokenizer)
    logger = CSVLogger(tmp_path, name="m", version=0)
    trainer = build_trainer(compose_config([], tiny=False).trainer, max_steps=4, logger=logger, log_every_n_steps=2,
                            enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, inference_mode=False)
    trainer.fit(module, preference_loader(examples, tokenizer, 8, shuffle=True, seed=0))
    logger.finalize("success")
    frame = pd.read_csv(tmp_path / "m" / "version_0" / "metrics.csv")
    rows = frame.dropna(subset=["train/loss"])
    assert rows["step"].tolist() == [1, 3]
    for key in ("train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen"):
        assert rows[key].notna().all()
