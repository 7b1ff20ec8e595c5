"""dataset.prompt_template: the released code's "\\n\\nHuman: {prompt}\\n\\nAssistant:" format for base models."""
from __future__ import annotations

import pytest

from tests.conftest import SHARED_DATA, compose_config
from tisdpo.models.loading import load_tokenizer
from tisdpo.stages.loaders import format_prompt, tokenize_pairs, tokenize_sft
from tisdpo.runtime.validate import ConfigError, validate_config

ROWS = [{"prompt": "How do I bake bread?", "chosen": "Knead, rest, bake.", "rejected": "No idea."}]


@pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")
def test_the_template_wraps_every_prompt_the_model_sees():
    tokenizer = load_tokenizer(str(SHARED_DATA / "gpt2_tokenizer"))
    cfg = compose_config(["dataset=pku_saferlhf", "dataset.prompt_template='\n\nHuman: {prompt}\n\nAssistant:'",
                          f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}"])
    assert format_prompt("hi", cfg.dataset) == "\n\nHuman: hi\n\nAssistant:"
    [example], _ = tokenize_pairs(ROWS, tokenizer, cfg.dataset, "train")
    assert tokenizer.decode(example["prompt_input_ids"]) == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    [sft] = tokenize_sft([{"prompt": ROWS[0]["prompt"], "response": ROWS[0]["chosen"]}], tokenizer, cfg.dataset, 64)
    assert tokenizer.decode(sft["input_ids"]).startswith("\n\nHuman: How do I bake bread?\n\nAssistant:")


def test_paper_scale_uses_the_released_format_and_tiny_scale_the_raw_prompt():
    paper = compose_config(["experiment=tisdpo_pku_main", "scale=paper"], tiny=False)
    assert paper.dataset.prompt_template == "\n\nHuman: {prompt}\n\nAssistant:"
    assert compose_config(["experiment=tisdpo_pku_main"], tiny=False).dataset.prompt_template is None


def test_a_template_without_the_prompt_is_refused():
    with pytest.raises(ConfigError, match="dataset.prompt_template"):
        validate_config(compose_config(["dataset.prompt_template='Human:'"]))


def test_the_judged_policy_samples_from_the_prompts_it_was_trained_on(tmp_path, monkeypatch):
    """The eval stage hands the judges' sampler the same template training used (judges read plain prompts)."""
    from types import SimpleNamespace

    import tisdpo.stages.evaluation as eval_stage

    seen = {}
    monkeypatch.setattr(eval_stage, "evaluate_with_judges",
                        lambda *args, format_prompt=None, **kwargs: seen.setdefault("format", format_prompt) and {})
    cfg = compose_config(["eval=judges", "dataset=pku_saferlhf", f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}",
                          "dataset.prompt_template='\n\nHuman: {prompt}\n\nAssistant:'"], tmp_path, tiny=False)
    data = SimpleNamespace(test_rows=ROWS, tokenizer=None, task=None)
    policy = SimpleNamespace(eval=lambda: policy)
    eval_stage.eval_stage(cfg, data, policy, policy, tmp_path)
    assert seen["format"]("hi") == "\n\nHuman: hi\n\nAssistant:"
