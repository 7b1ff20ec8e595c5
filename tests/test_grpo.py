"""GRPO: the pure loss against an independent float64 loop, group advantages in closed form, the
loss's invariants, the sampling helpers, and a tiny end-to-end run through the runner."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tisdpo.losses.grpo import RECORD, group_advantages, grpo_loss
from tisdpo.modules.grpo import PromptCollator, completion_tokens


def loop_grpo(pi, old, ref, mask, adv, clip_eps, beta):
    """Token by token in float64 Python arithmetic: DeepSeekMath eq. 3 with the k3 KL."""
    losses, kls, clips = [], [], []
    for i in range(len(pi)):
        total = kl_total = cut = 0.0
        n = 0
        for t in range(len(pi[i])):
            if not mask[i][t]:
                continue
            n += 1
            ratio = math.exp(pi[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            surrogate = min(ratio * adv[i], clipped * adv[i])
            d = ref[i][t] - pi[i][t]
            kl = math.exp(d) - d - 1
            total += surrogate - beta * kl
            kl_total += kl
            cut += (ratio < 1 - clip_eps and adv[i] < 0) or (ratio > 1 + clip_eps and adv[i] > 0)
        n = max(n, 1)
        losses.append(-total / n)
        kls.append(kl_total / n)
        clips.append(cut / n)
    return losses, kls, clips


def random_inputs(seed: int, n: int = 6, t: int = 9, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    pi = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = pi + spread * torch.randn(n, t, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    ref = pi + torch.randn(n, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[0] = False  # an empty completion: loss 0, no division by zero
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return pi, old, ref, mask, adv


@pytest.mark.parametrize("seed,clip_eps,beta", [(0, 0.2, 0.04), (1, 0.1, 0.5), (2, 0.3, 0.0)])
def test_grpo_loss_matches_a_float64_loop(seed, clip_eps, beta):
    pi, old, ref, mask, adv = random_inputs(seed)
    losses, kl, clipped = grpo_loss(pi, old, ref, mask.to(pi.dtype), adv, clip_eps=clip_eps, beta=beta)
    want = loop_grpo(pi.tolist(), old.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), clip_eps, beta)
    for got, expected in zip((losses, kl, clipped), want):
        assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-10)
    # the draw exercises both sides of the clip and both signs of the advantage
    ratio = torch.exp(pi - old)[mask]
    assert (ratio > 1 + clip_eps).any() and (ratio < 1 - clip_eps).any()
    assert clipped.sum() > 0 and losses[0] == 0 and kl[0] == 0


def test_masked_positions_change_nothing():
    pi, old, ref, mask, adv = random_inputs(3)
    base = grpo_loss(pi, old, ref, mask, adv)
    noise = torch.randn_like(pi) * (~mask)
    moved = grpo_loss(pi + noise, old - noise, ref + 2 * noise, mask, adv)
    for a, b in zip(base, moved):
        assert torch.allclose(a, b)


def test_ratio_one_without_kl_is_minus_the_advantage_and_its_gradient():
    """β = 0 and π_old = π_θ: L_i = −Â_i, and ∂L_i/∂π_t = −Â_i mask_t / |o_i| (the policy gradient)."""
    pi, _, ref, mask, adv = random_inputs(4)
    mask[0, :3] = True
    pi = pi.clone().requires_grad_(True)
    losses, kl, clipped = grpo_loss(pi, pi.detach(), ref, mask, adv, beta=0.0)
    assert torch.allclose(losses, -adv)
    assert (clipped == 0).all()
    losses.sum().backward()
    expected = -adv[:, None] * mask / mask.sum(-1, keepdim=True)
    assert torch.allclose(pi.grad, expected)


def test_kl_is_zero_at_the_reference_and_nonnegative_elsewhere():
    pi, old, ref, mask, adv = random_inputs(5)
    _, kl_same, _ = grpo_loss(pi, old, pi.clone(), mask, adv)
    assert (kl_same == 0).all()
    _, kl, _ = grpo_loss(pi, old, ref, mask, adv)
    assert (kl >= 0).all() and (kl[mask.any(-1)] > 0).all()
    # at the reference the KL term's gradient is zero too: only the surrogate's remains
    p1 = pi.clone().requires_grad_(True)
    p2 = pi.clone().requires_grad_(True)
    grpo_loss(p1, pi, pi, mask, adv, beta=1.0)[0].sum().backward()
    grpo_loss(p2, pi, pi, mask, adv, beta=0.0)[0].sum().backward()
    assert torch.allclose(p1.grad, p2.grad)


def test_clipped_tokens_get_no_surrogate_gradient():
    """ρ > 1 + ε with Â > 0, or ρ < 1 − ε with Â < 0: the clipped branch is taken, its gradient is 0."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    pi = torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.0, -0.5]], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    losses, _, clipped = grpo_loss(pi, old, pi.detach(), mask, adv, clip_eps=0.2, beta=0.0)
    losses.sum().backward()
    grad = pi.grad
    assert grad[0, 0] == 0 and grad[0, 1] != 0 and grad[0, 2] != 0  # Â>0: only the high side is cut
    assert grad[1, 2] == 0 and grad[1, 1] != 0 and grad[1, 0] != 0  # Â<0: only the low side is cut
    assert torch.allclose(clipped, torch.tensor([1 / 3, 1 / 3], dtype=torch.float64))


def test_group_advantages_closed_form():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 4.0, 2.0]], dtype=torch.float64)
    eps = 1e-4
    adv = group_advantages(rewards, eps)
    # group 1: mean 2, sample std 1; group 2: constant -> 0; group 3: mean 2, sample std 2
    expected = torch.tensor([[-1.0 / (1 + eps), 0.0, 1.0 / (1 + eps)], [0.0, 0.0, 0.0],
                             [-2.0 / (2 + eps), 2.0 / (2 + eps), 0.0]], dtype=torch.float64)
    assert torch.allclose(adv, expected)
    assert torch.allclose(adv.sum(1), torch.zeros(3, dtype=torch.float64))
    # invariant to a per-group shift and (up to eps) to a positive per-group scale
    moved = group_advantages(rewards * torch.tensor([[3.0], [1.0], [0.5]], dtype=torch.float64) + 7.0, 1e-12)
    assert torch.allclose(moved, group_advantages(rewards, 1e-12), atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(4, 1))


def test_group_mean_loss_is_zero_at_ratio_one_without_kl():
    """Group-normalised advantages sum to 0, so at ρ = 1 and β = 0 the batch loss is 0 (its gradient is not)."""
    g = torch.Generator().manual_seed(7)
    adv = group_advantages(torch.randn(3, 4, generator=g, dtype=torch.float64)).reshape(-1)
    pi = -torch.rand(12, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(12, 5, dtype=torch.float64)
    losses, _, _ = grpo_loss(pi, pi, pi, mask, adv, beta=0.0)
    assert abs(float(losses.mean())) < 1e-12


def test_record_and_shapes():
    assert RECORD.pairwise is False and RECORD.fn is grpo_loss
    pi = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(pi, pi, pi, pi, torch.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(pi, pi, pi, torch.zeros(2, 4), torch.zeros(2))


def test_completion_tokens_keep_eos_when_pad_is_eos():
    eos, pad = 2, 2
    assert completion_tokens([5, 6, eos, pad, pad], {eos}) == ([5, 6, eos], True)
    assert completion_tokens([eos, pad], {eos}) == ([eos], True)
    assert completion_tokens([5, 6, 7], {eos}) == ([5, 6, 7], False)  # cut off: no EOS invented
    # pad != EOS: a pad sampled before the EOS stays (the eval stage scores it as an invalid token)
    assert completion_tokens([5, 0, 6, eos, 0], {eos}) == ([5, 0, 6, eos], True)


def test_prompt_collator_left_pads():
    batch = PromptCollator(0)([{"prompt": "a", "prompt_input_ids": [4, 5], "index": 3},
                               {"prompt": "b", "prompt_input_ids": [7], "index": 1}])
    assert batch["prompt_input_ids"].tolist() == [[4, 5], [0, 7]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["index"].tolist() == [3, 1] and batch["prompt"] == ["a", "b"]


def test_grpo_composes_at_paper_scale():
    from conftest import compose_config
    from tisdpo.registry import loss_record

    cfg = compose_config(["method=grpo", "scale=paper"], tiny=False)
    assert cfg.loss.name == "grpo" and cfg.label == "GRPO"
    assert loss_record(cfg.loss).pairwise is False
    cfg = compose_config(["experiment=tidpo_main", "method=grpo", "scale=paper"], tiny=False)
    assert cfg.loss.name == "grpo"


def test_grpo_runs_end_to_end_through_the_runner(tmp_path):
    from conftest import compose_config
    from tisdpo.stages.runner import run

    cfg = compose_config(["method=grpo", "loss.group_size=4", "train.batch_size=4", "train.max_steps=4",
                          "checkpoint.every_n_steps=2", "eval.every_n_steps=2", "eval.curve_n_prompts=8"], tmp_path)
    results = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["train/steps"] == 4 == results["train/steps"]
    assert math.isfinite(saved["eval/true_reward"]) and math.isfinite(saved["eval/ref_true_reward"])
    assert math.isfinite(saved["train/reward/mean"]) and 0 <= saved["train/clip_ratio"] <= 1
    assert saved["config"]["loss"]["name"] == "grpo"
    assert [point["step"] for point in saved["eval/curve"]] == [0, 1, 2, 4]  # the reward-vs-KL curve (dense start)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def _tiny_module(unfinished: str, reward_fn=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tisdpo.losses.record import BoundLoss
    from tisdpo.modules.grpo import GRPOModule
    from tisdpo.tasks.synthetic import SyntheticTask

    task = SyntheticTask()
    tokenizer = task.tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**task.tiny_model_config(hidden_size=32, intermediate_size=64,
                                                                   num_hidden_layers=1, num_attention_heads=2,
                                                                   num_key_value_heads=2)))
    reward_fn = reward_fn or (lambda prompts, responses: [1.0] * len(responses))
    module = GRPOModule(policy, policy, BoundLoss("grpo", grpo_loss, RECORD), None, tokenizer, reward_fn,
                        group_size=2, max_new_tokens=4, unfinished=unfinished, unfinished_reward=-3.0)
    return module, task, tokenizer


@pytest.mark.parametrize("unfinished,expected", [("penalize", [1.0, -3.0]), ("keep", [1.0, 1.0]),
                                                 ("exclude", [1.0, 1.0])])
def test_unfinished_completions(unfinished, expected):
    module, _, _ = _tiny_module(unfinished)
    assert module.rewards(["<t0> q1"], [[5, 2], [5, 6]], [True, False]).tolist() == expected


def test_one_step_samples_scores_and_backpropagates():
    seen = {}

    def reward(prompts, responses):
        seen["pairs"] = list(zip(prompts, responses))
        return [float(len(r.split())) for r in responses]

    module, task, tokenizer = _tiny_module("exclude", reward)
    prompts = task.prompts(3, split="train")
    examples = [{"prompt": p, "prompt_input_ids": tokenizer(p).input_ids, "index": i} for i, p in enumerate(prompts)]
    loss, metrics = module.compute(PromptCollator(tokenizer.pad_token_id)(examples))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in module.policy.parameters())
    assert [p for p, _ in seen["pairs"]] == [p for p in prompts for _ in range(2)]  # G per prompt, prompt-major
    assert all("<eos>" not in r for _, r in seen["pairs"])  # the reward never sees the EOS
    assert metrics["kl"] == 0 and metrics["clip_ratio"] == 0  # the reference is the policy; one update per sample
    assert 0 <= float(metrics["completion/finished"]) <= 1 and float(metrics["completion/length"]) <= 4


def test_reward_model_reward(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from omegaconf import OmegaConf

    from tisdpo.stages.grpo import build_reward
    from tisdpo.tasks.synthetic import SyntheticTask

    tokenizer = SyntheticTask().tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id, hidden_size=16,
                         intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    node = OmegaConf.create({"reward": "auto", "reward_model": {"model_name_or_path": str(tmp_path / "rm"),
                                                                "template": "{prompt} {response}", "device": "cpu"}})
    fn, skip_special = build_reward(node, task=None)  # auto without the built-in task: the reward model
    scores = fn(["<t0> q1", "<t1> q2"], ["w1 w2", "t1_good0"])
    assert skip_special and len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
