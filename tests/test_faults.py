"""Faults and bad inputs: each gets a clear error (row and field, step and examples, the valid choices)
or a counted skip that reaches results.json; a non-finite loss or gradient keeps the last good
checkpoint; caches survive corruption, kills and concurrent builders."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, compose_config
from tisdpo.data import DataError, adapt_rows, tokenize_dataset
from tisdpo.runtime.validate import ConfigError, validate_config

ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------
# 2. bad data: every listed case, through the public API
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from tests.test_data_fuzz import word_tokenizer

    return word_tokenizer()


HH = "\n\nHuman: w1 w2\n\nAssistant:"
UF = {"prompt": "w1 w2", "chosen": "w3 w4", "rejected": "w5"}

# (case, dataset, raw rows, expected error fragment) -- structural problems raise, naming row and field
ERRORS = [
    ("missing field", "hh", [{"chosen": HH + " w3"}, {"chosen": HH + " w3"}], "hh row 0, field 'rejected': missing field"),
    ("non-string value", "ultrafeedback", [UF, {**UF, "rejected": 7}], "ultrafeedback row 1, field 'rejected'"),
    ("non-string prompt", "pku_saferlhf", [{"prompt": None, "response_0": "a", "response_1": "b",
                                           "safer_response_id": 0}], "pku_saferlhf row 0, field 'prompt': expected a string"),
]


@pytest.mark.parametrize("case,name,rows,message", ERRORS, ids=[c[0] for c in ERRORS])
def test_structural_problems_raise_naming_row_and_field(case, name, rows, message):
    with pytest.raises(DataError) as error:
        adapt_rows(name, rows)
    assert message in str(error.value)


# (case, raw row, reason) -- content problems are counted skips
SKIPS = [
    ("empty prompt", {**UF, "prompt": "  "}, "empty_prompt"),
    ("empty response", {**UF, "chosen": ""}, "empty_response"),
    ("chosen == rejected", {**UF, "rejected": "w3 w4 "}, "identical_responses"),
]


@pytest.mark.parametrize("case,row,reason", SKIPS, ids=[c[0] for c in SKIPS])
def test_content_problems_are_counted_skips_in_one_summary_line(case, row, reason):
    examples, counter = adapt_rows("ultrafeedback", [UF, row, UF])
    assert len(examples) == 2
    assert counter.as_dict()[f"data/dropped/{reason}"] == 1 and counter.examples[reason] == [1]
    assert counter.summary() == f"dropped 1 of 3 rows: 1 {reason}"
    with pytest.raises(DataError, match=f"ultrafeedback row 1, field '\\w+': {reason}"):
        adapt_rows("ultrafeedback", [UF, row], strict=True)


def example(prompt, chosen, rejected, **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": {"dataset": "toy"}, **extra}


def test_over_long_prompt_is_truncated_and_counted(tok):
    rows = [example("w1 " * 40, "w2 w3", "w4"), example("w1", "w2", "w3")]
    out, counter = tokenize_dataset(rows, tok, max_length=12, max_prompt_length=6)
    assert len(out) == 2 and len(out[0]["prompt_input_ids"]) == 6
    assert counter.as_dict()["data/truncated/prompt"] == 1
    assert counter.summary() == "dropped 0 of 2 rows; kept rows truncated to fit: 1 prompt"


def test_fully_truncated_response_is_a_counted_skip(tok):
    rows = [example("w1 " * 40, "w2", "w3"), example("w1", "w2", "w3")]
    out, counter = tokenize_dataset(rows, tok, max_length=6, max_prompt_length=6)
    assert [o["index"] for o in out] == [1]
    assert counter.as_dict()["data/dropped/response_fully_truncated"] == 1


@pytest.mark.parametrize("weights,message", [
    ([1.0], "got 1 weights, expected one per response token"),                 # wrong length
    ([1.0, float("nan"), 1.0], "weight 1 is nan; weights must be finite and >= 0"),
    ([1.0, float("inf"), 1.0], "weight 1 is inf"),
    ([1.0, -0.5, 1.0], "weight 1 is -0.5"),
], ids=["wrong length", "nan", "inf", "negative"])
def test_bad_weights_raise_naming_row_and_field(tok, weights, message):
    rows = [example("w1", "w2 w3", "w4"), example("w1", "w2 w3", "w4", chosen_weights=weights, rejected_weights=[1.0, 1.0])]
    with pytest.raises(DataError) as error:
        tokenize_dataset(rows, tok, max_length=12, max_prompt_length=6)
    assert "toy row 1, field 'chosen_weights'" in str(error.value) and message in str(error.value)


def test_empty_dataset_after_filtering_says_why(tok):
    with pytest.raises(DataError, match=r"no rows left after filtering: dropped 2 of 2 rows: 2 identical_responses"):
        rows, counter = adapt_rows("ultrafeedback", [{**UF, "rejected": UF["chosen"]}] * 2)
        counter.require_nonempty()


def _hh_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hh_row(i: int, prompt: str = "q1 q2", chosen: str | None = None, rejected: str | None = None) -> dict:
    head = f"\n\nHuman: {prompt}\n\nAssistant:"
    return {"chosen": head + (f" w{i % 20} w{(i + 3) % 20}" if chosen is None else chosen),
            "rejected": head + (f" w{(i + 7) % 20}" if rejected is None else rejected)}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

    path = tmp_path_factory.mktemp("tokenizer")
    SyntheticTask(SyntheticTaskConfig(n_sft=8, n_train_pairs=8, n_test_pairs=4)).tokenizer().save_pretrained(path)
    return path


def test_skips_reach_results_json_and_structural_errors_stop_the_run(tmp_path, tokenizer_dir, caplog):
    from tisdpo.stages.runner import run

    bad = [_hh_row(0, chosen=" w1", rejected=" w1"),             # identical responses: skipped
           _hh_row(1, chosen=""),                                # empty response: skipped
           _hh_row(2, prompt="q1 " * 80)]                        # over-long prompt: truncated, counted
    rows = bad + [_hh_row(i) for i in range(3, 60)]
    common = ["dataset=hh", f"model.tokenizer={tokenizer_dir}", "dataset.max_length=24", "dataset.max_prompt_length=12",
              "eval=none", "sft.max_steps=2", "train.max_steps=1", "train.val_every_n_steps=0"]
    cfg = compose_config(common + [f"dataset.path={_hh_file(tmp_path / 'train.jsonl', rows)}"], tmp_path)
    with caplog.at_level(logging.INFO):
        results = run(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["data/source/train/dropped/identical_responses"] == 1
    assert on_disk["data/source/train/dropped/empty_response"] == 1
    assert on_disk["data/source/train/total"] == 60 and on_disk["data/source/train/kept"] == 58
    assert on_disk["data/train/truncated/prompt"] == 1 and results["data/train/kept"] == on_disk["data/train/kept"]
    assert "data: train dropped 2 of 60 rows: 1 empty_response, 1 identical_responses" in caplog.text

    rows[5] = {**rows[5], "chosen": 5}
    cfg = compose_config(common + [f"dataset.path={_hh_file(tmp_path / 'broken.jsonl', rows)}"], tmp_path)
    with pytest.raises(DataError, match="hh row 5, field 'chosen': expected a string, got int"):
        run(cfg)


# ---------------------------------------------------------------------------------------
# 3. bad config: one clear line before any model loads
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,valid", [
    ("estimator=nope", ["dpo_pair", "sft_pair", "prompt", "gradient"]),
    ("dataset=nope", ["synthetic", "hh", "pku_saferlhf", "tldr", "ultrafeedback"]),
    ("loss=nope", ["dpo", "tisdpo", "tidpo"]),
])
def test_unknown_group_choice_lists_the_valid_ones(tmp_path, override, valid):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as error:
        compose_config([override], tmp_path)
    assert all(v in str(error.value) for v in valid)


@pytest.mark.parametrize("overrides,message", [
    (["estimator.name=nope"], "estimator.name='nope' is not one of critical_tokens, dpo_pair, dpo_reward, gradient, none, oracle, otpo, prompt, random, sft_pair, uniform"),
    (["dataset.name=nope"], "dataset.name='nope' is not one of synthetic, hh, pku_saferlhf, tldr, ultrafeedback"),
    (["loss.name=nope"], "loss='nope' is not one of"),
    (["loss=tisdpo", "estimator=gradient"], "estimator=gradient gives online weights, and loss=tisdpo takes offline weights"),
    (["sft.max_length=1"], "sft.max_length=1 leaves no room for a prompt and a response"),
    (["dataset.max_prompt_length=0"], "dataset.max_prompt_length=0 must be positive"),
    (["train.eval_batch_size=0"], "train.eval_batch_size=0 must be >= 1"),
    (["model.tokenizer=./no/such/tokenizer"], "model.tokenizer='./no/such/tokenizer': no such file or directory"),
    (["resume=/no/such/run"], "resume='/no/such/run': no such run dir"),
])
def test_bad_config_fails_before_any_model_loads(tmp_path, monkeypatch, overrides, message):
    import tisdpo.models.loading as loading
    from tisdpo.runtime.failures import run_recorded
    from tisdpo.stages.runner import run

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(loading, "build_model", forbidden)
    monkeypatch.setattr(loading, "load_tokenizer", forbidden)
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises((ConfigError, SystemExit)):
        run_recorded(cfg, run)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_cli_config_error_is_one_line_and_exit_status_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "loss=tisdpo", f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["config error: loss=tisdpo needs token weights: add estimator=<one of critical_tokens, dpo_pair, "
                     "dpo_reward, oracle, prompt, random, sft_pair, uniform>"], done.stderr[-2000:]
    [marker] = (tmp_path / "outputs" / "runs").glob("*/*/failed.json")
    assert json.loads(marker.read_text())["type"] == "ConfigError"


# ---------------------------------------------------------------------------------------
# 4. non-finite loss / gradient: stop with step and examples, keep the last good checkpoint
# ---------------------------------------------------------------------------------------
class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose backward is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the SFT model is built once for these tests


@pytest.mark.parametrize("fault,expected", [
    ("loss", r"non-finite loss nan at step 4 on examples \[\d+(, \d+){7}\]"),
    ("gradient", r"non-finite gradient at step 4 on examples \[\d+(, \d+){7}\]"),
])
def test_non_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, shared_cache, fault, expected):
    from tisdpo.modules.preference import PreferenceModule
    from tisdpo.runtime.failures import run_recorded
    from tisdpo.stages.runner import run

    original = PreferenceModule.compute

    def compute(self, batch):
        loss, metrics = original(self, batch)
        if self.training and self.global_step == 4:
            loss = loss * float("nan") if fault == "loss" else NanGrad.apply(loss)
        return loss, metrics

    monkeypatch.setattr(PreferenceModule, "compute", compute)
    overrides = ["eval=none", "train.max_steps=6", "checkpoint.every_n_steps=3", f"cache.dir={shared_cache}"]
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(FloatingPointError, match=expected):
        run_recorded(cfg, run)
    out = Path(cfg.paths.output_dir)
    failure = json.loads((out / "failed.json").read_text())
    assert failure["type"] == "FloatingPointError" and "at step 4" in failure["message"]
    assert "the newest checkpoint, written before this step, is" in failure["message"]  # the step-3 one
    assert failure["last_checkpoint"].endswith("last.ckpt") and not (out / "results.json").exists()
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())

    # Nothing lost: with the fault gone, resume=true continues from step 3 and finishes.
    monkeypatch.setattr(PreferenceModule, "compute", original)
    results = run(compose_config(overrides + ["resume=true"], tmp_path))
    assert results["train/steps"] == 6 and math.isfinite(results["val/loss"])
    assert not (out / "failed.json").exists() and (out / "failed.previous-1.json").is_file()


# ---------------------------------------------------------------------------------------
# 5. caches: corrupt or partial artifacts rebuilt with a warning, one builder across processes
# ---------------------------------------------------------------------------------------
def _payload_build(calls):
    def build(out):
        calls.append(1)
        (out / "model.bin").write_bytes(b"x" * 1000)
        (out / "config.json").write_text("{}")
    return build


@pytest.mark.parametrize("damage", ["truncated file", "missing file", "no manifest", "unreadable manifest"])
def test_corrupt_or_partial_artifact_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    from tisdpo.runtime.cache import MANIFEST, ArtifactCache

    cache, calls = ArtifactCache(tmp_path), []
    first = cache.get_or_build("sft", {"a": 1}, _payload_build(calls))
    if damage == "truncated file":
        (first.path / "model.bin").write_bytes(b"x" * 10)
    elif damage == "missing file":
        (first.path / "config.json").unlink()
    elif damage == "no manifest":
        (first.path / MANIFEST).unlink()
    else:
        (first.path / MANIFEST).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="tisdpo.runtime.cache"):
        again = cache.get_or_build("sft", {"a": 1}, _payload_build(calls))
    assert "corrupt or partial" in caplog.text and (again.reused, len(calls)) == (False, 2)
    assert (again.path / "model.bin").read_bytes() == b"x" * 1000 and cache.is_valid(again.path)


WORKER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from tisdpo.runtime.cache import ArtifactCache

    root, log = Path(sys.argv[1]), Path(sys.argv[2])
    while time.time() < float(sys.argv[3]):  # start together
        time.sleep(0.005)

    def build(out):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # long enough for the other process to be waiting on the lock
        (out / "weights.bin").write_bytes(b"w" * 100)

    artifact = ArtifactCache(root).get_or_build("estimator", {"estimator": "dpo_pair", "seed": 0}, build)
    print(json.dumps({"path": str(artifact.path), "reused": artifact.reused}))
""")


def test_two_processes_needing_the_same_artifact_build_it_once(tmp_path):
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "cache"), str(tmp_path / "builds.log"),
                               str(start)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one build, not two
    assert outputs[0]["path"] == outputs[1]["path"]
    assert sorted(o["reused"] for o in outputs) == [False, True]


def test_non_finite_without_any_checkpoint_says_so(tmp_path, monkeypatch, shared_cache):
    """checkpoint.every_n_steps=0: the message must not promise a checkpoint that does not exist."""
    from tisdpo.modules.preference import PreferenceModule
    from tisdpo.runtime.failures import run_recorded
    from tisdpo.stages.runner import run

    original = PreferenceModule.compute

    def compute(self, batch):
        loss, metrics = original(self, batch)
        return (loss * float("nan") if self.training and self.global_step == 2 else loss), metrics

    monkeypatch.setattr(PreferenceModule, "compute", compute)
    cfg = compose_config(["eval=none", "train.max_steps=4", "checkpoint.every_n_steps=0", f"cache.dir={shared_cache}"], tmp_path)
    with pytest.raises(FloatingPointError, match="no checkpoint was written before this step"):
        run_recorded(cfg, run)
