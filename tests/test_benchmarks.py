"""lm-evaluation-harness on an exported tiny model, offline, with local task yamls over local jsonl data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")
from omegaconf import OmegaConf  # noqa: E402

from tisdpo.eval.benchmarks import (benchmark_metric_keys, flatten_task_results, run_benchmarks,  # noqa: E402
                                    summarise)

ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2_tokenizer"

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
      - function: take_first
  - name: loose
    filter:
      - function: take_first
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory) -> Path:
    if not GPT2_TOKENIZER.is_dir():
        pytest.skip("../shared/data/gpt2_tokenizer is absent")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("bench") / "policy"
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def task_dir(tmp_path) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"what is {i} plus {i}?", "choices": [str(2 * i), str(i), "0"],
                                      "answer": 0}) + "\n" for i in range(5)))
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(4)))
    (tasks / "tiny_mc.yaml").write_text(MC_TASK.format(data=mc))
    (tasks / "tiny_gen.yaml").write_text(GEN_TASK.format(data=gen))
    return tasks


def bench_cfg(task_dir: Path, **overrides):
    """conf/eval/benchmarks.yaml with the local tasks in place of the paper's (entries replaced, not merged)."""
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "eval" / "benchmarks.yaml"))
    base.update({"tasks": ["tiny_mc", "tiny_gen"], "metrics": {"tiny_mc": "acc", "tiny_gen": "exact_match"},
                     "primary_filter": {"tiny_gen": "strict"}, "groups": {"knowledge": ["tiny_mc"],
                                                                          "all": ["tiny_mc", "tiny_gen"]},
                     "num_fewshot": {"tiny_gen": 1}, "include_path": str(task_dir), "include_defaults": False,
                     "batch_size": 4, "device": "cpu", "dtype": "float32", "max_length": 128, "bootstrap_iters": 10})
    base.update(overrides)
    return OmegaConf.create(base)


@pytest.fixture()
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def test_run_benchmarks_offline_on_an_exported_tiny_model(offline, exported_model, task_dir, tmp_path):
    cfg = bench_cfg(task_dir)
    metrics = run_benchmarks(exported_model, cfg, tmp_path / "out")
    assert benchmark_metric_keys(cfg) <= set(metrics), benchmark_metric_keys(cfg) - set(metrics)
    assert 0.0 <= metrics["bench/tiny_mc/acc"] <= 1.0 and metrics["bench/tiny_mc/acc_stderr"] >= 0
    # two filters: the plain name is the primary one, both kept under their own names
    assert metrics["bench/tiny_gen/exact_match"] == metrics["bench/tiny_gen/exact_match_strict"]
    assert "bench/tiny_gen/exact_match_loose" in metrics
    assert metrics["bench/avg"] == pytest.approx((metrics["bench/tiny_mc/acc"] + metrics["bench/tiny_gen/exact_match"]) / 2)
    assert metrics["bench/group/knowledge"] == metrics["bench/tiny_mc/score"] == metrics["bench/tiny_mc/acc"]
    saved = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    assert saved["metrics"]["bench/avg"] == pytest.approx(metrics["bench/avg"])
    assert {tuple(r["tasks"]) for r in saved["runs"]} == {("tiny_mc",), ("tiny_gen",)}  # one run per shot count
    # deterministic: the same model and tasks give the same numbers
    again = run_benchmarks(exported_model, bench_cfg(task_dir, num_fewshot=None), tmp_path / "again")
    assert again["bench/tiny_mc/acc"] == metrics["bench/tiny_mc/acc"]


def test_benchmark_errors_name_the_option(exported_model, task_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="exported Hugging Face model"):
        run_benchmarks(tmp_path / "nope", bench_cfg(task_dir), tmp_path)
    with pytest.raises(ValueError, match="eval.backend"):
        run_benchmarks(exported_model, bench_cfg(task_dir, backend="tgi"), tmp_path)
    # a task eval.metrics does not name takes the first metric its yaml names (issue 23), not an error
    from tisdpo.eval.benchmarks import headline_metrics
    assert headline_metrics(_without_metric(bench_cfg(task_dir), "tiny_gen"))["tiny_gen"] == "exact_match"
    with pytest.raises(ValueError, match="eval.groups.bad"):
        benchmark_metric_keys(bench_cfg(task_dir, groups={"bad": []}))
    # a group whose tasks are not all evaluated is left out, not an error (eval.tasks=[gsm8k] still runs)
    assert "bench/group/math" not in benchmark_metric_keys(bench_cfg(task_dir, groups={"math": ["gsm8k"]}))
    with pytest.raises(ValueError, match="lm-eval knows no task"):
        run_benchmarks(exported_model, bench_cfg(task_dir, tasks=["tiny_mc", "no_such_task"],
                                                 metrics={"tiny_mc": "acc", "no_such_task": "acc"}, groups={}), tmp_path)


def _without_metric(cfg, task):
    raw = OmegaConf.to_container(cfg)
    raw["metrics"].pop(task)
    return OmegaConf.create(raw)


def test_flattening_of_lm_eval_keys():
    flat = flatten_task_results("gsm8k", {
        "alias": "gsm8k", "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.6, "exact_match_stderr,flexible-extract": "N/A"}, "strict-match")
    assert flat == {"bench/gsm8k/exact_match": 0.5, "bench/gsm8k/exact_match_stderr": 0.1,
                    "bench/gsm8k/exact_match_strict-match": 0.5, "bench/gsm8k/exact_match_strict-match_stderr": 0.1,
                    "bench/gsm8k/exact_match_flexible-extract": 0.6}
    flat = flatten_task_results("humaneval", {"pass@1,create_test": 0.25, "pass@1_stderr,create_test": 0.05})
    assert flat["bench/humaneval/pass@1"] == 0.25 and flat["bench/humaneval/pass@1_stderr"] == 0.05
    assert flatten_task_results("mmlu", {"acc,none": 0.3, "acc_stderr,none": 0.01, "alias": "mmlu"}) == {
        "bench/mmlu/acc": 0.3, "bench/mmlu/acc_stderr": 0.01}


def test_paper_config_declares_the_papers_benchmarks():
    cfg = OmegaConf.load(ROOT / "conf" / "eval" / "benchmarks.yaml")
    keys = benchmark_metric_keys(cfg)
    for key in ("bench/mmlu/acc", "bench/gsm8k/exact_match", "bench/humaneval/pass@1", "bench/truthfulqa_mc2/acc",
                "bench/ifeval/prompt_level_strict_acc", "bench/gpqa_main_zeroshot/acc_norm", "bench/avg",
                "bench/group/math"):
        assert key in keys, key
    with pytest.raises(ValueError, match="eval.metrics.gsm8k='exact_match'.*flexible-extract"):
        summarise({"bench/gsm8k/exact_match_flexible-extract": 0.1},
                  OmegaConf.create({"tasks": ["gsm8k"], "metrics": {"gsm8k": "exact_match"}}))


def test_headline_defaults_to_the_tasks_first_metric(task_dir):
    """Issue 23: a local task without eval.metrics.<task> takes the first metric its yaml names."""
    from tisdpo.eval.benchmarks import headline_metrics
    cfg = bench_cfg(task_dir, metrics={}, groups={}, primary_filter={})
    assert headline_metrics(cfg) == {"tiny_mc": "acc", "tiny_gen": "exact_match"}
    assert benchmark_metric_keys(cfg) == {"bench/avg", "bench/tiny_mc/acc", "bench/tiny_mc/acc_stderr",
                                          "bench/tiny_mc/score", "bench/tiny_gen/exact_match",
                                          "bench/tiny_gen/exact_match_stderr", "bench/tiny_gen/score"}
