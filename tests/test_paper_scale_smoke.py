"""A table's `scale=paper` config runs end to end (SFT, estimator, training, sampling, judges) with
tiny stand-ins for the hub models and the local data samples: not only composes."""
from __future__ import annotations

import pytest

from experiments.smoke_paper_scale import main as smoke
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")]


def test_tisdpo_main_table_at_paper_scale_runs_on_tiny_stand_ins(tmp_path):
    # trainer=cpu: the paper's trainer is the GPU one; float32: bf16 weights are emulated on CPUs without avx512_bf16
    summary = smoke(["tisdpo_pku_main", "--method", "tisdpo_d", "--data", str(SHARED_DATA), "--out", str(tmp_path),
                     "trainer=cpu", "model.dtype=float32"])
    results = summary["results"]
    assert summary["trainer"] == "cpu 32-true"
    assert results["train/steps"] == 4 and results["data/train/kept"] > 0
    assert results["weights/std_chosen"] > 0  # the DPO-pair estimator was trained and scored the data
    for judge in ("eval/harm", "eval/help", "eval/safe_n"):
        assert judge in results, judge
    assert (tmp_path / "run" / "samples.json").is_file()


def test_a_dataset_without_a_local_sample_is_named(tmp_path):
    with pytest.raises(SystemExit, match="dataset 'tldr'"):
        smoke(["tisdpo_tldr", "--method", "dpo", "--data", str(SHARED_DATA), "--out", str(tmp_path)])
