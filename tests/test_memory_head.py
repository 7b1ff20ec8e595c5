"""Issue 23, scope 5: log-probs and KL from hidden states through the output head, in chunks, equal
the full-logits kernels in value and gradient (so the [N, T, V] logits need never exist)."""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX
from tisdpo.kernels.logprobs import head_position_kl, head_token_logps, per_position_kl, token_logps


def _case(seed=0, n=3, t=7, h=5, v=11):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, :3] = IGNORE_INDEX
    labels[0, -2:] = IGNORE_INDEX
    return hidden, weight, labels


def test_head_token_logps_equal_the_full_logits_kernel():
    hidden, weight, labels = _case()
    for chunk in (1, 2, 64):
        logps, mask = head_token_logps(hidden, weight, labels, chunk_size=chunk)
        ref, ref_mask = token_logps(hidden @ weight.t(), labels)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(logps, ref)
        g = torch.randn(logps.shape, dtype=torch.float64)
        ours = torch.autograd.grad((logps * g).sum(), (hidden, weight))
        theirs = torch.autograd.grad((ref * g).sum(), (hidden, weight))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda h, w: head_token_logps(h, w, labels, chunk_size=2)[0], (hidden, weight))


def test_head_kl_equals_the_full_logits_kernel():
    hidden, weight, labels = _case(1)
    g = torch.Generator().manual_seed(2)
    q_hidden = torch.randn(hidden.shape, generator=g, dtype=torch.float64, requires_grad=True)
    q_weight = torch.randn(weight.shape, generator=g, dtype=torch.float64, requires_grad=True)
    mask = labels[:, 1:] != IGNORE_INDEX
    kl = head_position_kl(hidden, weight, q_hidden, q_weight, mask, chunk_size=2)
    ref = per_position_kl(hidden @ weight.t(), q_hidden @ q_weight.t(), mask)
    torch.testing.assert_close(kl, ref)
    inputs = (hidden, weight, q_hidden, q_weight)
    ours = torch.autograd.grad(kl.sum(), inputs)
    theirs = torch.autograd.grad(ref.sum(), inputs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    # the reference side frozen (TDPO's KL(ref || policy)): gradients to the policy only
    frozen = head_position_kl(q_hidden.detach(), q_weight.detach(), hidden, weight, mask)
    torch.autograd.grad(frozen.sum(), (hidden, weight))


def test_the_preference_step_through_the_head_equals_the_full_logits_step(monkeypatch):
    """A KL loss (TDPO), a weighted loss (TIS-DPO with eta) and DPO: same loss, metrics and gradients
    whether the module takes the chunked head path or the full logits (the tiny-vocabulary default)."""
    from omegaconf import OmegaConf

    from tests.conftest import TINY_MODEL, compose_config
    from tisdpo.data.collate import PreferenceCollator
    from tisdpo.kernels import scoring
    from tisdpo.losses.registry import bind_loss
    from tisdpo.models.loading import build_model, frozen_copy
    from tisdpo.modules.preference import PreferenceModule
    from tisdpo.stages.loaders import tokenize_pairs
    from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

    task = SyntheticTask(SyntheticTaskConfig(n_sft=8, n_train_pairs=8, n_test_pairs=4))
    tokenizer = task.tokenizer()
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, compose_config([], tiny=False).dataset, "train")
    batch = PreferenceCollator(tokenizer.pad_token_id)(examples[:4])
    for side in ("chosen", "rejected"):
        batch[f"{side}_weights"] = torch.rand(batch[f"{side}_input_ids"].shape, generator=torch.Generator().manual_seed(0))
    optim = OmegaConf.create({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                              "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}})
    for overrides in (["loss=tdpo"], ["loss=tisdpo", "estimator=uniform"], ["loss=dpo"]):
        cfg = compose_config(overrides, tiny=False)
        results = []
        for threshold in (1 << 60, 0):  # full logits, then the head in chunks
            monkeypatch.setattr(scoring, "HEAD_CHUNK_MIN_ELEMENTS", threshold)
            policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
            module = PreferenceModule(policy, frozen_copy(policy), bind_loss(cfg.loss, tokenizer, 3), optim,
                                      pad_token_id=tokenizer.pad_token_id, logits_chunk_size=3)
            with torch.no_grad():  # a policy that differs from the reference: non-zero margins and KL
                for p in policy.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
            if threshold == 0:  # the head path must not make the full logits
                module.forward_logits = lambda *a, **k: (_ for _ in ()).throw(AssertionError("full logits made"))
            loss, metrics = module.compute(dict(batch))
            loss.backward()
            results.append((loss.detach(), {k: v.detach() for k, v in metrics.items()},
                            [p.grad.clone() for p in policy.parameters()]))
        (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        assert m_a.keys() == m_b.keys()
        for key in m_a:
            torch.testing.assert_close(m_a[key], m_b[key], rtol=1e-4, atol=1e-5)
        for a, b in zip(g_a, g_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
