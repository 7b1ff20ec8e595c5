"""The data stage on local files: duplicate pairs dropped and counted, no test pair equal to a
training pair, and a file too small to split explained in one line (exit status 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA, compose_config
from tisdpo.data.errors import DataError
from tisdpo.stages.data import prepare_data

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "gpt2_tokenizer").is_dir(), reason="../shared/data is absent")
TOKENIZER = f"model.tokenizer={SHARED_DATA / 'gpt2_tokenizer'}"


def _ultrafeedback_rows(n: int) -> list[dict]:
    with open(SHARED_DATA / "ultrafeedback_binarized_train_1k.jsonl") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_one_file_with_duplicates_holds_out_no_copy_of_a_training_pair(tmp_path):
    rows = _ultrafeedback_rows(30)
    path = _write(tmp_path / "dup.jsonl", rows + rows[:20])  # the last 20 rows copy training rows
    data = prepare_data(compose_config(["dataset=ultrafeedback", f"dataset.path={path}", TOKENIZER], tmp_path))
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert not {key(r) for r in data.test_rows} & {key(r) for r in data.train_rows}
    assert len(data.train_rows) + len(data.test_rows) == 30
    assert data.drops["dedupe/train_duplicates"] == 20


def test_test_file_pairs_seen_in_training_are_dropped(tmp_path):
    rows = _ultrafeedback_rows(20)
    train = _write(tmp_path / "train.jsonl", rows)
    test = _write(tmp_path / "test.jsonl", rows[:5] + _ultrafeedback_rows(25)[20:])
    data = prepare_data(compose_config(["dataset=ultrafeedback", f"dataset.path={train}", f"dataset.test_path={test}",
                                        TOKENIZER], tmp_path))
    assert len(data.test_rows) == 5 and data.drops["dedupe/test_in_train"] == 5


def test_a_one_row_file_is_explained_before_any_model_loads(tmp_path):
    path = _write(tmp_path / "one.jsonl", _ultrafeedback_rows(1))
    with pytest.raises(DataError, match="too few to hold out a test split"):
        prepare_data(compose_config(["dataset=ultrafeedback", f"dataset.path={path}", TOKENIZER], tmp_path))
    done = subprocess.run([sys.executable, "run.py", "dataset=ultrafeedback", f"dataset.path={path}", TOKENIZER,
                           "logger=none", "eval=none", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("data error:") and "one.jsonl" in lines[0], lines


def test_a_limited_sample_keeps_the_whole_files_test_split(tmp_path):
    """Issue 23: dataset.limit=8 on one file of 100 pairs trains on 8 and validates on the file's
    held-out rows (10 here: a tenth of the file, at most dataset.test_limit), not a tenth of the 8."""
    rows = _ultrafeedback_rows(100)
    path = _write(tmp_path / "one.jsonl", rows)
    data = prepare_data(compose_config(["dataset=ultrafeedback", f"dataset.path={path}", TOKENIZER,
                                        "dataset.limit=8", "dataset.test_limit=512"], tmp_path))
    assert len(data.train_rows) == 8 and len(data.test_rows) == 10
    assert [r["prompt"] for r in data.test_rows] == [r["prompt"] for r in rows[-10:]]
    assert data.tokenizer.__class__.__name__.startswith("GPT2")  # chat_template=auto: GPT-2 has none
