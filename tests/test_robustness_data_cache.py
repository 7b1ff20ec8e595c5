"""Issue #24: one row costs about max_length tokens of work however long it is (truncated while
tokenising, counted, never an abort), and a cached stage knows the code that built it (edited code
rebuilds; cache.reuse_across_code=true reuses, and says so)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

import pytest

import tisdpo.runtime.cache as cache_module
from tests.conftest import ROOT, TINY
from tisdpo.data import tokenize_dataset, tokenize_example
from tisdpo.data.errors import DropCounter
from tisdpo.hashing import code_hash, module_closure
from tisdpo.runtime.cache import ArtifactCache, set_code_policy


@pytest.fixture(scope="module")
def tok():
    from tests.test_data_fuzz import word_tokenizer

    return word_tokenizer()


def row(prompt, chosen, rejected="w5 w6"):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": {"dataset": "toy"}}


def whole_then_cut(example, tok, max_length, max_prompt_length, mode):
    """The old way, as a reference: tokenise every text whole, then cut."""
    from tisdpo.data import tokenize as t

    bos = t._bos_prefix(tok)
    prompt = bos + t._ids(tok, example["prompt"])
    responses = [t._ids(tok, example[k]) + [tok.eos_token_id] for k in ("chosen", "rejected")]
    if len(prompt) + max(map(len, responses)) > max_length:
        prompt = t._truncate_prompt(prompt, max_prompt_length, mode, len(bos))
    budget = max_length - len(prompt)
    return prompt, [r[:budget] for r in responses]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
@pytest.mark.parametrize("n_prompt,n_chosen", [(3, 2), (10, 30), (400, 5), (5, 900), (3000, 3000)])
def test_truncating_while_tokenising_gives_the_same_tokens(tok, mode, n_prompt, n_chosen):
    example = row(" ".join(f"w{i % 50}" for i in range(n_prompt)), " ".join(f"w{i % 40}" for i in range(n_chosen)))
    out = tokenize_example(example, tok, max_length=64, max_prompt_length=32, truncation_mode=mode)
    prompt, (chosen, rejected) = whole_then_cut(example, tok, 64, 32, mode)
    assert out["prompt_input_ids"] == prompt
    assert out["chosen_input_ids"] == prompt + chosen and out["rejected_input_ids"] == prompt + rejected


def test_a_60_mb_row_is_cut_and_counted_in_a_moment(tok):
    huge = "w7 " * 20_000_000  # 60 MB
    counter = DropCounter("toy", total=3)
    started = time.perf_counter()
    out, _ = tokenize_dataset([row("w1 w2", "w3 w4"), row("w1", huge), row(huge, "w3")], tok, counter=counter,
                              max_length=64, max_prompt_length=32)
    assert time.perf_counter() - started < 5
    assert len(out) == 3 and len(out[1]["chosen_input_ids"]) == 64 and len(out[2]["prompt_input_ids"]) == 32
    assert counter.as_dict()["data/truncated/response"] == 1 and counter.as_dict()["data/truncated/prompt"] == 1


def test_a_data_file_with_a_60_mb_row_runs_to_the_end(tmp_path):
    from tests.test_faults import _hh_file, _hh_row
    from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

    tokenizer_dir = tmp_path / "tokenizer"
    SyntheticTask(SyntheticTaskConfig(n_sft=8, n_train_pairs=8, n_test_pairs=4)).tokenizer().save_pretrained(tokenizer_dir)
    rows = [_hh_row(i) for i in range(40)]
    rows[3] = _hh_row(3, chosen=" w1" * 20_000_000)  # one 60 MB row
    data = _hh_file(tmp_path / "train.jsonl", rows)
    assert data.stat().st_size > 60e6
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *[o for o in TINY if not o.startswith(("eval.", "dataset."))],
                           "dataset=hh", f"dataset.path={data}", f"model.tokenizer={tokenizer_dir}", "dataset.max_length=24",
                           "dataset.max_prompt_length=12", "eval=none", "sft.max_steps=2", "train.max_steps=1",
                           "train.val_every_n_steps=0", f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 2), done.stderr[-3000:]
    if done.returncode == 0:
        results = json.loads((run_dir / "results.json").read_text())
        assert results["data/train/truncated/response"] >= 1
    else:
        assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1
        assert (run_dir / "failed.json").is_file()


# ---------------------------------------------------------------------------------------- stage caches
def test_the_code_hash_follows_imports_and_ignores_comments(tmp_path, monkeypatch):
    import tisdpo.hashing as hashing

    package = tmp_path / "tisdpo"
    (package / "stages").mkdir(parents=True)
    for init in (package / "__init__.py", package / "stages" / "__init__.py"):
        init.write_text("")
    (package / "stages" / "a.py").write_text("from tisdpo.stages import b\n\ndef build():\n    return b.x\n")
    (package / "stages" / "b.py").write_text("x = 1\n")
    (package / "stages" / "c.py").write_text("y = 2\n")  # not imported by a

    def fresh():
        for cached in (hashing._parsed, hashing.module_closure, hashing.code_hash):
            cached.cache_clear()
        return hashing.code_hash("tisdpo.stages.a")

    monkeypatch.setattr(hashing, "PACKAGE_DIR", package)
    monkeypatch.setattr(hashing, "REPO_ROOT", tmp_path)
    try:
        first = fresh()
        assert hashing.module_closure("tisdpo.stages.a") == ("tisdpo", "tisdpo.stages", "tisdpo.stages.a", "tisdpo.stages.b")
        (package / "stages" / "b.py").write_text("# a comment\nx = 1  # the same code\n")
        assert fresh() == first
        (package / "stages" / "c.py").write_text("y = 2\nz = 3\n")
        assert fresh() == first
        (package / "stages" / "b.py").write_text("x = 1\nw = 0\n")  # one new statement in an import
        assert fresh() != first
    finally:
        monkeypatch.undo()
        fresh()


def test_edited_code_rebuilds_a_stage_unless_reuse_across_code(tmp_path, monkeypatch):
    from tisdpo.jsonio import write_json_atomic

    builds = []

    def build(out, text="artifact"):
        builds.append(out)
        (out / "a.txt").write_text(text)

    # a builder whose code lives in tisdpo (its module decides the code hash)
    builder = functools.partial(build)
    builder.func.__module__ = write_json_atomic.__module__
    fields = {"seed": 0}
    set_code_policy(False)
    first = ArtifactCache(tmp_path).get_or_build("sft", fields, builder)
    assert first.key.endswith("-" + code_hash("tisdpo.jsonio"))
    again = ArtifactCache(tmp_path).get_or_build("sft", fields, builder)
    assert again.reused and len(builds) == 1  # unchanged code: reused

    monkeypatch.setattr(cache_module, "code_hash", lambda module: "edited000000")
    cache = ArtifactCache(tmp_path)
    rebuilt = cache.get_or_build("sft", fields, builder)
    assert not rebuilt.reused and len(builds) == 2 and rebuilt.key != first.key
    assert cache.events[-1]["code"] == "edited000000"

    monkeypatch.setattr(cache_module, "code_hash", lambda module: "edited111111")
    try:
        set_code_policy(True)
        cache = ArtifactCache(tmp_path)
        reused = cache.get_or_build("sft", fields, builder)
    finally:
        set_code_policy(False)
    assert reused.reused and len(builds) == 2
    event = cache.events[-1]
    assert event["reused_across_code"] is True and event["code_now"] == "edited111111"
    assert event["code"] in (first.key.partition("-")[2], "edited000000")
