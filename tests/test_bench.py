"""The benchmarks run (functional smoke only: nothing here asserts a time or a ratio's value;
timings on a shared CPU are noise)."""
from __future__ import annotations

import math

import pytest
import torch

from bench import dpo_step, scoring
from bench.common import MODELS, llama_config, mfu, train_flops_per_token

TINY = ["--quick", "--steps", "1", "--warmup", "1", "--no-scoring"]


def test_dpo_step_runs_under_every_precision_it_may_pick(capsys):
    # bf16-mixed: native where the CPU has avx512_bf16 / AMX, emulated (slow, still correct) elsewhere
    report = dpo_step.main([*TINY, "--precision", "all", "--contenders", "ours,ours_cached,trl,bare", "--no-memory"])
    for precision in dpo_step.PRECISIONS:
        numbers = report[precision]
        for name in ("ours", "ours_cached", "bare") + (("trl",) if dpo_step.have_trl() else ()):
            assert numbers[f"step_s/{name}"] > 0 and math.isfinite(numbers[f"tokens_per_s/{name}"]), (precision, name)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ours/trl=")]
    assert [line.split()[-1] for line in lines] == [f"precision={p}" for p in dpo_step.PRECISIONS]


def test_last_line_carries_the_peak_memory_from_a_probe_subprocess(capsys):
    dpo_step.main([*TINY, "--precision", "32-true", "--contenders", "ours"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fields = dict(item.split("=") for item in last.split())
    assert set(fields) == {"ours/trl", "ours/bare", "cached/trl", "peak_mb_cached", "peak_mb_uncached", "precision"}
    assert fields["peak_mb_uncached"] != "n/a" and fields["ours/trl"] == "n/a"  # only ours ran


def test_ours_clips_itself_where_lightning_refuses_a_fused_optimiser():
    assert dpo_step.lightning_clips_fused("32-true") and not dpo_step.lightning_clips_fused("bf16-mixed")
    weight = torch.nn.Parameter(torch.ones(4))
    weight.grad = torch.full((4,), 10.0)
    optimizer = torch.optim.AdamW([weight], fused=True)
    dpo_step.ClipGradNorm(1.0).on_before_optimizer_step(None, None, optimizer)
    assert weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_scoring_bench_runs():
    result = scoring.main(["--quick", "--reps", "1", "--precision", "32-true", "--examples", "8", "--batch-size", "4"])
    assert result["scoring/bare_throughput"] > 0 and result["scoring_tokens_per_s"] > 0


def test_llama_1b_preset_has_llama_3_2_1b_shape():
    args = dpo_step.parse_args(["--model", "llama-1b", "--device", "cpu", "--precision", "32-true"])
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(args))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(1.236e9, rel=1e-3)  # tied: counted once
    assert MODELS["llama-1b"]["tie"] and (args.pairs, args.length) == (8, 512)


def test_mfu_is_model_flops_over_peak():
    assert train_flops_per_token(10, reference=True) == 80 and train_flops_per_token(10, reference=False) == 60
    assert mfu(1000.0, 8e9, 989.0) == pytest.approx(1000 * 8e9 / 989e12)
    assert mfu(1000.0, 8e9, None) is None
