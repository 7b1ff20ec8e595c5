"""eval.generation.backend=vllm / dataset.generation.backend=vllm (tisdpo/eval/vllm_backend.py).

vLLM is CUDA-only, so a fake ``vllm`` module stands in: its ``LLM`` records how it was started and
every request (token-id prompts, ``SamplingParams``), and answers with token ids computed from each
prompt, so that order, EOS cuts and routing can be checked exactly. What is checked: each sampling
parameter's mapping, prompt order, the EOS contract of ``sample_responses`` (the same as the HF
path on the same raw tokens), that the judges, MT-Bench and the RLCD pairs stage sample through vLLM
when asked (and the GPU is given back before the judges load), that ``hf`` stays the default and
never imports vllm, and the one-line error when the package is missing.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tisdpo.stages.evaluation as eval_stage_module
import tisdpo.stages.pairs as pairs_stage
from tests.conftest import compose_config
from tisdpo.errors import UserError
from tisdpo.eval.generation import cut_at_eos, sample_responses
from tisdpo.eval.run_judges import evaluate_with_judges
from tisdpo.eval.vllm_backend import VLLMEngine, open_sampler, prompt_seeds, sampling_params
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages import context as run_context
from tisdpo.stages.context import RunContext
from tisdpo.stages.data import prepare_data
from tisdpo.stages.pairs import generated_pairs_stage
from tisdpo.runtime.validate import ConfigError, validate_config

EOS = 2  # the built-in task tokenizer's EOS
EVENTS: list[str] = []  # what happened, in order, across the fake engine and the test judges


# ------------------------------------------------------------------------------------------ the fake vllm
class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        for key, value in kwargs.items():
            setattr(self, key, value)


def raw_answer(prompt_ids: list[int]) -> list[int]:
    """The fake model's raw new tokens for a prompt: two tokens from the prompt, then (odd id sum)
    EOS and a token after it, or (even) tokens up to any max_new_tokens used here and no EOS."""
    head = [10 + sum(prompt_ids) % 7, 20 + len(prompt_ids)]
    return head + ([EOS, 99] if sum(prompt_ids) % 2 else list(range(30, 40)))


class FakeLLM:
    instances: list["FakeLLM"] = []
    drop_stop_token = False  # some vLLM versions leave the stop token out of token_ids

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.requests = model, kwargs, []
        FakeLLM.instances.append(self)
        EVENTS.append("start")

    def generate(self, prompts, sampling_params, use_tqdm=True):
        EVENTS.append("generate")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.requests.append((prompts, params))
        return [self._answer(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    def _answer(self, prompt_ids, params):
        tokens = raw_answer(prompt_ids)[: params.max_tokens]
        stop = next((i for i, t in enumerate(tokens) if t in params.stop_token_ids), None)
        if stop is not None:  # vLLM stops at a stop token (kept in token_ids) and generates nothing after it
            tokens = tokens[: stop + (0 if self.drop_stop_token else 1)]
        completion = types.SimpleNamespace(token_ids=tokens, text="", finish_reason="stop" if stop is not None else "length")
        return types.SimpleNamespace(outputs=[completion], prompt_token_ids=prompt_ids)


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, FakeSamplingParams
    vllm.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # a TypedDict in vLLM
    distributed = types.ModuleType("vllm.distributed")
    distributed.destroy_model_parallel = lambda: EVENTS.append("destroy")
    distributed.destroy_distributed_environment = lambda: None
    vllm.distributed = distributed
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.distributed", distributed)
    FakeLLM.instances.clear()
    EVENTS.clear()
    yield vllm
    FakeLLM.drop_stop_token = False


@pytest.fixture
def no_vllm(monkeypatch):
    """``import vllm`` fails, as on a machine without the extra."""
    monkeypatch.setitem(sys.modules, "vllm", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The built-in task's data and tokenizer (prompts of several lengths)."""
    return prepare_data(compose_config([], tmp_path_factory.mktemp("data")))


class StubHF(torch.nn.Module):
    """A Hugging Face-style model whose ``generate`` writes :func:`raw_answer` after each (left-padded) prompt."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generation_config = types.SimpleNamespace(eos_token_id=EOS)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            rows.append((raw_answer([t for t, m in zip(ids, mask) if m]) + [0] * max_new_tokens)[:max_new_tokens])
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def expected(tokenizer, prompts, max_new_tokens=8):
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return [cut_at_eos(raw_answer(i)[:max_new_tokens], {EOS}) for i in ids]


# ------------------------------------------------------------------------------------------ the mapping
def test_every_sampling_parameter_maps_to_vllm(fake_vllm):
    sampled = sampling_params(fake_vllm, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=7, seed=3, eos_ids={9, 2})
    assert sampled.kwargs == {"n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "max_tokens": 7, "seed": 3,
                              "stop_token_ids": [2, 9], "ignore_eos": True, "skip_special_tokens": True}
    # unset top_p / top_k (or top_k=0, HF's "off") are left out: vLLM's defaults disable them
    plain = sampling_params(fake_vllm, temperature=1.0, top_k=0, top_p=None, max_new_tokens=4, seed=1, eos_ids={2})
    assert "top_k" not in plain.kwargs and "top_p" not in plain.kwargs and plain.temperature == 1.0
    # T=0 is greedy: vLLM's temperature=0.0, no seed, no filters
    greedy = sampling_params(fake_vllm, temperature=0.0, top_k=5, top_p=0.9, max_new_tokens=4, seed=1, eos_ids={2})
    assert greedy.kwargs == {"n": 1, "temperature": 0.0, "max_tokens": 4, "stop_token_ids": [2], "ignore_eos": True,
                             "skip_special_tokens": True}


def test_engine_samples_in_prompt_order_with_per_prompt_seeds(fake_vllm, data, tmp_path):
    prompts = [r["prompt"] for r in data.test_rows[:6]]
    engine = VLLMEngine(tmp_path, dtype="bfloat16", seed=4, gpu_memory_utilization=0.3, tensor_parallel_size=2,
                        eos_token_ids=[EOS])
    ids, finished = sample_responses(engine, data.tokenizer, prompts, temperature=0.8, top_p=0.95,
                                     max_new_tokens=8, seed=7, return_finished=True)
    sample_responses(engine, data.tokenizer, prompts, temperature=0.0, max_new_tokens=8, seed=7)
    [llm] = FakeLLM.instances  # one engine for every call
    assert llm.model == str(tmp_path)
    assert llm.kwargs == {"dtype": "bfloat16", "seed": 4, "gpu_memory_utilization": 0.3, "tensor_parallel_size": 2}
    (requests, params), (_, greedy) = llm.requests
    assert [r["prompt_token_ids"] for r in requests] == data.tokenizer(prompts, add_special_tokens=True)["input_ids"]
    assert [p.seed for p in params] == prompt_seeds(7, len(prompts)) and len(set(prompt_seeds(7, 6))) == 6
    assert prompt_seeds(7, 6) == prompt_seeds(7, 6) != prompt_seeds(8, 6)
    assert {(p.temperature, p.top_p, p.max_tokens) for p in params} == {(0.8, 0.95, 8)}
    assert {g.temperature for g in greedy} == {0.0}
    assert list(zip(ids, finished)) == expected(data.tokenizer, prompts)
    assert set(finished) == {True, False}  # both kinds of prompt are there


@pytest.mark.parametrize("drop_stop_token", [False, True])
def test_eos_contract_is_the_hf_paths(fake_vllm, data, tmp_path, drop_stop_token):
    """On the same raw tokens both backends return the same responses and finished flags."""
    FakeLLM.drop_stop_token = drop_stop_token
    prompts = [r["prompt"] for r in data.test_rows[:6]]
    hf = sample_responses(StubHF(), data.tokenizer, prompts, max_new_tokens=8, batch_size=4, return_finished=True)
    engine = VLLMEngine(tmp_path, eos_token_ids=[EOS])
    vllm = sample_responses(engine, data.tokenizer, prompts, max_new_tokens=8, batch_size=4, return_finished=True)
    assert vllm == hf and hf == tuple(map(list, zip(*expected(data.tokenizer, prompts))))
    assert sample_responses(engine, data.tokenizer, prompts, max_new_tokens=8) == hf[0]  # without return_finished


def test_stop_ids_come_from_the_model_directory_and_the_tokenizer(fake_vllm, data, tmp_path):
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=[7, 8]).save_pretrained(tmp_path)
    engine = VLLMEngine(tmp_path)
    sample_responses(engine, data.tokenizer, ["<t1> q1"], max_new_tokens=3)
    assert FakeLLM.instances[0].requests[0][1][0].stop_token_ids == [EOS, 7, 8]


def test_missing_vllm_is_one_line_naming_the_option_and_the_extra(no_vllm, data, tmp_path):
    engine = VLLMEngine(tmp_path, option="dataset.generation.backend")
    with pytest.raises(UserError) as error:
        sample_responses(engine, data.tokenizer, ["<t1> q1"])
    message = str(error.value)
    assert message.startswith("dataset.generation.backend=vllm needs the vllm package") and "\n" not in message
    assert "pip install -e '.[vllm]'" in message


def test_open_sampler_hf_is_the_model_and_vllm_closes_its_engine(fake_vllm, data, tmp_path):
    model = StubHF()
    with open_sampler("hf", model, model_dir=None, tokenizer=data.tokenizer) as sampler:
        assert sampler is model
    with open_sampler("vllm", model, model_dir=tmp_path, tokenizer=data.tokenizer, eos_token_ids=[EOS],
                      gpu_memory_utilization=None, dtype="float16") as engine:
        sample_responses(engine, data.tokenizer, ["<t1> q1"])
    assert engine._llm is None and EVENTS == ["start", "generate", "destroy"]
    assert FakeLLM.instances[0].kwargs["gpu_memory_utilization"] == 0.5  # null: the default
    with pytest.raises(UserError, match="eval.generation.backend='tpu' is not one of hf, vllm"):
        with open_sampler("tpu", model, model_dir=tmp_path, tokenizer=data.tokenizer):
            pass
    with pytest.raises(UserError, match="reads a model directory"):
        with open_sampler("vllm", model, model_dir=tmp_path / "absent", tokenizer=data.tokenizer):
            pass


# ------------------------------------------------------------------------------------------ routing
class EchoJudge:
    """Records what it judged, and when."""
    seen: list[list[str]] = []

    def __call__(self, prompts, responses):
        EVENTS.append("judge")
        EchoJudge.seen.append(list(responses))
        return {"eval/echo": float(len(responses))}


class FakeMTBench:
    """Asks two one-turn conversations at T=0.7 with 5 new tokens."""

    def __call__(self, generate):
        EVENTS.append("mt_bench")
        answers = generate([[{"role": "user", "content": "<t1> q1"}], [{"role": "user", "content": "<t2> q2"}]],
                           temperature=0.7, max_new_tokens=5)
        return {"eval/mt_bench": float(len(answers))}


def _judges_cfg(**generation):
    return OmegaConf.create({
        "name": "judges", "enabled": True, "n_prompts": 5, "temperatures": [0.0, 1.0], "max_new_tokens": 8,
        "top_p": 0.9, "batch_size": 2, "baseline_from": "samples", "baseline_samples": None,
        "judges": {"echo": {"_target_": f"{__name__}.EchoJudge"}}, "pairwise": None,
        "mt_bench": {"_target_": f"{__name__}.FakeMTBench"}, **({"generation": generation} if generation else {})})


def test_judges_and_mt_bench_sample_through_vllm_then_the_gpu_is_freed_for_the_judges(fake_vllm, data, tmp_path):
    prompts = [r["prompt"] for r in data.test_rows[:5]]
    EchoJudge.seen.clear()
    cfg = _judges_cfg(backend="vllm", gpu_memory_utilization=0.4, tensor_parallel_size=1, dtype="auto")
    metrics = evaluate_with_judges(cfg, StubHF(), data.tokenizer, prompts, 3, tmp_path, policy_dir=tmp_path)
    [llm] = FakeLLM.instances  # one engine: both temperatures and MT-Bench
    assert llm.model == str(tmp_path) and llm.kwargs["gpu_memory_utilization"] == 0.4 and llm.kwargs["seed"] == 3
    assert EVENTS == ["start", "generate", "generate", "mt_bench", "generate", "destroy", "judge", "judge"]
    (_, greedy), (_, sampled), (mt_requests, mt_params) = llm.requests
    assert {p.temperature for p in greedy} == {0.0} and {(p.temperature, p.top_p) for p in sampled} == {(1.0, 0.9)}
    assert {(p.temperature, p.max_tokens) for p in mt_params} == {(0.7, 5)} and len(mt_requests) == 2
    decoded = [data.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in expected(data.tokenizer, prompts)]
    assert EchoJudge.seen == [decoded, decoded]  # the fake answers the same at any temperature
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert [s["response"] for s in samples if s["temperature"] == 1.0] == decoded
    assert metrics["eval/echo"] == 5.0 and metrics["eval/mt_bench"] == 2.0


def test_hf_stays_the_default_and_never_imports_vllm(no_vllm, data, tmp_path):
    prompts = [r["prompt"] for r in data.test_rows[:5]]
    EchoJudge.seen.clear()
    for cfg in (_judges_cfg(), _judges_cfg(backend="hf", gpu_memory_utilization=0.5, tensor_parallel_size=1, dtype="auto")):
        evaluate_with_judges(cfg, StubHF(), data.tokenizer, prompts, 3, tmp_path, policy_dir=tmp_path / "absent")
    decoded = [data.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in expected(data.tokenizer, prompts)]
    assert EchoJudge.seen == [decoded] * 4


def test_eval_stage_offloads_the_policy_and_needs_the_export(monkeypatch, data, tmp_path):
    cfg = OmegaConf.create({"seed": 0, "eval": _judges_cfg(backend="vllm")})
    calls = []
    monkeypatch.setattr(eval_stage_module, "evaluate_with_judges", lambda *a, **k: calls.append(k) or {})
    monkeypatch.setattr(eval_stage_module, "offload_to_cpu", lambda *models: calls.append(models))
    policy, reference = StubHF(), StubHF()
    with pytest.raises(ConfigError, match="eval.generation.backend=vllm samples from the exported policy"):
        eval_stage_module.eval_stage(cfg, data, policy, reference, tmp_path)
    (tmp_path / "policy").mkdir()
    eval_stage_module.eval_stage(cfg, data, policy, reference, tmp_path)
    assert calls[0] == (policy, reference) and calls[1]["policy_dir"] == tmp_path / "policy"
    cfg.eval.generation.backend = "hf"  # the HF path samples with the policy where it is
    calls.clear()
    eval_stage_module.eval_stage(cfg, data, policy, reference, tmp_path)
    assert len(calls) == 1 and calls[0]["policy_dir"] == tmp_path / "policy"


def test_the_pairs_stage_generates_through_vllm_on_the_sft_artifact(fake_vllm, monkeypatch, tmp_path):
    overrides = ["dataset.pairs=generated", "++dataset.generation.max_new_tokens=8", "++dataset.generation.n_train=6",
                 "++dataset.generation.n_test=4", "++dataset.generation.gpu_memory_utilization=0.7"]
    cfg = compose_config([*overrides, "++dataset.generation.backend=vllm"], tmp_path)
    data = prepare_data(cfg)
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    monkeypatch.setattr(run_context, "initial_model", lambda *a: pytest.fail("vllm must not load the HF model"))
    cache = ArtifactCache(tmp_path / "cache")
    out, _ = generated_pairs_stage(RunContext(cfg=cfg, output_dir=tmp_path, cache=cache, data=data, sft_dir=sft_dir))
    [llm] = FakeLLM.instances  # one engine for both splits and both system prompts
    assert llm.model == str(sft_dir) and llm.kwargs["gpu_memory_utilization"] == 0.7
    assert llm.kwargs["dtype"] == (str(cfg.model.dtype) if cfg.model.get("dtype") else "auto")
    assert len(llm.requests) == 4 and EVENTS[-1] == "destroy"
    params = [p for _, ps in llm.requests for p in ps]
    assert {(p.temperature, p.top_p, p.max_tokens, tuple(p.stop_token_ids)) for p in params} == {(1.0, 1.0, 8, (EOS,))}
    answers = {}
    for requests, _ in llm.requests:
        for r in requests:
            tokens, _ = cut_at_eos(raw_answer(r["prompt_token_ids"])[:8], {EOS})
            answers[data.tokenizer.decode(r["prompt_token_ids"])] = data.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert out.train_rows
    for row in out.train_rows:  # chosen: the answer under <harmless>, rejected: under <harmful>
        assert (row["chosen"], row["rejected"]) == (answers[f"<harmless> {row['prompt']}"], answers[f"<harmful> {row['prompt']}"])
    # hf (the default) is another artifact; vllm again reuses its own
    monkeypatch.setattr(run_context, "initial_model", lambda *a: StubHF())
    monkeypatch.setattr(pairs_stage, "sample_responses", lambda model, tok, prompts, **k: (
        [[10 + i % 5, 11 if text.startswith("<harmless>") else 12] for i, text in enumerate(prompts)], [True] * len(prompts)))
    generated_pairs_stage(RunContext(cfg=compose_config(overrides, tmp_path), output_dir=tmp_path, cache=cache, data=data,
                                     sft_dir=sft_dir))
    generated_pairs_stage(RunContext(cfg=cfg, output_dir=tmp_path, cache=cache, data=data, sft_dir=sft_dir))
    assert [e["reused"] for e in cache.events if e["stage"] == "pairs"] == [False, False, True]


def test_the_vllm_pairs_need_a_model_directory(fake_vllm, tmp_path):
    cfg = compose_config(["dataset.pairs=generated", "++dataset.generation.backend=vllm", "++dataset.generation.n_train=2",
                          "++dataset.generation.n_test=2"], tmp_path)
    with pytest.raises(ConfigError, match="dataset.generation.backend=vllm loads the model from a directory"):
        generated_pairs_stage(RunContext(cfg=cfg, output_dir=tmp_path, cache=ArtifactCache(tmp_path / "cache"),
                                         data=prepare_data(cfg)))


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("preset", ["judges", "judges_pku", "judges_pku_nowin", "judges_tldr", "judges_ultrafeedback"])
def test_judge_presets_declare_hf_generation(preset):
    cfg = compose_config([f"eval={preset}", "dataset=pku_saferlhf", "model.tokenizer=gpt2"])
    assert OmegaConf.to_container(cfg.eval.generation) == {"backend": "hf", "gpu_memory_utilization": 0.5,
                                                           "tensor_parallel_size": 1, "dtype": "auto"}
    validate_config(cfg)
    validate_config(compose_config([f"eval={preset}", "dataset=pku_saferlhf", "model.tokenizer=gpt2",
                                    "eval.generation.backend=vllm", "dataset.generation.backend=vllm"]))


@pytest.mark.parametrize("override,message", [
    ("eval.generation.backend=tpu", "eval.generation.backend='tpu' is not one of hf, vllm"),
    ("dataset.generation.backend=vlm", "dataset.generation.backend='vlm' is not one of hf, vllm"),
    ("eval.generation.gpu_memory_utilization=0", "eval.generation.gpu_memory_utilization=0 must be"),
    ("dataset.generation.gpu_memory_utilization=1.5", "dataset.generation.gpu_memory_utilization=1.5 must be"),
    ("eval.generation.tensor_parallel_size=0", "eval.generation.tensor_parallel_size=0 must be"),
])
def test_a_bad_backend_option_is_one_config_line(override, message):
    cfg = compose_config(["eval=judges_pku", "dataset=pku_saferlhf", "model.tokenizer=gpt2", override])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_vllm_evaluation_needs_the_export():
    cfg = compose_config(["eval=judges_pku", "dataset=pku_saferlhf", "model.tokenizer=gpt2",
                          "eval.generation.backend=vllm", "export.enabled=false"])
    with pytest.raises(ConfigError, match="keep export.enabled=true"):
        validate_config(cfg)
