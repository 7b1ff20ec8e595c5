"""Reference log-prob cache: same loss as the reference forward, skipped where the loss needs the
full reference distribution, keyed and reused as an artifact, wired into the pipeline."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tisdpo.data.collate import PreferenceCollator
from tisdpo.models.loading import build_model
from tisdpo.modules.preference import PreferenceModule
from tisdpo.kernels.scoring import move_to
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.losses.registry import bind_loss
from tisdpo.stages.reference_logps import (
    attach_reference_logps, cache_applies, compute_reference_logps, reference_logps_key,
    with_reference_logps,
)
from tisdpo.stages.context import RunContext
from tisdpo.stages.reference_logps import reference_logps_stage
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64)
OPTIM = OmegaConf.create({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                          "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}})


@pytest.fixture(scope="module")
def data():
    task = SyntheticTask(SyntheticTaskConfig(n_sft=16, n_train_pairs=24, n_test_pairs=8))
    tokenizer = task.tokenizer()
    cfg = compose_config([], tiny=False)
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, cfg.dataset, "train")
    policy = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0)
    with torch.no_grad():  # move the policy off the reference so that the log-ratios are not all 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = build_model(config=TINY_MODEL, tokenizer=tokenizer, seed=0).eval().requires_grad_(False)
    return tokenizer, examples, policy, reference


class CountingReference(torch.nn.Module):
    """The reference, counting its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def _module(overrides, data, reference):
    tokenizer, _, policy, _ = data
    spec = bind_loss(compose_config(overrides, tiny=False).loss)
    uniform = (lambda ctx: (torch.ones_like(ctx.batch["chosen_labels"], dtype=torch.float),
                            torch.ones_like(ctx.batch["rejected_labels"], dtype=torch.float)))
    return PreferenceModule(policy, reference, spec, OPTIM, pad_token_id=tokenizer.pad_token_id,
                            online_weights=uniform if spec.uses_weights else None)


def _batches(data, cached: bool, batch_size=8):
    tokenizer, examples, _, reference = data
    if cached:
        # a different batching than training's (batch 5, sorted by length): padding must not matter
        logps = compute_reference_logps(reference, examples, tokenizer.pad_token_id, batch_size=5, chunk_size=7)
        examples = attach_reference_logps(examples, logps)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    return [collate(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]


@pytest.mark.parametrize("overrides", [["loss=dpo"], ["loss=dpo", "loss.label_smoothing=0.2"], ["loss=ipo"],
                                       ["loss=tisdpo", "loss.use_eta=false", "estimator=uniform"]])
def test_cached_reference_gives_the_same_loss_and_skips_the_reference(data, overrides):
    counting = CountingReference(data[3])
    module = _module(overrides, data, counting)
    assert cache_applies(module.loss)
    for plain, cached in zip(_batches(data, cached=False), _batches(data, cached=True)):
        assert cached["chosen_reference_logps"].shape == (plain["chosen_input_ids"].shape[0], plain["chosen_input_ids"].shape[1] - 1)
        before = counting.calls
        loss_cached, metrics_cached = module.compute(cached)
        assert counting.calls == before, "the cached path must not run the reference"
        loss_plain, metrics_plain = module.compute(plain)
        assert counting.calls == before + 1
        scale = max(1.0, abs(loss_plain.item()))  # IPO's loss is ~25: 1e-6 relative there
        assert abs(loss_cached.item() - loss_plain.item()) < 1e-6 * scale
        assert abs(metrics_cached["rewards/margins"].item() - metrics_plain["rewards/margins"].item()) < 1e-6 * scale
        assert metrics_plain["rewards/margins"].abs().item() > 1e-4  # the comparison is not vacuous


@pytest.mark.parametrize("overrides", [["loss=tdpo"], ["loss=tisdpo", "estimator=uniform"]])
def test_kl_losses_ignore_the_cache_and_run_the_reference(data, overrides):
    counting = CountingReference(data[3])
    module = _module(overrides, data, counting)
    assert not cache_applies(module.loss)
    cached = _batches(data, cached=True)[0]
    cached["chosen_reference_logps"] += 100.0  # were they used, the loss would change
    cached["rejected_reference_logps"] -= 100.0
    plain = _batches(data, cached=False)[0]
    loss_cached, _ = module.compute(cached)
    assert counting.calls == 1
    loss_plain, _ = module.compute(plain)
    assert abs(loss_cached.item() - loss_plain.item()) < 1e-6


@pytest.mark.parametrize("shared_prefix", [True, False])  # packed pairs (the default) or the [2B, T] forward
def test_cached_values_match_a_per_example_forward(data, shared_prefix):
    tokenizer, examples, _, reference = data
    logps = compute_reference_logps(reference, examples[:6], tokenizer.pad_token_id, batch_size=4,
                                    shared_prefix=shared_prefix)
    for i, example in enumerate(examples[:6]):
        for side in ("chosen", "rejected"):
            ids = torch.tensor([example[f"{side}_input_ids"]])
            labels = torch.tensor(example[f"{side}_labels"])
            with torch.no_grad():
                full = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
            expected = torch.tensor([full[t, labels[t + 1]].item() if labels[t + 1] != -100 else 0.0
                                     for t in range(len(labels) - 1)], dtype=torch.float64)
            got = logps[side][i]
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert torch.allclose(got.double(), expected, atol=1e-5)


def test_artifact_is_keyed_and_reused(data, tmp_path):
    tokenizer, examples, _, reference = data
    cache = ArtifactCache(tmp_path)
    spec = reference_logps_key(examples=examples, reference_id={"sft": "abc"}, precision="32-true")
    first = with_reference_logps(examples, reference=reference, cache=cache, key_fields=spec, pad_token_id=tokenizer.pad_token_id)
    counting = CountingReference(reference)
    again = with_reference_logps(examples, reference=counting, cache=cache, key_fields=spec, pad_token_id=tokenizer.pad_token_id)
    assert counting.calls == 0 and [e["reused"] for e in cache.events] == [False, True]
    for a, b in zip(first, again):
        assert torch.equal(a["chosen_reference_logps"], b["chosen_reference_logps"])
        assert len(a["rejected_reference_logps"]) == len(a["rejected_input_ids"]) - 1
    # anything that changes the values changes the key
    others = [
        reference_logps_key(examples=examples, reference_id={"sft": "other"}, precision="32-true"),
        reference_logps_key(examples=examples, reference_id={"sft": "abc"}, precision="bf16-mixed"),
        reference_logps_key(examples=examples[1:], reference_id={"sft": "abc"}, precision="32-true"),
        reference_logps_key(examples=[{**examples[0], "chosen_labels": examples[0]["chosen_labels"][:-1] + [-100]}]
                             + examples[1:], reference_id={"sft": "abc"}, precision="32-true"),
    ]
    from tisdpo.runtime.cache import stable_hash

    keys = {stable_hash(s) for s in [spec, *others]}
    assert len(keys) == 5


def test_stage_skips_kl_losses(data, tmp_path):
    tokenizer, examples, _, reference = data
    for overrides, applies in ((["loss=dpo"], True), (["loss=kto"], True), (["loss=tdpo"], False),
                               (["loss=tisdpo", "estimator=uniform"], False)):
        cfg = compose_config(overrides + [f"cache.dir={tmp_path / 'c'}"], tiny=False)
        cache = ArtifactCache(tmp_path / "c")
        ctx = RunContext(cfg=cfg, output_dir=tmp_path, cache=cache, data=SimpleNamespace(tokenizer=tokenizer))
        train, val = reference_logps_stage(ctx, bind_loss(cfg.loss), reference, train=examples[:8], val=examples[8:12])
        assert ("chosen_reference_logps" in train[0]) is applies and ("chosen_reference_logps" in val[0]) is applies
        assert bool(cache.events) is applies


def test_pipeline_cache_on_and_off_give_the_same_run(tmp_path):
    from tisdpo.stages.runner import run

    on = run(compose_config(["eval=none"], tmp_path))
    stages = [e["stage"] for e in on["stages"]]
    assert stages.count("reference_logps") == 1  # one artifact: train and validation pairs
    off = run(compose_config(["eval=none", "train.reference_cache=false"], tmp_path))
    assert "reference_logps" not in [e["stage"] for e in off["stages"]]
    assert off["val/loss"] == pytest.approx(on["val/loss"], abs=1e-6)
    assert off["val/rewards/margins"] == pytest.approx(on["val/rewards/margins"], abs=1e-6)
    again = run(compose_config(["eval=none"], tmp_path))
    assert [e["reused"] for e in again["stages"] if e["stage"] == "reference_logps"] == [True]


class _ReportedParameter:
    def __init__(self, device):
        self.device = torch.device(device)


class _ModelThatReportsItsDevice:
    """Moves like a real model: ``.to("cuda")`` leaves parameters that report cuda:0 (no GPU needed)."""

    def __init__(self, movable: bool = True):
        self.parameter, self.movable = _ReportedParameter("cpu"), movable

    def parameters(self):
        yield self.parameter

    def to(self, device):
        device = torch.device(device)
        if self.movable:
            index = device.index if device.index is not None or device.type == "cpu" else 0
            self.parameter = _ReportedParameter(torch.device(device.type, index) if index is not None else device)
        return self


def test_inputs_follow_the_parameters_not_the_requested_device_name():
    # Regression (seen on an H200): "cuda" != "cuda:0" made the cache think the reference had not
    # moved, so it sent the inputs to the CPU while the model was on the GPU.
    model = _ModelThatReportsItsDevice()
    assert move_to(model, "cuda") == (torch.device("cuda", 0), torch.device("cpu"))
    assert move_to(model, "cuda") == (torch.device("cuda", 0), torch.device("cuda", 0))  # already there
    assert move_to(_ModelThatReportsItsDevice(movable=False), "cuda") == (torch.device("cpu"),) * 2  # LoRA view
    assert move_to(_ModelThatReportsItsDevice(), None) == (torch.device("cpu"),) * 2
