"""The pipeline on real data files (../shared/data) with a tiny model and tiny local judges."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tests.conftest import SHARED_DATA, compose_config
from tisdpo.stages.runner import run

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=256)


@pytest.fixture(scope="module")
def judge_models(tmp_path_factory):
    """A tiny reward model and a tiny causal LM (the safety classifier), saved like hub checkpoints."""
    root = tmp_path_factory.mktemp("judges")
    tokenizer = GPT2TokenizerFast.from_pretrained(str(SHARED_DATA / "gpt2_tokenizer"))
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id, num_labels=1, **SMALL)
    LlamaForSequenceClassification(config).save_pretrained(root / "rm")
    LlamaForCausalLM(config).save_pretrained(root / "guard")
    for name in ("rm", "guard"):
        tokenizer.save_pretrained(root / name)
    return root


def test_ultrafeedback_file_to_results_with_judges(tmp_path, judge_models):
    cfg = compose_config([
        "dataset=ultrafeedback", f"dataset.path={SHARED_DATA / 'ultrafeedback_binarized_train_1k.jsonl'}",
        f"dataset.test_path={SHARED_DATA / 'ultrafeedback_binarized_test_200.jsonl'}",
        "dataset.limit=24", "dataset.test_limit=8", "dataset.max_length=64", "dataset.max_prompt_length=32",
        "train.batch_size=4", "train.eval_batch_size=8", "sft.batch_size=4",
        f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}", "sft.max_steps=3", "train.max_steps=3",
        "eval=judges", "eval.n_prompts=4", "eval.max_new_tokens=6", "eval.temperatures=[1.0,0.5]",
        f"eval.judges.harm.model_name_or_path={judge_models / 'rm'}",
        f"eval.judges.help.model_name_or_path={judge_models / 'rm'}",
        f"eval.judges.safety.model_name_or_path={judge_models / 'guard'}", "eval.judges.safety.max_new_tokens=3",
    ], tmp_path)
    results = run(cfg)
    for key in ("val/rewards/accuracies", "eval/harm", "eval/help", "eval/help@T0.5", "eval/safe_unparsed",
                "data/train/kept", "data/test/kept"):
        assert key in results, key
    assert results["data/test/kept"] == 8
    samples = json.loads((Path(cfg.paths.output_dir) / "samples.json").read_text())
    assert len(samples) == 8 and {s["temperature"] for s in samples} == {1.0, 0.5}


@pytest.mark.parametrize("dataset,path,extra", [
    ("hh", "hh_rlhf_harmless_base_test.jsonl.gz", []),
    ("pku_saferlhf", "pku_saferlhf_safer_pairs_5k.json", []),
])
def test_real_adapters_train_through_the_pipeline(tmp_path, dataset, path, extra):
    cfg = compose_config([
        f"dataset={dataset}", f"dataset.path={SHARED_DATA / path}", "dataset.limit=32", "dataset.test_limit=8",
        "dataset.max_length=64", "dataset.max_prompt_length=32", "train.batch_size=4", "train.eval_batch_size=8", "sft.batch_size=4", f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}",
        "sft.max_steps=2", "train.max_steps=2", "eval=none", *extra,
    ], tmp_path)
    results = run(cfg)
    assert results["train/steps"] == 2
    assert results["data/train/kept"] + results["data/test/kept"] > 0
