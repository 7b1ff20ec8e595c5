"""A resume refuses state that is not the run's: other data, a finished run's results under another
config, an earlier attempt's checkpoints; other code (another commit, or an edited working tree) is
refused unless resume_allow_code_change=true, which records it.

The data check is the function the runner calls right after ``prepare_data`` (``check_resume_data``),
fed rows directly: the rows are what it hashes, whichever file or hub split they came from.
"""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config
from tisdpo.stages.data import rows_fingerprint
from tisdpo.runtime.run_dir import begin_run, check_resume_data, prepare_run_dir
from tisdpo.runtime.validate import ConfigError


def data(tag: str):
    train = [{"prompt": f"p{i}", "chosen": f"c{i}{tag}", "rejected": "r"} for i in range(4)]
    test = [{"prompt": "q", "chosen": "c", "rejected": "r"}]
    return SimpleNamespace(train_rows=train, test_rows=test, sft_rows=[{"prompt": "p", "response": "c"}],
                           fingerprint=rows_fingerprint(train))


def start(tmp_path, *overrides):
    cfg = compose_config(list(overrides), tmp_path)
    out = prepare_run_dir(cfg)
    return cfg, out, begin_run(cfg, out, OmegaConf.to_container(cfg, resolve=True))


def test_a_resume_on_other_data_is_refused_in_one_line(tmp_path):
    cfg, out, _ = start(tmp_path, "loss=ipo")
    check_resume_data(cfg, out, data("a"))  # first start: recorded
    recorded = json.loads((out / "run_config.json").read_text())["_identity"]["data"]
    assert recorded["train"] == rows_fingerprint(data("a").train_rows) and recorded["n_train"] == 4

    cfg, out, _ = start(tmp_path, "loss=ipo", "resume=true")
    check_resume_data(cfg, out, data("a"))  # same rows: fine
    with pytest.raises(ConfigError) as error:
        check_resume_data(cfg, out, data("b"))
    message = str(error.value)
    print(message)
    assert message.startswith(f"resume: the data differs from the data {out} started with (train rows ")
    assert "sft" not in message and "\n" not in message


def test_a_finished_run_returns_its_results_only_for_the_config_it_finished_with(tmp_path):
    cfg, out, _ = start(tmp_path, "loss=dpo")
    (out / "results.json").write_text(json.dumps({"val/loss": 0.5, "config": OmegaConf.to_container(cfg, resolve=True)}))
    assert start(tmp_path, "loss=dpo", "resume=true")[2]["val/loss"] == 0.5  # finished: nothing to redo

    # The same dir re-run as ipo (no resume): the DPO attempt's results and checkpoints move aside.
    (out / "checkpoints").mkdir()
    start(tmp_path, "loss=ipo")
    assert (out / "results.previous-1.json").is_file() and (out / "checkpoints.previous-1").is_dir()
    assert not (out / "results.json").exists() and start(tmp_path, "loss=ipo", "resume=true")[2] is None

    # A results.json from another config (however it got there) is refused, not returned.
    (out / "results.previous-1.json").rename(out / "results.json")
    with pytest.raises(ConfigError) as error:
        start(tmp_path, "loss=ipo", "resume=true")
    print(error.value)
    assert str(error.value).startswith(f"resume: {out} finished with a different config (")
    assert "loss.name: 'dpo' -> 'ipo'" in str(error.value) and "\n" not in str(error.value)


def test_other_code_is_refused_unless_resume_allow_code_change(tmp_path, monkeypatch, caplog):
    import tisdpo.runtime.run_dir as run_dir

    monkeypatch.setattr(run_dir, "code_identity", lambda: {"git_commit": "aaaa", "version": "0.1", "source_hash": "s1"})
    _, out, _ = start(tmp_path, "loss=ipo")
    monkeypatch.setattr(run_dir, "code_identity", lambda: {"git_commit": "aaaa", "version": "0.1", "source_hash": "s2"})
    with pytest.raises(ConfigError, match="source_hash: 's1' -> 's2'.*resume_allow_code_change=true"):
        start(tmp_path, "loss=ipo", "resume=true")  # same commit, edited working tree
    with caplog.at_level(logging.WARNING):
        start(tmp_path, "loss=ipo", "resume=true", "resume_allow_code_change=true")
    assert "the code differs from the code" in caplog.text and "source_hash: 's1' -> 's2'" in caplog.text
    [change] = json.loads((out / "run_config.json").read_text())["_identity"]["code_changes"]
    assert change["from"]["source_hash"] == "s1" and change["to"]["source_hash"] == "s2"
