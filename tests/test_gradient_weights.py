"""TI-DPO: gradient attribution, prior mixing, no gradient leaks, triplet term on policy anchors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY_MODEL, compose_config
from tisdpo.data.collate import PreferenceCollator
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.losses.record import StepContext
from tisdpo.losses.registry import bind_loss
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig
from tisdpo.losses.tidpo_triplet import TripletTerm
from tisdpo.weights.gradient import GradientWeights, embedding_attribution



@pytest.fixture(scope="module")
def setup():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=16, n_test_pairs=8))
    tokenizer = task.tokenizer()
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, compose_config([], tiny=False).dataset, "train")
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples[:6])
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=1)
    return tokenizer, batch, policy


def _explicit_attribution(model, ids: list[int]) -> torch.Tensor:
    """One sequence, no padding: d max_v logits[-1, v] / d e_t, L1 over the embedding dim."""
    embeddings = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings).logits[0, -1]
    logits.max().backward()
    return embeddings.grad[0].abs().sum(-1)


def test_attribution_equals_explicit_per_sequence_autograd(setup):
    _, batch, policy = setup
    ids, attention = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    batched = embedding_attribution(policy, ids, attention)
    assert all(p.grad is None for p in policy.parameters()), "attribution leaked gradients into parameters"
    for row in range(ids.shape[0]):
        n = int(attention[row].sum())
        expected = _explicit_attribution(policy, ids[row, :n].tolist())
        torch.testing.assert_close(batched[row, :n], expected, atol=1e-5, rtol=1e-4)
        assert torch.all(batched[row, n:] == 0)
    policy.zero_grad(set_to_none=True)


def test_weights_mean_one_on_response_and_one_on_prompt(setup):
    _, batch, policy = setup
    chosen, rejected = GradientWeights(lam=0.7)(StepContext(policy=policy, reference=None, batch=batch, step=0))
    for weights, labels in ((chosen, batch["chosen_labels"]), (rejected, batch["rejected_labels"])):
        response = labels != -100
        means = (weights * response).sum(-1) / response.sum(-1)
        torch.testing.assert_close(means, torch.ones_like(means))
        assert torch.all(weights[~response] == 1.0)
        assert not weights.requires_grad


def test_prior_only_and_importance_only(setup):
    _, batch, policy = setup
    response = batch["chosen_labels"] != -100
    prior_only, _ = GradientWeights(lam=0.0)(StepContext(policy=policy, reference=None, batch=batch, step=0))
    row = prior_only[0][response[0]]
    n = len(row)
    t = torch.arange(n, dtype=torch.float)
    prior = torch.exp(-0.5 * ((t - (n - 1) / 2) / (n / 4)) ** 2)
    torch.testing.assert_close(row, n * prior / prior.sum())
    importance_only, _ = GradientWeights(lam=1.0)(StepContext(policy=policy, reference=None, batch=batch, step=0))
    attribution = embedding_attribution(policy, batch["chosen_input_ids"], batch["chosen_attention_mask"])[0][response[0]]
    torch.testing.assert_close(importance_only[0][response[0]], n * attribution / attribution.sum())


def _tidpo_module(tokenizer, policy, gamma=0.1):
    cfg = compose_config(["loss=tidpo"], tiny=False)
    optim = OmegaConf.create({"lr": 1e-3, "warmup_steps": 0, "schedule": "constant",
                              "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}})
    loss = dataclasses.replace(bind_loss(cfg.loss, tokenizer),
                               auxiliary=TripletTerm(tokenizer, gamma=gamma, margin=0.1, max_new_tokens=6))
    return PreferenceModule(policy, frozen_copy(policy), loss, optim,
                            online_weights=GradientWeights(), pad_token_id=tokenizer.pad_token_id)


def test_triplet_gradients_reach_the_policy_through_anchor_chosen_and_rejected(setup):
    tokenizer, batch, policy = setup
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=2)
    module = _tidpo_module(tokenizer, policy)
    # Move the policy off the reference so that the implicit rewards are non-zero.
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(0)
    ids, attention, labels = module.loss.auxiliary.anchor_batch(module.step_context(batch))
    assert (labels != -100).any(dim=1).all(), "every example has an anchor response"
    from tisdpo.losses import triplet_loss
    from tisdpo.kernels.logprobs import token_logps

    def logps(model, ids_, attention_, labels_):
        lp, mask = token_logps(model(input_ids=ids_, attention_mask=attention_).logits, labels_)
        return lp, mask.float()

    anchor_p, anchor_m = logps(module.policy, ids, attention, labels)
    with torch.no_grad():
        anchor_r, _ = logps(module.reference, ids, attention, labels)
    chosen_p, chosen_m = logps(module.policy, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
    rejected_p, rejected_m = logps(module.policy, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"])
    with torch.no_grad():
        chosen_r, _ = logps(module.reference, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_labels"])
        rejected_r, _ = logps(module.reference, batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"])
    for p in (anchor_p, chosen_p, rejected_p):
        p.retain_grad()
    loss = triplet_loss(anchor_p, anchor_r, anchor_m, chosen_p, chosen_r, chosen_m, rejected_p, rejected_r, rejected_m,
                        margin=10.0)  # a large margin keeps every hinge active
    loss.backward()
    for name, p in (("anchor", anchor_p), ("chosen", chosen_p), ("rejected", rejected_p)):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_tidpo_step_trains_policy_and_leaves_reference(setup):
    tokenizer, batch, _ = setup
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=4)
    module = _tidpo_module(tokenizer, policy)
    before = [p.detach().clone() for p in module.reference.parameters()]
    loss, metrics = module.compute(batch)
    loss.backward()
    assert "triplet/loss" in metrics
    assert sum(p.grad.abs().sum() for p in module.policy.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in module.reference.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, module.reference.parameters()))


def test_anchors_are_resampled_only_when_stale(setup):
    tokenizer, batch, _ = setup
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=5)
    module = _tidpo_module(tokenizer, policy)
    module.loss.auxiliary.anchor_every = 3
    module.loss.auxiliary.anchor_batch(module.step_context(batch))
    first = dict(module.loss.auxiliary.anchors)
    module.loss.auxiliary.anchor_batch(module.step_context(batch))  # same step: reuse
    assert module.loss.auxiliary.anchors == first


def _released_sequence_weights(importance: torch.Tensor, attention: torch.Tensor, lam: float, sigma_div: float = 4.0):
    """The released code's _compute_token_importance_weights on its TDPO path (no labels), re-derived:
    span = every attended position; I / sum(I) mixed with a Gaussian over the span; x n."""
    out = torch.zeros_like(importance)
    for i in range(importance.shape[0]):
        idx = torch.nonzero(attention[i].bool()).squeeze(-1)
        n = len(idx)
        scores = importance[i][idx].clamp_min(0)
        pos = torch.arange(n, dtype=torch.float32)
        prior = torch.exp(-0.5 * ((pos - (n - 1) / 2) / max(1.0, n / sigma_div)) ** 2)
        mixed = lam * scores / scores.sum() + (1 - lam) * prior / prior.sum()
        out[i][idx] = mixed / mixed.sum() * n
    return out


def test_sequence_normalisation_is_the_released_arithmetic(setup):
    _, batch, policy = setup
    chosen, _ = GradientWeights(lam=0.7, normalize="sequence")(StepContext(policy=policy, reference=None, batch=batch, step=0))
    ids, attention = batch["chosen_input_ids"], batch["chosen_attention_mask"]
    expected = _released_sequence_weights(embedding_attribution(policy, ids, attention), attention, 0.7)
    response = batch["chosen_labels"] != -100
    torch.testing.assert_close(chosen[response], expected[response], atol=1e-5, rtol=1e-4)
    means = (chosen * response).sum(-1) / response.sum(-1)
    assert not torch.allclose(means, torch.ones_like(means))  # the response's share is not mean 1
    policy.zero_grad(set_to_none=True)


@pytest.mark.parametrize("normalize", ["response", "sequence"])
def test_weight_eos_false_gives_eos_zero_and_leaves_it_out_of_the_span(setup, normalize):
    tokenizer, batch, policy = setup
    eos = tokenizer.eos_token_id
    weights, _ = GradientWeights(lam=0.7, normalize=normalize, weight_eos=False, eos_token_id=eos)(StepContext(policy=policy, reference=None, batch=batch, step=0))
    response = batch["chosen_labels"] != -100
    at_eos = response & (batch["chosen_input_ids"] == eos)
    assert at_eos.sum(-1).eq(1).all() and torch.all(weights[at_eos] == 0)
    if normalize == "response":
        rest = response & ~at_eos
        means = (weights * rest).sum(-1) / rest.sum(-1)
        torch.testing.assert_close(means, torch.ones_like(means))
    with pytest.raises(ValueError, match="eos_token_id"):
        GradientWeights(weight_eos=False)


def test_tidpo_defaults_follow_the_released_code():
    cfg = compose_config(["loss=tidpo"], tiny=False)
    assert (cfg.loss.base, cfg.loss.alpha, cfg.estimator.normalize, cfg.estimator.weight_eos) == ("tdpo2", 0.5, "sequence", True)
    assert (cfg.estimator.lam, cfg.loss.beta, cfg.loss.triplet.gamma) == (0.7, 0.1, 0.1)  # the paper's values


def test_validation_anchors_never_stand_in_for_training_ones(setup):
    """Training and validation examples both number from 0: the anchor cache keys them by split, so
    validation at step N does not hand its anchors to training step N."""
    tokenizer, batch, _ = setup
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=5)
    module = _tidpo_module(tokenizer, policy)
    module.policy.eval()  # as Lightning leaves it during validation
    module.loss.auxiliary.anchor_batch(module.step_context(batch))
    module.policy.train()
    module.loss.auxiliary.anchor_batch(module.step_context(batch))
    splits = {split for split, _ in module.loss.auxiliary.anchors}
    assert splits == {"train", "val"}
    assert len(module.loss.auxiliary.anchors) == 2 * len(batch["index"])
