"""bench/method_cost.py: the measurement of a child process (on trivial commands, never a training run),
the table it writes, and the report's reading of it (experiments.report --cost)."""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest

from bench import method_cost as mc
from experiments.collect import Run
from experiments.report import cost_by_method, read_cost

PY = sys.executable


def test_measure_reads_cpu_time_and_peak_rss_of_the_child():
    floor = mc.rss_floor_mb()           # exec keeps the spawning process's high-water mark: nothing reads below it
    small = mc.measure([PY, "-c", "bytearray(50_000_000)"])
    assert small.returncode == 0 and small.peak_rss_mb >= 50e6 / 2**20 and small.wall_s > 0 and small.cpu_s > 0
    big = mc.measure([PY, "-c", f"bytearray({int((floor + 200) * 2**20)})"])
    assert big.peak_rss_mb >= floor + 200                  # the child's own pages, above the floor
    busy = mc.measure([PY, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"])
    assert busy.cpu_s >= 0.3 and busy.wall_s >= busy.cpu_s * 0.5


def test_measure_reports_failures_and_kills_at_the_timeout(tmp_path):
    log = tmp_path / "out.log"
    failed = mc.measure([PY, "-c", "print('to the log'); raise SystemExit(3)"], log=log)
    assert failed.returncode == 3 and "to the log" in log.read_text()
    killed = mc.measure([PY, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert killed.returncode == -9 and killed.wall_s < 20


def test_maxrss_units_and_the_command():
    assert mc.maxrss_mb(2048, "linux") == 2.0 and mc.maxrss_mb(2 * 2**20, "darwin") == 2.0
    methods = mc.default_methods()
    assert methods[0] == "dpo" and {"confpo", "tgdpo", "sepo", "otpo", "critical_tokens"} <= set(methods)
    assert mc.anchor_first(["otpo", "dpo", "otpo", "sepo"]) == ["dpo", "otpo", "sepo"]
    assert mc.anchor_first(["otpo"]) == ["dpo", "otpo"]
    command = mc.run_command("otpo", Path("/tmp/x"), 0, ["train.max_steps=20"])
    assert command[1:] == ["run.py", "method=otpo", "seed=0", "logger=none", "trainer.enable_progress_bar=false",
                           "hydra.run.dir=/tmp/x", "train.max_steps=20"]


def test_summary_takes_medians_of_successful_runs_and_ratios_to_dpo():
    rows = [{"method": "dpo", "label": "DPO", "status": "ok", "wall_s": w, "cpu_s": 2 * w, "peak_rss_mb": 100.0,
             "train_s": 1.0} for w in (10.0, 12.0, 30.0)]
    rows += [{"method": "otpo", "label": "OTPO", "status": "ok", "wall_s": 25.0, "cpu_s": 44.0, "peak_rss_mb": 150.0,
              "train_s": 4.0},
             {"method": "otpo", "label": "", "status": "failed (exit 1)", "wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mb": 1.0},
             {"method": "sepo", "label": "", "status": "failed (exit 1)", "wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mb": 1.0}]
    table = mc.summarise(rows).set_index("method")
    assert list(table.index) == ["dpo", "otpo", "sepo"] and list(table.columns) == mc.COLUMNS[1:]
    assert table.loc["dpo", "wall_s"] == 12.0 and table.loc["dpo", "runs"] == 3      # the median of 10, 12, 30
    assert table.loc["otpo", ["wall_ratio", "cpu_ratio", "peak_rss_ratio", "train_ratio"]].tolist() == \
        pytest.approx([25 / 12, 44 / 24, 1.5, 4.0])
    assert table.loc["otpo", "label"] == "OTPO" and table.loc["otpo", "runs"] == 1
    assert table.loc["sepo", "status"] == "failed (exit 1)" and math.isnan(table.loc["sepo", "wall_ratio"])
    markdown = mc.markdown(table.reset_index())
    assert "| otpo | OTPO | 1 | ok | 25.0 | 44.0 | 150 |" in markdown and "| - | - |" in markdown


FAKE_RUN = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    cache = Path(os.environ["TISDPO_CACHE"])
    assert not cache.exists(), "a fresh cache per run"
    method = sys.argv[1].split("=", 1)[1]
    run_dir = Path(next(a for a in sys.argv if a.startswith("hydra.run.dir=")).split("=", 1)[1])
    run_dir.mkdir(parents=True)
    data = bytearray((60 if method == "otpo" else 20) * 2**20)
    (run_dir / "results.json").write_text(json.dumps({"time/train_s": 2.0 if method == "otpo" else 1.0,
                                                      "config": {"label": method.upper()}}))
""")


def test_main_runs_each_method_in_its_own_process_and_the_report_reads_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(mc, "run_command", lambda method, run_dir, seed=0, extra=(): [PY, "-c", FAKE_RUN,
                        f"method={method}", f"hydra.run.dir={run_dir}", *extra])
    out = tmp_path / "cost" / "method_cost.csv"
    table = mc.main(["--methods", "otpo", "--out", str(out), "--workdir", str(tmp_path), "--repeat", "2"])
    assert list(table["method"]) == ["dpo", "otpo"] and list(table["runs"]) == [2, 2]
    assert list(table["label"]) == ["DPO", "OTPO"] and table["train_ratio"].tolist() == [1.0, 2.0]
    assert "the cost includes the SFT stage" in out.with_suffix(".md").read_text()
    assert not any(tmp_path.glob("method_cost_*/*"))                # successful runs leave nothing behind

    cost = read_cost(out)
    runs = [Run("a", "ok", config={"label": "DPO"}, overrides={"method": "dpo"}),
            Run("b", "ok", config={"label": "OT"}, overrides={"method": "otpo"})]     # a label the file lacks
    merged = cost_by_method(cost, runs, {id(runs[0]): "DPO", id(runs[1]): "OT"}).set_index("method")
    assert merged.loc["DPO", "wall_ratio"] == 1.0
    assert merged.loc["OT", "train_ratio"] == 2.0                    # matched by its method= name
    assert merged.loc["OT", "cpu_ratio"] == pytest.approx(table.loc[1, "cpu_ratio"])
