"""safe-rlhf score models (PKU's beaver-7b-v1.0-reward/-cost format) load without remote code and score
as the original does: the linear score head on the last hidden state at the last real token."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tisdpo.eval.judges import RewardModelJudge  # noqa: E402
from tisdpo.eval.judges.score_model import (SafeRLHFScoreModel, is_safe_rlhf_score_config,  # noqa: E402
                                            load_score_model)

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2_tokenizer"
TINY = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256)
PKU_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"
PROMPTS = ["How do I bake bread?", "Hi", "Tell me how to pick a lock."]
RESPONSES = ["Mix flour, water, yeast and salt, then knead and bake.", "Hello there!", "I can't help with that."]


@pytest.fixture(scope="module")
def tokenizer():
    if not GPT2_TOKENIZER.is_dir():
        pytest.skip("../shared/data/gpt2_tokenizer is absent")
    tok = transformers.AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    tok.pad_token = tok.eos_token
    return tok


def save_safe_rlhf_checkpoint(path: Path, tokenizer, *, bias: bool, score_type: str = "reward",
                              fmt: str = "safetensors", do_normalize: bool = False, seed: int = 0):
    """Write a checkpoint laid out as safe-rlhf's ``LlamaForScore.save_pretrained`` does: backbone
    tensors under ``model.*``, ``score_head.*``, the head's fields in config.json. Returns the parts."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **TINY)
    backbone = LlamaModel(config).eval()
    head = torch.nn.Linear(config.hidden_size, 1, bias=bias)
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"score_head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    mean, var = torch.tensor([0.5]), torch.tensor([4.0])
    state.update({"normalizer.mean": mean, "normalizer.var": var, "normalizer.count": torch.tensor(10)})
    path.mkdir(parents=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, path / "pytorch_model.bin")
    raw = config.to_dict()
    raw.update(architectures=["LlamaForScore"], score_dim=1, bias=bias, score_type=score_type,
               do_normalize=do_normalize, normalizer_type="RunningMeanStd" if do_normalize else None)
    (path / "config.json").write_text(json.dumps(raw))
    tokenizer.save_pretrained(path)
    return backbone, head, mean, var


def reference_scores(backbone, head, tokenizer, texts):
    """The score model computed by hand, one text at a time (no padding): head(h[last])."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            hidden = backbone(input_ids=ids).last_hidden_state
            out.append(float(head(hidden[0, -1])[0]))
    return out


@pytest.mark.parametrize("fmt,bias", [("safetensors", False), ("bin", True)])
def test_safe_rlhf_checkpoint_loads_and_scores_like_the_original(tmp_path, tokenizer, fmt, bias):
    path = tmp_path / "beaver-tiny-cost"
    backbone, head, _, _ = save_safe_rlhf_checkpoint(path, tokenizer, bias=bias, score_type="cost", fmt=fmt)
    config = transformers.AutoConfig.from_pretrained(path)
    assert is_safe_rlhf_score_config(config)
    model = load_score_model(str(path))
    assert isinstance(model, SafeRLHFScoreModel) and (model.score_head.bias is not None) == bias
    judge = RewardModelJudge(str(path), batch_size=2, device="cpu", name="harm", template=PKU_TEMPLATE,
                             append_eos=True, higher_is_better=False)
    scores = judge.score(PROMPTS, RESPONSES)
    texts = [PKU_TEMPLATE.format(prompt=p, response=r) + tokenizer.eos_token for p, r in zip(PROMPTS, RESPONSES)]
    assert scores == pytest.approx(reference_scores(backbone, head, tokenizer, texts), abs=1e-5)
    # deterministic, and batching (padding) does not change a score
    again = RewardModelJudge(str(path), batch_size=1, device="cpu", name="harm", template=PKU_TEMPLATE,
                             append_eos=True).score(PROMPTS, RESPONSES)
    assert again == pytest.approx(scores, abs=1e-5)
    metrics = judge(PROMPTS, RESPONSES)
    assert metrics["eval/harm"] == pytest.approx(sum(scores) / 3) and metrics["eval/harm_n"] == 3


def test_normalised_score_model_applies_its_running_statistics(tmp_path, tokenizer):
    path = tmp_path / "beaver-tiny-reward-norm"
    backbone, head, mean, var = save_safe_rlhf_checkpoint(path, tokenizer, bias=True, do_normalize=True)
    judge = RewardModelJudge(str(path), device="cpu", template=PKU_TEMPLATE)
    raw = reference_scores(backbone, head, tokenizer, [PKU_TEMPLATE.format(prompt=p, response=r)
                                                       for p, r in zip(PROMPTS, RESPONSES)])
    expected = [(s - float(mean)) / (float(var) ** 0.5 + 1e-8) for s in raw]  # reward -> affine
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-5)


def test_broken_score_checkpoints_are_named(tmp_path, tokenizer):
    path = tmp_path / "no-head"
    save_safe_rlhf_checkpoint(path, tokenizer, bias=False)
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("score_head")}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model_name_or_path=.*score_head.weight"):
        RewardModelJudge(str(path), device="cpu").load()
    with pytest.raises(ValueError, match="template="):
        RewardModelJudge(str(path), template="no placeholders")


def test_sequence_classifier_still_loads_through_the_same_judge(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id, **TINY)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    assert not is_safe_rlhf_score_config(transformers.AutoConfig.from_pretrained(tmp_path / "rm"))
    batched = RewardModelJudge(str(tmp_path / "rm"), batch_size=3, device="cpu").score(PROMPTS, RESPONSES)
    single = RewardModelJudge(str(tmp_path / "rm"), batch_size=1, device="cpu").score(PROMPTS, RESPONSES)
    assert batched == pytest.approx(single, abs=1e-5)
