"""The preference LightningModule: each loss trains (loss falls), the reference never changes."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY_MODEL, compose_config
from tisdpo.data.collate import PreferenceCollator
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.losses.registry import bind_loss
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig



@pytest.fixture(scope="module")
def setup():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=16, n_test_pairs=8))
    tokenizer = task.tokenizer()
    cfg = compose_config([], tiny=False)
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, cfg.dataset, "train")
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples[:8])
    return tokenizer, batch


def _module(loss_overrides: list[str], tokenizer, **kwargs):
    cfg = compose_config(loss_overrides, tiny=False)
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
    optim = OmegaConf.create({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                              "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}})
    return PreferenceModule(policy, frozen_copy(policy), bind_loss(cfg.loss, tokenizer), optim,
                            pad_token_id=tokenizer.pad_token_id, **kwargs)


def _uniform_weights(ctx):
    batch = ctx.batch
    return torch.ones_like(batch["chosen_labels"], dtype=torch.float), torch.ones_like(batch["rejected_labels"], dtype=torch.float)


@pytest.mark.parametrize("overrides", [
    ["loss=dpo"], ["loss=dpo", "loss.label_smoothing=0.1"], ["loss=ipo"], ["loss=kto"],
    ["loss=tdpo", "loss.variant=tdpo1"], ["loss=tdpo"], ["loss=tisdpo"], ["loss=tisdpo", "loss.use_eta=false"],
    ["loss=tidpo", "estimator=uniform"],
])
def test_loss_falls_and_reference_is_frozen(setup, overrides):
    tokenizer, batch = setup
    module = _module(overrides, tokenizer, online_weights=_uniform_weights if "loss=tisdpo" in overrides or "loss=tidpo" in overrides else None)
    reference_before = [p.detach().clone() for p in module.reference.parameters()]
    optimizer = torch.optim.Adam(module.policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, metrics = module.compute(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(p.grad is None for p in module.reference.parameters())
    assert losses[-1] < losses[0] - 1e-3, losses
    for before, after in zip(reference_before, module.reference.parameters()):
        assert torch.equal(before, after)
    assert set(metrics) >= {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}
    assert metrics["rewards/accuracies"] > 0.5


def test_dpo_is_ln2_at_start(setup):
    tokenizer, batch = setup
    loss, metrics = _module(["loss=dpo"], tokenizer).compute(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


def test_kto_uses_mismatched_pairs(setup):
    tokenizer, batch = setup
    from tisdpo.losses.kto_reference import mismatched_batch

    ids, attention, labels = mismatched_batch(batch, tokenizer.pad_token_id)
    # row 0 = prompt of example 0 followed by the chosen response of example 1
    prompt0 = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()].tolist()
    response1 = batch["chosen_input_ids"][1][batch["chosen_labels"][1] != -100].tolist()
    assert ids[0][attention[0].bool()].tolist() == prompt0 + response1
    assert labels[0][labels[0] != -100].tolist() == response1


def test_reference_not_in_state_dict(setup):
    tokenizer, _ = setup
    module = _module(["loss=dpo"], tokenizer)
    assert all(not k.startswith("reference") for k in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in module.policy.parameters())
