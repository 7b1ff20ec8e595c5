"""Shared-prefix packing: one row per pair gives the standard forward's log-probs, losses and
gradients; KL losses and pairs without a common prompt fall back; a model that ignores the
packing's mask is caught on first use."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tisdpo.data.collate import PreferenceCollator
from tisdpo.kernels.logprobs import token_logps
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.kernels.shared_prefix import pack_pairs, packed_logps, packing_matches
from tisdpo.losses.registry import bind_loss

VOCAB = 50
TINY_MODEL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
OPTIM = OmegaConf.create({"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                          "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}})


def _examples(n=6, seed=0):
    """Pairs with prompts and responses of different lengths (padding everywhere)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c, r = (int(x) for x in torch.randint(1, 9, (3,), generator=g))
        prompt = torch.randint(3, VOCAB, (p,), generator=g).tolist()
        ex = {"prompt_input_ids": prompt, "index": i}
        for side, k in (("chosen", c), ("rejected", r)):
            resp = torch.randint(3, VOCAB, (k,), generator=g).tolist() + [2]
            ex[f"{side}_input_ids"] = prompt + resp
            ex[f"{side}_labels"] = [-100] * p + resp
        out.append(ex)
    return out


def _model(seed=0):
    model = build_model(config=TINY_MODEL, seed=seed)
    with torch.no_grad():  # break the symmetry of a fresh init a little
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + seed)))
    return model


def _standard(model, batch):
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    return token_logps(model(input_ids=ids, attention_mask=attention, use_cache=False).logits, labels)


def test_packed_logps_and_gradients_match_the_standard_forward():
    batch = PreferenceCollator(0)(_examples())
    packed = pack_pairs(batch)
    assert packed is not None
    size, width = batch["chosen_input_ids"].shape
    assert packed.input_ids.shape[0] == size and packed.mask.shape == (2 * size, width - 1)
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    assert int(packed.input_ids.ne(0).sum()) < tokens  # fewer tokens through the model

    model = _model()
    upstream = torch.randn(2 * size, width - 1, generator=torch.Generator().manual_seed(1))
    standard, mask = _standard(model, batch)
    (standard * upstream).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed_values = packed_logps(model, packed, chunk_size=3)
    assert torch.equal(packed.mask, mask)
    assert torch.all(packed_values[~mask] == 0)
    assert torch.allclose(packed_values, standard, atol=1e-5)
    (packed_values * upstream).sum().backward()
    scale = max(g.abs().max().item() for g in expected.values())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5 * max(1.0, scale)), name


def test_packed_under_bf16_autocast():
    batch = PreferenceCollator(0)(_examples(seed=3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ok, diff = packing_matches(_model(), batch, pack_pairs(batch))
    assert ok and diff < 0.1


@pytest.mark.parametrize("overrides", [["loss=dpo"], ["loss=ipo"], ["loss=kto"],
                                       ["loss=tisdpo", "loss.use_eta=false", "estimator=uniform"],
                                       ["loss=tidpo", "loss.base=dpo", "estimator=uniform", "loss.triplet.gamma=0"]])
def test_module_loss_and_gradients_are_unchanged(overrides):
    batch = PreferenceCollator(0)(_examples(n=8, seed=5))
    spec = bind_loss(compose_config(overrides, tiny=False).loss)
    uniform = (lambda ctx: (torch.ones_like(ctx.batch["chosen_labels"], dtype=torch.float),
                            torch.ones_like(ctx.batch["rejected_labels"], dtype=torch.float)))
    results = []
    for shared in (False, True):
        policy = _model(seed=0)
        module = PreferenceModule(policy, frozen_copy(_model(seed=1)), spec, OPTIM, pad_token_id=0, shared_prefix=shared,
                                  online_weights=uniform if spec.uses_weights else None)
        assert (module.packed_pairs(batch) is not None) is shared
        loss, metrics = module.compute(batch)
        loss.backward()
        results.append((loss.item(), metrics["rewards/margins"].item(), [p.grad.clone() for p in policy.parameters()]))
    (a, margin_a, grads_a), (b, margin_b, grads_b) = results
    assert abs(a - b) < 1e-6 * max(1.0, abs(a)) and abs(margin_a - margin_b) < 1e-6 * max(1.0, abs(margin_a))
    scale = max(1.0, max(g.abs().max().item() for g in grads_a))
    assert max((x - y).abs().max().item() for x, y in zip(grads_a, grads_b)) < 1e-5 * scale


def test_kl_losses_and_unshared_prompts_fall_back():
    batch = PreferenceCollator(0)(_examples())
    for overrides in (["loss=tdpo"], ["loss=tisdpo", "estimator=uniform"]):
        spec = bind_loss(compose_config(overrides, tiny=False).loss)
        module = PreferenceModule(_model(), frozen_copy(_model()), spec, OPTIM, shared_prefix=True)
        assert module.packed_pairs(batch) is None
    other = dict(batch)
    other["rejected_input_ids"] = batch["rejected_input_ids"].clone()
    other["rejected_input_ids"][0, 0] += 1  # pair 0's prompts now differ
    assert pack_pairs(other) is None


class IgnoresPositions(torch.nn.Module):
    """A model that drops position_ids: packing would be silently wrong for it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, position_ids=None, **kwargs):
        return self.model(*args, **kwargs)


class SlicesLikeOldTransformers(torch.nn.Module):
    """A causal LM that slices ``hidden_states[:, logits_to_keep, :]`` as transformers < 5.21 does:
    an IndexError for the [B, L] boolean mask (seen on an H200 image with transformers 5.17)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=use_cache).last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return SimpleNamespace(logits=self.model.lm_head(hidden[:, kept, :]))


def test_models_without_a_boolean_logits_to_keep_get_every_position_and_the_same_values():
    batch = PreferenceCollator(0)(_examples(seed=3))
    packed = pack_pairs(batch)
    model = _model()
    old = SlicesLikeOldTransformers(model)
    with pytest.raises(IndexError):  # what the packed forward used to hit
        old(packed.input_ids, packed.attention_mask, packed.position_ids, logits_to_keep=packed.keep)
    assert torch.equal(packed_logps(old, packed), packed_logps(model, packed))
    ok, diff = packing_matches(old, batch, packed)
    assert ok and diff < 1e-5


def test_a_model_that_breaks_packing_is_caught_on_first_use(caplog):
    batch = PreferenceCollator(0)(_examples(seed=7))
    broken = IgnoresPositions(_model())
    ok, diff = packing_matches(broken, batch, pack_pairs(batch))
    assert not ok and diff > 1e-3
    spec = bind_loss(compose_config(["loss=dpo"], tiny=False).loss)
    module = PreferenceModule(broken, frozen_copy(broken), spec, OPTIM, shared_prefix=True)
    with caplog.at_level("WARNING"):
        assert module.packed_pairs(batch) is None
    assert module.shared_prefix is False and "packing is off" in caplog.text
    loss, _ = module.compute(batch)  # the standard forward
    assert torch.isfinite(loss)


def test_packing_with_a_lora_reference():
    pytest.importorskip("peft")
    from tisdpo.models.lora import policy_and_reference

    batch = PreferenceCollator(0)(_examples(seed=9))
    base = _model()
    expected, _ = _standard(base, batch)
    policy, reference = policy_and_reference(base, {"r": 4, "alpha": 8, "dropout": 0.0})
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    with torch.no_grad():
        assert torch.allclose(packed_logps(reference, pack_pairs(batch)), expected, atol=1e-5)
        assert not torch.allclose(packed_logps(policy, pack_pairs(batch)), expected, atol=1e-3)
