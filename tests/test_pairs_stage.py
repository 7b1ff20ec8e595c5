"""dataset.pairs=generated: RLCD pairs written by the SFT model (tisdpo/stages/pairs.py).

Chosen is the answer under the positive system prompt, rejected the one under the negative prompt,
both stored with the plain prompt; the pairs are a cached artifact; on the built-in task they carry
the true token rewards; on real data no human response reaches preference training.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tisdpo.stages.pairs as pairs_stage
import tisdpo.stages.runner as runner
from tests.conftest import CONF, SHARED_DATA, compose_config
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages.context import RunContext
from tisdpo.stages.data import prepare_data
from tisdpo.stages.pairs import GENERATION_DEFAULTS, generated_pairs_stage, wants_generated_pairs
from tisdpo.stages.runner import run
from tisdpo.stages.sft import sft_stage
from tisdpo.runtime.validate import ConfigError, validate_config

REAL_DATA = pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")
GENERATION = ["++dataset.generation.max_new_tokens=12", "++dataset.generation.n_train=24", "++dataset.generation.n_test=8"]


def _builtin(tmp_path: Path, pairs: str):
    return compose_config([f"dataset.pairs={pairs}", *GENERATION], tmp_path)


def _builtin_data(tmp_path: Path):
    """The built-in task's data (its prompts are the same under every dataset.pairs) and the generating config."""
    data = prepare_data(_builtin(tmp_path, "human"))
    return data, _builtin(tmp_path, "generated")


class Spy:
    """Wraps ``sample_responses``: records the texts given to the generator and what came back."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, model, tokenizer, prompts, **kwargs):
        ids, finished = self.inner(model, tokenizer, prompts, **kwargs)
        self.calls.append((list(prompts), [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]))
        return ids, finished

    def answers(self) -> dict[str, str]:
        return {text: answer for prompts, answers in self.calls for text, answer in zip(prompts, answers)}


def _stub_generator(task):
    """A deterministic generator: good words of the topic under <harmless>, harmful ones under <harmful>;
    prompt index 0 gets an empty answer, index 1 the same answer under both prompts."""
    plain = task.prompts(2, split="train")

    def generate(model, tokenizer, prompts, **kwargs):
        ids = []
        for text in prompts:
            topic, bare = task.topic_of(text), task.with_system(text, None)
            kind = "good" if text.startswith("<harmless>") else "harmful"
            words = [w for w in task.response_words if task.word_category(topic, w) == kind][:3]
            if bare == plain[0]:
                words = []
            elif bare == plain[1]:
                words = ["w1", "w2"]
            ids.append(tokenizer.convert_tokens_to_ids(words))
        return ids, [True] * len(ids)

    return generate


def test_builtin_chosen_is_the_positive_prompts_answer_stored_with_the_plain_prompt(tmp_path, monkeypatch):
    data, cfg = _builtin_data(tmp_path)
    monkeypatch.setattr(pairs_stage, "sample_responses", Spy(_stub_generator(data.task)))
    out, results = generated_pairs_stage(RunContext(cfg=cfg, output_dir=tmp_path, cache=ArtifactCache(tmp_path / "cache"), data=data))
    spy = pairs_stage.sample_responses
    positive, negative = set(spy.calls[0][0]), set(spy.calls[1][0])  # the training prompts, each side
    assert all(p.startswith("<harmless> ") for p in positive) and all(p.startswith("<harmful> ") for p in negative)
    assert {data.task.with_system(p, None) for p in positive} == {r["prompt"] for r in data.train_rows[:24]}
    assert (results["data/generated/train/prompts"], results["data/generated/train/dropped/empty"],
            results["data/generated/train/dropped/identical"], results["data/generated/train/kept"]) == (24, 1, 1, 22)
    assert results["data/generated/train/label_agreement"] == 1.0 and results["data/generated/test/kept"] == 8
    assert len(out.train_rows) == 22 and len(out.test_rows) == 8 and out.sft_rows is data.sft_rows
    for row in out.train_rows:
        topic = data.task.topic_of(row["prompt"])
        assert data.task.system_of(row["prompt"]) is None  # the system prompt was the generator's only
        assert all(data.task.is_good(topic, w) for w in row["chosen"].split())
        assert all(data.task.is_harmful(topic, w) for w in row["rejected"].split())
        assert row["meta"]["chosen_token_rewards"] == data.task.token_rewards(topic, row["chosen"].split())
        assert row["meta"]["rejected_token_rewards"] == data.task.token_rewards(topic, row["rejected"].split())


def test_builtin_pairs_from_a_tiny_sft_model_are_cached_and_carry_true_rewards(tmp_path, monkeypatch):
    data, cfg = _builtin_data(tmp_path)
    cache = ArtifactCache(tmp_path / "cache")
    ctx = RunContext(cfg=cfg, output_dir=tmp_path, cache=cache, data=data)
    ctx.sft_dir = sft_stage(ctx)
    spy = Spy(pairs_stage.sample_responses)
    monkeypatch.setattr(pairs_stage, "sample_responses", spy)
    first, results = generated_pairs_stage(ctx)
    answers = spy.answers()
    assert first.train_rows and results["data/generated/train/kept"] == len(first.train_rows)
    for row in first.train_rows:
        harmless, harmful = data.task.contrastive_prompts(row["prompt"])
        assert (row["chosen"], row["rejected"]) == (answers[harmless], answers[harmful])
        topic = data.task.topic_of(row["prompt"])
        assert row["meta"]["chosen_token_rewards"] == data.task.token_rewards(topic, row["chosen"].split())
    assert 0.0 <= results["data/generated/train/label_agreement"] <= 1.0

    second, _ = generated_pairs_stage(ctx)
    assert len(spy.calls) == 4  # train and test, two system prompts each: nothing sampled the second time
    assert [e["reused"] for e in cache.events if e["stage"] == "pairs"] == [False, True]
    assert second.train_rows == first.train_rows and second.test_rows == first.test_rows
    hotter = compose_config(["dataset.pairs=generated", *GENERATION, "++dataset.generation.temperature=0.5"], tmp_path)
    generated_pairs_stage(RunContext(cfg=hotter, output_dir=tmp_path, cache=cache, data=data, sft_dir=ctx.sft_dir))
    assert cache.events[-1]["stage"] == "pairs" and cache.events[-1]["reused"] is False  # an option is in the key


def test_human_and_builtin_contrastive_pairs_pass_through(tmp_path):
    for pairs in ("human", "contrastive"):
        cfg = _builtin(tmp_path, pairs)
        data = prepare_data(cfg)
        assert not wants_generated_pairs(cfg)
        ctx = RunContext(cfg=cfg, output_dir=tmp_path, cache=ArtifactCache(tmp_path / "cache"), data=data)
        assert generated_pairs_stage(ctx) == (data, {})


def test_builtin_pipeline_with_generated_pairs(tmp_path):
    cfg = _builtin(tmp_path, "generated")
    results = run(cfg)
    assert results["data/generated/train/kept"] > 0 and "eval/true_reward" in results
    assert [e["reused"] for e in results["stages"] if e["stage"] == "pairs"] == [False]


@REAL_DATA
def test_real_data_trains_on_generated_pairs_only_and_reuses_them(tmp_path, monkeypatch):
    def config(run_dir: str):
        return compose_config([
            "dataset=pku_saferlhf", f"dataset.path={SHARED_DATA / 'pku_saferlhf_safer_pairs_5k.json'}",
            "dataset.limit=24", "dataset.test_limit=8", "dataset.max_length=64", "dataset.max_prompt_length=48",
            "dataset.pairs=generated", "dataset.generation.max_new_tokens=8", "dataset.generation.batch_size=8",
            f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}", "train.batch_size=4", "train.eval_batch_size=8",
            "sft.batch_size=4", "sft.max_steps=2", "train.max_steps=2", "eval=none", f"paths.output_dir={tmp_path / run_dir}",
        ], tmp_path)

    cfg = config("first")
    human = prepare_data(cfg)
    human_texts = {r[side] for r in human.train_rows + human.test_rows for side in ("chosen", "rejected")}
    tokenized: list[list[dict]] = []
    real_tokenize = runner.tokenize_pairs
    monkeypatch.setattr(runner, "tokenize_pairs", lambda rows, *a: tokenized.append(rows) or real_tokenize(rows, *a))
    spy = Spy(pairs_stage.sample_responses)
    monkeypatch.setattr(pairs_stage, "sample_responses", spy)

    results = run(cfg)
    train_rows, test_rows = tokenized[0], tokenized[1]
    assert train_rows and results["data/generated/train/kept"] == len(train_rows) and results["train/steps"] == 2
    assert not {r[side] for r in train_rows + test_rows for side in ("chosen", "rejected")} & human_texts
    assert {r["prompt"] for r in train_rows} <= {r["prompt"] for r in human.train_rows}
    positive, negative = spy.calls[0][0], spy.calls[1][0]
    assert all(t.startswith(GENERATION_DEFAULTS["positive_system"] + "\n\n") for t in positive)
    assert all(t.startswith(GENERATION_DEFAULTS["negative_system"] + "\n\n") for t in negative)
    # a prompt the data holds more than once (PKU-SafeRLHF rows share prompts) is sampled once per row
    answers: dict[str, list[str]] = {}
    for prompts, outs in spy.calls:
        for text, answer in zip(prompts, outs):
            answers.setdefault(text, []).append(answer)
    for row in train_rows:  # chosen: the harmless prompt's answer; the pair keeps the plain prompt
        assert row["chosen"] in answers[f"{GENERATION_DEFAULTS['positive_system']}\n\n{row['prompt']}"]
        assert row["rejected"] in answers[f"{GENERATION_DEFAULTS['negative_system']}\n\n{row['prompt']}"]
    assert [e["reused"] for e in results["stages"] if e["stage"] == "pairs"] == [False]

    again = run(config("second"))
    assert [e["reused"] for e in again["stages"] if e["stage"] in ("sft", "pairs")] == [True, True]
    assert again["data/generated/train/kept"] == results["data/generated/train/kept"]


def test_the_paper_scale_llm_generated_table_generates_its_pairs():
    paper = compose_config(["experiment=tisdpo_llm_generated", "scale=paper"], tiny=False)
    assert (paper.dataset.name, paper.dataset.pairs) == ("pku_saferlhf", "generated") and wants_generated_pairs(paper)
    assert paper.dataset.prompt_template == "\n\nHuman: {prompt}\n\nAssistant:"
    validate_config(paper)
    tiny = compose_config(["experiment=tisdpo_llm_generated"], tiny=False)
    assert (tiny.dataset.name, tiny.dataset.pairs) == ("synthetic", "contrastive") and not wants_generated_pairs(tiny)


@pytest.mark.parametrize("name", ["pku_saferlhf", "hh", "ultrafeedback", "tldr"])
def test_real_datasets_declare_the_generation_options_and_contrastive_generates(name):
    assert OmegaConf.to_container(OmegaConf.load(CONF / "dataset" / f"{name}.yaml").generation) == GENERATION_DEFAULTS
    cfg = compose_config([f"dataset={name}", "dataset.pairs=contrastive", "model.tokenizer=gpt2"])
    assert wants_generated_pairs(cfg)  # a real dataset has no other contrastive pairs: never the human ones


@pytest.mark.parametrize("overrides,message", [
    (["dataset.pairs=rlcd"], "dataset.pairs='rlcd' is not one of human, contrastive, generated"),
    (["dataset.pairs=generated", "dataset.generation.temperature=-1"], "dataset.generation.temperature=-1 must be >= 0"),
    (["dataset.pairs=contrastive", "dataset.generation.max_new_tokens=0"], "dataset.generation.max_new_tokens=0 must be"),
    (["dataset.pairs=generated", "dataset.generation.template='{prompt}'"], "dataset.generation.template='{prompt}' must"),
    (["dataset.pairs=generated", "dataset.generation.negative_system=${dataset.generation.positive_system}"],
     "dataset.generation.positive_system and negative_system are the same"),
])
def test_a_real_data_run_that_cannot_generate_fails_with_one_config_line(overrides, message):
    cfg = compose_config(["dataset=pku_saferlhf", "model.tokenizer=gpt2", *overrides])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
