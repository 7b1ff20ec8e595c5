"""TIS-DPO weights: batched scorer vs naive, transforms applied per side, alignment, cache behaviour."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import TINY_MODEL, compose_config
from tisdpo.models.loading import build_model
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.eval.weight_quality import true_token_rewards
from tisdpo.stages.estimator_models import swap_pair
from tisdpo.losses import tisdpo_loss
from tisdpo.stages.weights import apply_transform, attach_weights
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig
from tisdpo.weights.contrast import oracle_scores, score_difference, weighted_token_masks
from oracles import naive_response_logps
from tisdpo.kernels.scoring import response_logps



@pytest.fixture(scope="module")
def task_data():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=24, n_test_pairs=8))
    tokenizer = task.tokenizer()
    rows = task.preference_pairs("train")
    examples, _ = tokenize_pairs(rows, tokenizer, compose_config([], tiny=False).dataset, "train")
    return task, tokenizer, rows, examples


def test_batched_scorer_equals_naive_per_example(task_data):
    _, tokenizer, _, examples = task_data
    model = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=3)
    chosen, rejected = response_logps(model, examples, tokenizer.pad_token_id, batch_size=7)
    for i, example in enumerate(examples):
        naive_chosen, naive_rejected = naive_response_logps(model, example)
        torch.testing.assert_close(chosen[i].double(), naive_chosen, atol=1e-5, rtol=0)
        torch.testing.assert_close(rejected[i].double(), naive_rejected, atol=1e-5, rtol=0)


def test_scores_align_with_true_rewards_token_by_token(task_data):
    _, tokenizer, rows, examples = task_data
    truth = true_token_rewards(rows, examples, "chosen")
    for example, rewards in zip(examples, truth):
        response = [t for t, label in zip(example["chosen_input_ids"], example["chosen_labels"]) if label != -100]
        words = rows[example["index"]]["chosen"].split()
        assert len(response) == len(words) + 1 == len(rewards) + 1  # + EOS
        assert tokenizer.convert_ids_to_tokens(response[:-1]) == words


def test_sign_convention_rejected_tokens_that_pi_minus_prefers_weigh_more():
    cfg = OmegaConf.create({"name": "exp_clamp", "exp_clamp": {"k": 1.0, "mu": 1.0, "lower": -0.5, "upper": 0.5,
                                                                "rescale_mean_one": False}})
    scores = [torch.tensor([0.4, -0.4, 0.0])]  # r > 0: pi+ prefers the token; r < 0: pi- prefers it
    chosen = apply_transform(scores, "chosen", cfg)[0]
    rejected = apply_transform(scores, "rejected", cfg)[0]
    assert chosen[0] > 1 > chosen[1] and chosen[2] == 1
    assert rejected[1] > 1 > rejected[0] and rejected[2] == 1
    torch.testing.assert_close(rejected, torch.exp(-scores[0]))


def test_attach_weights_puts_zero_on_prompt_and_weights_on_response(task_data):
    _, _, _, examples = task_data
    weights = {side: [torch.arange(1, 1 + sum(l != -100 for l in e[f"{side}_labels"]), dtype=torch.float)
                      for e in examples[:3]] for side in ("chosen", "rejected")}
    attached = attach_weights(examples[:3], weights)
    for example, out in zip(examples, attached):
        labels = example["chosen_labels"]
        w = out["chosen_weights"]
        assert len(w) == len(labels)
        assert all(v == 0.0 for v, label in zip(w, labels) if label == -100)  # released code: prompt weight 0
        assert [v for v, label in zip(w, labels) if label != -100] == list(range(1, 1 + sum(l != -100 for l in labels)))


def test_prompt_estimator_difference_pads_missing_tail_with_zero():
    scores = score_difference([torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 0.5, 9.0])], [4])
    torch.testing.assert_close(scores[0], torch.tensor([0.5, 1.5, 0.0, 0.0]))


def test_swap_pair_exchanges_sides():
    example = {"chosen_input_ids": [1], "rejected_input_ids": [2], "chosen_labels": [3], "rejected_labels": [4], "index": 0}
    swapped = swap_pair(example)
    assert (swapped["chosen_input_ids"], swapped["rejected_input_ids"]) == ([2], [1])
    assert (swapped["chosen_labels"], swapped["rejected_labels"]) == ([4], [3])


def test_cache_hit_skips_the_build_and_corruption_rebuilds(tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []

    def build(out):
        calls.append(1)
        (out / "x.txt").write_text("payload")

    first = cache.get_or_build("stage", {"a": 1}, build)
    second = cache.get_or_build("stage", {"a": 1}, build)
    assert (first.reused, second.reused, len(calls)) == (False, True, 1)
    assert first.path == second.path
    (first.path / "x.txt").write_text("tampered")  # a corrupt artifact is detected and rebuilt
    third = cache.get_or_build("stage", {"a": 1}, build)
    assert (third.reused, len(calls)) == (False, 2)
    assert (third.path / "x.txt").read_text() == "payload"
    other = cache.get_or_build("stage", {"a": 2}, build)
    assert other.path != first.path and len(calls) == 3


def test_failed_build_leaves_nothing_behind(tmp_path):
    cache = ArtifactCache(tmp_path)

    def build(out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cache.get_or_build("stage", {"a": 1}, build)
    leftovers = [p for p in (tmp_path / "stage").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_eos_carries_no_weight_and_no_rank_by_default(task_data):
    """Released code: the final EOS gets weight 0; the other tokens are ranked among themselves, so
    their mean weight is exactly 1. weight_eos=True (the ablation) ranks EOS with them."""
    _, tokenizer, _, examples = task_data
    eos = tokenizer.eos_token_id
    cfg = compose_config([], tiny=False)
    assert cfg.estimator.get("weight_eos") is None  # estimator=none has no weights at all
    transform = compose_config(["loss=tisdpo", "estimator=dpo_pair"], tiny=False).estimator.transform
    assert transform.name == "rank_linear"
    masks = weighted_token_masks(examples, "chosen", eos)
    scores = [torch.randn(len(m), generator=torch.Generator().manual_seed(i)) for i, m in enumerate(masks)]
    weights = apply_transform(scores, "chosen", transform, masks)
    for w, m in zip(weights, masks):
        assert not m[-1] and m[:-1].all()
        assert w[-1] == 0 and torch.isclose(w[:-1].mean(), torch.tensor(1.0))
    with_eos = weighted_token_masks(examples, "chosen", eos, weight_eos=True)
    weights = apply_transform(scores, "chosen", transform, with_eos)
    assert all(m.all() and w[-1] > 0 and torch.isclose(w.mean(), torch.tensor(1.0)) for w, m in zip(weights, with_eos))


def test_a_zero_eos_weight_takes_eos_out_of_the_margin_and_eta():
    """What the released code does with weight 0 (weights x loss_mask in every sum), ours does too:
    TIS-DPO with w_EOS = 0 equals TIS-DPO with EOS masked out."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    x = [torch.randn(B, T, generator=g) for _ in range(4)]
    kl = [torch.rand(B, T, generator=g) for _ in range(2)]
    w = [0.7 + 0.6 * torch.rand(B, T, generator=g) for _ in range(2)]
    mask = torch.ones(B, T)
    w[0][:, -1] = 0.0
    w[1][:, -1] = 0.0
    no_eos = mask.clone()
    no_eos[:, -1] = 0.0
    kwargs = dict(chosen_kl=kl[0], rejected_kl=kl[1], beta=0.1, alpha=0.5, use_eta=True)
    zero_weight = tisdpo_loss(*x, mask, mask, chosen_weights=w[0], rejected_weights=w[1], **kwargs)
    masked = tisdpo_loss(*x, no_eos, no_eos, chosen_weights=w[0], rejected_weights=w[1], **kwargs)
    for a, b in zip(zero_weight, masked):
        torch.testing.assert_close(a, b)


def test_dpo_pair_estimator_trains_with_the_runs_own_dpo_recipe():
    """pi+/pi- use the DPO baseline's optimiser, lr, schedule, batch and length at each scale."""
    tiny = compose_config(["loss=tisdpo", "estimator=dpo_pair"], tiny=False)
    assert OmegaConf.to_container(tiny.estimator.optim, resolve=True) == OmegaConf.to_container(tiny.optim, resolve=True)
    assert (tiny.estimator.max_steps, tiny.estimator.batch_size) == (tiny.train.max_steps, tiny.train.batch_size)
    paper = compose_config(["loss=tisdpo", "estimator=dpo_pair", "scale=paper", "model=hf", "model.name_or_path=x"],
                           tiny=False)
    assert paper.estimator.optim.optimizer._target_ == "torch.optim.RMSprop"
    assert (paper.estimator.optim.lr, paper.estimator.max_steps) == (5e-7, paper.train.max_steps)


def test_oracle_scores_are_the_true_rewards_with_zero_on_eos(task_data):
    _, _, rows, examples = task_data
    truth = true_token_rewards(rows, examples, "rejected")
    lengths = [len(m) for m in weighted_token_masks(examples, "rejected", None)]
    scores = oracle_scores(truth, lengths)
    for s, t in zip(scores, truth):
        assert len(s) == len(t) + 1 and s[-1] == 0
        torch.testing.assert_close(s[:-1], torch.tensor(t, dtype=torch.float32))
    assert oracle_scores([[1.0, 2.0, 3.0]], [2])[0].tolist() == [1.0, 2.0]  # truncated response
