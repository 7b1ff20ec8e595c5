"""Bad data files: one line naming the option, the file, the 0-based row, the line and the field;
exit status 2 from run.py before any model loads. And train/test pair hygiene (dedupe)."""
from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tisdpo.data import DataError, drop_duplicate_pairs, holdout_split, load_preference_rows, read_raw_rows
from tisdpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / ".." / "shared" / "data" / "gpt2_tokenizer"


def uf(i: int, **over) -> dict:
    return {"prompt": f"prompt {i}", "chosen": f"chosen {i}", "rejected": f"rejected {i}", **over}


def tldr(choice=0) -> dict:
    return {"info": {"post": "p", "title": "t", "subreddit": "s", "id": "x"},
            "summaries": [{"text": "a", "policy": "ref"}, {"text": "b", "policy": "sup"}], "choice": choice}


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write(path: Path, rows) -> Path:
    """rows -> file by suffix: .json (a list), .jsonl, .jsonl.gz, .parquet."""
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(jsonl(rows).encode()))
    elif name.endswith(".jsonl"):
        path.write_text(jsonl(rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


def error_of(name: str, path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_preference_rows(name, path=path, **kwargs)
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, UserError)
    return text


# ---------------------------------------------------------------------------------------
# rows: the real row, the real type, the file and which option it came from
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,line", [("jsonl", " at line 6"), ("jsonl.gz", " at line 6"), ("json", ""),
                                         ("parquet", "")])
@pytest.mark.parametrize("split,option", [("train_prefs", "dataset.path"), ("test_prefs", "dataset.test_path")])
def test_bad_row_names_option_file_row_and_field_in_every_format(tmp_path, suffix, line, split, option):
    rows = [uf(i) for i in range(8)]
    rows[5] = uf(5, chosen=None)  # None, not a type clash: parquet needs one type per column
    path = write(tmp_path / f"pairs.{suffix}", rows)
    text = error_of("ultrafeedback", path, split=split)
    assert text == (f"ultrafeedback row 5, field 'chosen': expected a string or a list of messages, got None "
                    f"(in {option} {str(path)!r}{line}; rows count from 0)")


def test_row_types_are_the_files_not_a_columns(tmp_path):
    """A float in row 60 is reported at row 60 as the float it is (a columnar read made row 0's 0 into 0.0)."""
    rows = [tldr(i % 2) for i in range(70)]
    rows[60]["choice"] = 1.0
    text = error_of("tldr", write(tmp_path / "tldr.jsonl", rows))
    assert text.startswith("tldr row 60, field 'choice': expected 0 or 1, got float 1.0 (in dataset.path ")
    assert "at line 61" in text


def test_explicit_option_wins_and_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(uf(0)) + "\n\n" + json.dumps(uf(1, prompt=3)) + "\n")
    text = error_of("ultrafeedback", path, option="dataset.test_path")
    assert text.endswith(f"(in dataset.test_path {str(path)!r} at line 3; rows count from 0)")
    assert text.startswith("ultrafeedback row 1, field 'prompt'")


def test_rows_read_as_they_are_and_hub_still_reads_a_dataset(tmp_path, monkeypatch):
    path = write(tmp_path / "p.jsonl", [uf(0, extra={"nested": [1, 2.5]})])
    assert read_raw_rows("ultrafeedback", path=path) == [uf(0, extra={"nested": [1, 2.5]})]
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_list([uf(0), uf(1, chosen=None)]))
    text = str(pytest.raises(DataError, load_preference_rows, "ultrafeedback", split="train").value)
    assert "row 1, field 'chosen'" in text and "hub 'HuggingFaceH4/ultrafeedback_binarized' split 'train'" in text


# ---------------------------------------------------------------------------------------
# files: encodings, compression, JSON, emptiness, directories
# ---------------------------------------------------------------------------------------
def test_utf8_with_or_without_bom_is_read(tmp_path):
    body = jsonl([uf(0), uf(1, prompt="café ✓")]).encode("utf-8")
    for name, data in (("plain.jsonl", body), ("bom.jsonl", b"\xef\xbb\xbf" + body)):
        (tmp_path / name).write_bytes(data)
        rows, _ = load_preference_rows("ultrafeedback", path=tmp_path / name)
        assert rows[1]["prompt"] == "café ✓"
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([uf(0)]).encode())
    assert len(load_preference_rows("ultrafeedback", path=tmp_path / "bom.json")[0]) == 1


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_utf16_is_named(tmp_path, encoding):
    path = tmp_path / "u.jsonl"
    path.write_text(jsonl([uf(0)]), encoding=encoding)
    assert error_of("ultrafeedback", path) == (f"ultrafeedback, dataset.path {str(path)!r}: the file is UTF-16 "
                                               "(or UTF-32) encoded; save it as UTF-8")


@pytest.mark.parametrize("name,data", [("z.jsonl", b"\0" * 4096), ("z.json", b"\0"), ("z.parquet", b"\0" * 64),
                                       ("z.jsonl.gz", gzip.compress(b"\0" * 100))])
def test_a_file_of_nul_bytes_is_named_as_such_not_as_utf16(tmp_path, name, data):
    """A zero-filled file (an interrupted copy, a preallocated file) is not text in any encoding:
    re-encoding it as UTF-8, as the UTF-16 message would advise, cannot help."""
    path = tmp_path / name
    path.write_bytes(data)
    n = len(gzip.decompress(data)) if name.endswith(".gz") else len(data)
    assert error_of("hh", path) == (f"hh, dataset.path {str(path)!r}: the file holds only NUL bytes ({n:,} of them): "
                                    "a zero-filled (binary) file, not text; re-download or re-create it")


def test_latin1_byte_is_named_with_its_line_and_offset(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_bytes((jsonl([uf(0), uf(1)]) + '{"prompt": "caf\u00e9"}\n').encode("latin-1"))
    assert error_of("ultrafeedback", path, split="test") == (
        f"ultrafeedback, dataset.test_path {str(path)!r}, line 3: not valid UTF-8 (byte 0xe9 at offset 15 of the "
        "line); save the file as UTF-8")


def test_truncated_gzip(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([uf(i) for i in range(50)]).encode())[:-12])
    text = error_of("ultrafeedback", path)
    assert text.startswith(f"ultrafeedback, dataset.path {str(path)!r}: not a complete gzip file (")
    assert text.endswith("re-download or re-compress it")
    (tmp_path / "n.jsonl.gz").write_text("not gzip")
    assert "not a complete gzip file" in error_of("ultrafeedback", tmp_path / "n.jsonl.gz")
    (tmp_path / "z.jsonl").write_bytes(gzip.compress(b"{}"))
    assert error_of("ultrafeedback", tmp_path / "z.jsonl").endswith("gzip-compressed but its name does not end in .gz")


def test_invalid_json_names_the_row_and_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(jsonl([uf(0), uf(1)]) + '{"prompt": "x", "chosen"\n' + jsonl([uf(3)]))
    assert error_of("ultrafeedback", path) == (
        "ultrafeedback row 2: not valid JSON: Expecting ':' delimiter at column 25 "
        f"(in dataset.path {str(path)!r} at line 3; rows count from 0)")
    array = tmp_path / "a.json"
    array.write_text('[\n {"prompt": "a"},\n {"prompt": "b" "chosen": 1}\n]')
    assert error_of("ultrafeedback", array) == (
        f"ultrafeedback, dataset.path {str(array)!r}, line 3: not valid JSON: Expecting ',' delimiter at column 17")
    one = tmp_path / "o.json"
    one.write_text(json.dumps({"rows": [uf(0)]}, indent=2))
    assert "holds one JSON object, not rows" in error_of("ultrafeedback", one)


@pytest.mark.parametrize("content,message", [
    (b"", "the file is empty (0 bytes)"),
    (b"\n  \n", "the file holds only whitespace, no rows"),
    (b"[]", "no rows to load (the source is empty)"),
])
def test_empty_files_say_so(tmp_path, content, message):
    path = tmp_path / "e.jsonl"
    path.write_bytes(content)
    assert error_of("hh", path) == f"hh, dataset.path {str(path)!r}: {message}"


def test_directory_missing_file_and_bad_suffix(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    assert error_of("hh", folder).startswith(f"hh, dataset.path {str(folder)!r}: is a directory, not a file; give")
    assert error_of("hh", tmp_path / "nope.parquet").endswith("nope.parquet': does not exist")
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "unsupported file type; use one of .json" in error_of("hh", tmp_path / "x.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    assert "not a readable parquet file (" in error_of("hh", tmp_path / "bad.parquet")


# ---------------------------------------------------------------------------------------
# dedupe and the hold-out split
# ---------------------------------------------------------------------------------------
def test_duplicate_pairs_are_dropped_and_counted(caplog):
    train = [uf(0), uf(1), uf(0, meta={"row": 9}), uf(2), uf(1)]
    test = [uf(3), uf(0), uf(3), uf(4)]
    before = [dict(r) for r in train], [dict(r) for r in test]
    with caplog.at_level(logging.WARNING, logger="tisdpo.data.dedupe"):
        new_train, new_test, counts = drop_duplicate_pairs(train, test)
    assert new_train == [uf(0), uf(1), uf(2)] and new_test == [uf(3), uf(4)]
    assert counts == {"train_duplicates": 2, "test_duplicates": 1, "test_in_train": 1}
    assert (train, test) == before  # inputs untouched
    [record] = caplog.records
    assert "2 duplicate training pairs (of 5), 1 duplicate test pairs and 1 test pairs" in record.getMessage()


def test_clean_pairs_pass_silently(caplog):
    with caplog.at_level(logging.WARNING, logger="tisdpo.data.dedupe"):
        out = drop_duplicate_pairs([uf(0), uf(1)], [uf(2)])
    assert out == ([uf(0), uf(1)], [uf(2)], {"train_duplicates": 0, "test_duplicates": 0, "test_in_train": 0})
    assert not caplog.records
    assert drop_duplicate_pairs([uf(0), uf(0)], [])[1:] == ([], {"train_duplicates": 1, "test_duplicates": 0,
                                                                 "test_in_train": 0})


def test_test_split_made_only_of_training_copies_is_an_error():
    """The tester's file: 19 held-out pairs, every one a copy of a training pair."""
    train = [uf(i) for i in range(19)] * 9
    test = [uf(i) for i in range(19)]
    with pytest.raises(DataError, match=r"^ultrafeedback: all 19 test pairs are duplicates of training pairs"):
        drop_duplicate_pairs(train, test, dataset="ultrafeedback")
    with pytest.raises(DataError, match="the training split is empty"):
        drop_duplicate_pairs([], test)


def test_holdout_split_needs_two_pairs():
    with pytest.raises(DataError) as err:
        holdout_split([uf(0)], None, dataset="ultrafeedback", source="dataset.path 'one.jsonl'")
    assert str(err.value) == ("ultrafeedback, dataset.path 'one.jsonl': 1 usable pair: too few to hold out a test "
                              "split (need at least 2: one to train on, one to validate on); add rows or give "
                              "dataset.test_path")
    assert holdout_split([uf(0), uf(1)], None) == ([uf(0)], [uf(1)])
    train, test = holdout_split([uf(i) for i in range(100)], 3)
    assert (len(train), len(test), test[0]) == (97, 3, uf(97))
    assert len(holdout_split([uf(i) for i in range(5000)], None)[1]) == 256


# ---------------------------------------------------------------------------------------
# end to end: one line on stderr, exit status 2, nothing loaded
# ---------------------------------------------------------------------------------------
ENV = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}


def run_py(tmp_path, *overrides):
    if not TOKENIZER.exists():
        pytest.skip(f"shared tokenizer {TOKENIZER} not available")
    cmd = [sys.executable, str(ROOT / "run.py"), "dataset=ultrafeedback", f"model.tokenizer={TOKENIZER}",
           "eval=none", "logger=none", f"paths.root_dir={tmp_path}", *overrides]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode, lines, done.stderr


def test_cli_bad_test_row_is_one_line_naming_the_test_file(tmp_path):
    train = write(tmp_path / "train.jsonl", [uf(i) for i in range(20)])
    test = tmp_path / "test.jsonl"
    test.write_text(jsonl([uf(100), uf(101)]) + jsonl([uf(102, rejected=5)]))
    code, lines, stderr = run_py(tmp_path, f"dataset.path={train}", f"dataset.test_path={test}")
    assert code == 2, stderr[-3000:]
    assert lines == ["data error: ultrafeedback row 2, field 'rejected': expected a string or a list of messages, "
                     f"got int (in dataset.test_path {str(test)!r} at line 3; rows count from 0)"], stderr[-3000:]
    [marker] = (tmp_path / "outputs" / "runs").glob("*/*/failed.json")
    assert json.loads(marker.read_text())["type"] == "DataError"


def test_cli_truncated_gzip_is_one_line(tmp_path):
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([uf(i) for i in range(40)]).encode())[:-12])
    code, lines, stderr = run_py(tmp_path, f"dataset.path={path}")
    assert code == 2 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"data error: ultrafeedback, dataset.path {str(path)!r}: not a complete gzip file")
