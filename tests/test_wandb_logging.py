"""W&B as the place where runs are compared (issue 15): run identity, every stage visible, artifacts
and tables, offline-first.

The end-to-end tests run `python run.py` in a subprocess with WANDB_MODE=offline and read what W&B
wrote: the records (protobuf ``Record``s in W&B's LevelDB-style log) of each
``wandb/offline-run-*/run-*.wandb``, i.e. exactly what ``wandb sync`` would upload.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, TINY, compose_config
from tisdpo.runtime import loggers

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (after the importorskip)

# The test-sized run: TINY with W&B as the logger and fewer steps.
FAST = [o for o in TINY if not o.startswith(("logger=", "sft.max_steps", "train.max_steps", "eval.n_prompts"))] + [
    "logger=wandb", "sft.max_steps=10", "eval.n_prompts=8"]


# ---------------------------------------------------------------- reading offline runs

BLOCK, HEADER = 32768, 7            # W&B's log: 32 KiB blocks, 7-byte chunk headers (crc32, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The ``Record`` protobufs of one ``run-<id>.wandb`` file (LevelDB log format, ':W&B' header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""      # the file starts with a 7-byte header: ident, magic, version
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:        # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0:               # zero padding at the end of the file
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@dataclass
class OfflineRun:
    id: str
    name: str
    group: str
    job_type: str
    tags: list[str]
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    artifacts: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (name, type, refs or paths)
    tables: set[str] = field(default_factory=set)  # history keys whose value is a W&B Table


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> OfflineRun:
    run = None
    config, summary, artifacts, tables = {}, {}, [], set()
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = (r.run_id, r.display_name, r.run_group, r.job_type, list(r.tags))
            config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            tables |= {_key(i).rsplit("/", 1)[0] for i in record.history.item
                       if _key(i).endswith("/_type") and json.loads(i.value_json) == "table-file"}
        elif kind == "artifact" and record.artifact.type != "run_table":  # run_table: a Table's own artifact
            a = record.artifact
            artifacts.append((a.name, a.type, [e.ref or e.path for e in a.manifest.contents]))
    assert run is not None, f"{path} has no run record"
    return OfflineRun(*run, config=config, summary=summary, artifacts=artifacts, tables=tables)


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    return [read_run(p) for p in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))]


def run_py(args: list[str], cwd: Path, mode: str = "offline") -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": mode, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def paths(tmp_path: Path) -> list[str]:
    return [f"paths.root_dir={tmp_path}", f"cache.dir={tmp_path / 'cache'}"]


# ---------------------------------------------------------------- end to end (offline W&B)


def test_sweep_jobs_share_a_group_with_tags_overrides_artifacts_and_tables(tmp_path):
    sweep = tmp_path / "sweep"
    run_py(["-m", "loss=dpo,ipo", *FAST, "train.max_steps=8", *paths(tmp_path), f"hydra.sweep.dir={sweep}"], tmp_path)

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    trains = {}
    for job, loss in zip(jobs, ("dpo", "ipo")):
        runs = offline_runs(job)
        [train] = [r for r in runs if r.job_type == "train"]
        trains[loss] = train
        assert train.group == f"adhoc-{sweep.name}"
        assert f"loss:{loss}" in train.tags and "seed:0" in train.tags and "scale:tiny" in train.tags
        assert f"loss={loss}" in train.config["overrides"] and "train.max_steps=8" in train.config["overrides"]
        assert set(train.config["code_version"]) in ({"commit", "dirty"}, {"package"})
        assert train.config["logger"]["group"] == train.group  # what the report's dashboard filters on
        types = {t for _, t, _ in train.artifacts}
        assert {"results", "config", "weights", "model"} <= types or {"results", "config", "model"} <= types
        [(_, _, refs)] = [(n, t, refs) for n, t, refs in train.artifacts if t == "model"]
        assert refs and all(r.startswith("file://") for r in refs)  # the policy by reference, not uploaded
        assert "eval/samples" in train.tables
        assert json.loads((job / "results.json").read_text())["config"]["logger"]["group"] == train.group
        assert json.loads((job / loggers.RUN_RECORD).read_text())["id"] == train.id
        # every W&B run of the job (the SFT stage where this job built it) is in the sweep's group
        assert {r.group for r in runs} == {train.group}
    assert trains["dpo"].id != trains["ipo"].id

    # SFT is built by the first job (its own run, job_type sft) and reused by the second.
    [sft] = [r for r in offline_runs(jobs[0]) if r.job_type == "sft"]
    assert sft.name.startswith("sft-") and sft.group == trains["dpo"].group
    assert not [r for r in offline_runs(jobs[1]) if r.job_type == "sft"]
    assert trains["dpo"].summary["stages/sft/reused"] is False
    assert trains["ipo"].summary["stages/sft/reused"] is True
    assert sft.id in trains["ipo"].summary["stages/sft/built_by"]


def test_tisdpo_stage_runs_join_the_training_run_group_and_eval_continues_the_run(tmp_path):
    run_dir = tmp_path / "run"
    args = ["loss=tisdpo", "estimator=dpo_pair", "estimator.max_steps=4", *FAST, "train.max_steps=4", *paths(tmp_path), f"hydra.run.dir={run_dir}"]
    run_py(args, tmp_path)

    runs = offline_runs(run_dir)
    by_type = {}
    for r in runs:
        by_type.setdefault(r.job_type, []).append(r)
    assert sorted(by_type) == ["estimator", "sft", "train"]
    [train], [sft] = by_type["train"], by_type["sft"]
    assert {r.group for r in runs} == {f"adhoc-{run_dir.name}"}
    assert sorted(r.name.rsplit("-", 1)[1] for r in by_type["estimator"]) == ["negative", "positive"]
    assert all(r.name.startswith("estimator-") and "stage:estimator" in r.tags for r in by_type["estimator"])
    assert sft.name.startswith("sft-") and "estimator:dpo_pair" in train.tags
    for r in by_type["estimator"]:
        assert r.id in train.summary["stages/estimator/built_by"]
    assert "weights/responses" in train.tables and "eval/samples" in train.tables
    [(_, _, files)] = [(n, t, f) for n, t, f in train.artifacts if t == "weights"]
    assert sorted(files) == ["token_weights.html", "weights.npz", "weights_hist.png"]
    # The built artifacts name the runs that built them.
    [sft_record] = (tmp_path / "cache" / "sft").glob(f"*/{loggers.RUN_RECORD}")
    assert [e["id"] for e in json.loads(sft_record.read_text())["runs"]] == [sft.id]

    # The eval-only command logs into that same run.
    script = (f"from tisdpo.runtime.loggers import open_run_logger, finish_logging; from pathlib import Path; "
              f"lg = open_run_logger({str(run_dir)!r}); lg.log_metrics({{'eval/extra': 1.0}}); "
              f"finish_logging(lg, Path({str(run_dir)!r}), {{'eval/extra': 1.0}})")
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [evaluation] = [r for r in offline_runs(run_dir) if r.job_type == "eval"]
    assert evaluation.id == train.id and evaluation.group == train.group
    assert any(t == "results" for _, t, _ in evaluation.artifacts)


# ---------------------------------------------------------------- disabled: nothing at all


def test_wandb_disabled_writes_nothing_and_stage_loggers_are_off(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_config(["logger=wandb"], tmp_path)
    assert loggers.build_logger(cfg, OmegaConf.to_container(cfg, resolve=True)) is False
    assert loggers.stage_logger(cfg, "sft", "sft-x") is False
    assert not (tmp_path / "run" / loggers.RUN_RECORD).exists() and not (tmp_path / "run" / "wandb").exists()
    assert loggers.open_run_logger(tmp_path / "run") is False


def test_logger_none_has_no_stage_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["logger=none"], tmp_path)
    assert loggers.stage_logger(cfg, "estimator", "estimator-x-positive") is False
    assert loggers.build_logger(cfg, {}) is False


# ---------------------------------------------------------------- identity, unit level


def test_group_names_the_experiment_and_the_dir_and_logger_group_wins(tmp_path):
    cfg = compose_config([], tmp_path)
    assert loggers.run_group(cfg) == "adhoc-run"
    cfg = compose_config(["experiment=tisdpo_pku_main"], tmp_path)
    assert loggers.run_group(cfg) == "tisdpo_pku_main-run"  # outside Hydra: the config's paper_table
    cfg = compose_config(["logger=wandb", "logger.group=mine"], tmp_path)
    assert loggers.run_group(cfg) == "mine"
    assert loggers._dir_stamp(Path("outputs/multiruns/2025-01-31/12-00-00")) == "2025-01-31_12-00-00"
    assert loggers._dir_stamp(Path("/tmp/my-sweep")) == "my-sweep"


def test_resumed_run_keeps_its_recorded_group(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / loggers.RUN_RECORD).write_text(json.dumps({"id": "abc", "group": "first-group"}))
    assert loggers.run_group(compose_config(["logger=wandb", "resume=true"], tmp_path)) == "first-group"
    assert loggers.run_group(compose_config(["logger=wandb"], tmp_path)) == "adhoc-run"  # not resuming: a new run


def test_resume_continues_the_recorded_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["logger=wandb"], tmp_path)
    first = loggers.build_logger(cfg, OmegaConf.to_container(cfg, resolve=True))  # no W&B run starts until used
    record = json.loads((tmp_path / "run" / loggers.RUN_RECORD).read_text())
    assert record["id"] == first.version and record["group"] == "adhoc-run" and record["job_type"] == "train"
    cfg = compose_config(["logger=wandb", "resume=true"], tmp_path)
    assert loggers.build_logger(cfg, OmegaConf.to_container(cfg, resolve=True)).version == first.version
    cfg = compose_config(["logger=wandb"], tmp_path)  # a new start in the same dir is a new W&B run
    assert loggers.build_logger(cfg, OmegaConf.to_container(cfg, resolve=True)).version != first.version


def test_tags_carry_label_loss_estimator_dataset_scale_seed(tmp_path):
    cfg = compose_config(["method=tisdpo_d", "seed=3", "logger=wandb", "logger.tags=[extra]"], tmp_path)
    tags = loggers.run_tags(cfg)
    assert tags[:6] == ["label:TIS-DPO(D)", "loss:tisdpo", "estimator:dpo_pair", "dataset:synthetic", "scale:tiny",
                        "seed:3"]
    assert tags[-1] == "extra" and all(len(t) <= 64 for t in tags)


def test_stage_run_names_come_from_the_build_dir():
    assert loggers.stage_run_name("estimator", Path("/c/estimator/.build-0123abcd"), "positive") == \
        "estimator-0123abcd-positive"
    assert loggers.stage_run_name("estimator", Path("/c/_uncached/estimator/.tmp-0123abcd-9f9f9f9f"), "negative") == \
        "estimator-0123abcd-negative"


def test_code_version_names_the_commit():
    version = loggers.code_version()
    assert len(version.get("commit", "")) == 40 or "package" in version


# ---------------------------------------------------------------- tables, unit level


def test_samples_table_has_prompt_response_and_every_verdict():
    samples = [{"prompt": "p", "response": "r", "temperature": 1.0, "reward": 0.5, "safe": True,
                "token_rewards": [0.1, 0.4], "response_ids": [1, 2]},
               {"prompt": "q", "response": "s", "temperature": 0.0, "eval/judge": "win"}]
    table = loggers.samples_table(samples, max_rows=10)
    assert table.columns[:5] == ["prompt", "response", "temperature", "reward", "safe"]
    assert "response_ids" not in table.columns and {"token_rewards", "eval/judge"} <= set(table.columns)
    assert table.data[0][table.columns.index("token_rewards")] == "[0.1, 0.4]"
    assert len(loggers.samples_table(samples, max_rows=1).data) == 1


def test_weights_table_has_the_first_responses_weights(tmp_path):
    np.savez(tmp_path / "weights.npz", chosen_weights=np.array([1.0, 2.0, 0.5]), chosen_lengths=np.array([2, 1]),
             rejected_weights=np.array([0.25]), rejected_lengths=np.array([1]))
    table = loggers.weights_table(tmp_path / "weights.npz", max_rows=5)
    assert table.data[0] == ["chosen", 0, 2, 1.5, 1.0, 2.0, "1.000 2.000"]
    assert [row[:3] for row in table.data] == [["chosen", 0, 2], ["chosen", 1, 1], ["rejected", 0, 1]]
