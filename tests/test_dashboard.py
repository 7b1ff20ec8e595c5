"""The W&B report per paper table: offline it is a spec file (never the network); the W&B reader's filter."""
from __future__ import annotations

import json
import sys

import pytest

from experiments import dashboard
from experiments.collect import collect_runs, wandb_filters
from experiments.report import build_report, main
from experiments.paper import load_paper_table
from tests.test_frontier import write_sweep

wr = pytest.importorskip("wandb_workspaces.reports.v2")


@pytest.fixture()
def no_network(monkeypatch):
    """Offline, no key, and any W&B API object or report save fails the test."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(wandb, "Api", refuse)
    monkeypatch.setattr(wr.Report, "save", refuse)


def add_training_metrics(sweep):
    for results in sweep.glob("*/results.json"):
        data = json.loads(results.read_text())
        data.update({"train/loss": 0.5, "val/rewards/accuracies": 0.8, "train/kl_penalty": 0.1,
                     "weights/spearman_chosen": 0.6})
        results.write_text(json.dumps(data))


def test_offline_dashboard_is_a_spec_file_with_the_panels_and_filter(tmp_path, no_network, capsys):
    sweep = write_sweep(tmp_path / "sweep")
    add_training_metrics(sweep)
    out = tmp_path / "report"
    assert main([str(sweep), "--table", "tisdpo_pku_main", "--out", str(out), "--resamples", "200",
                 "--wandb", "--wandb-group", "tisdpo_pku_main-20260101"]) == 0
    assert f"W&B report {out / 'wandb_report.json'}" in capsys.readouterr().out
    spec = json.loads((out / "wandb_report.json").read_text())

    assert spec["title"] == load_paper_table("tisdpo_pku_main").title and spec["project"] == "tisdpo"
    assert spec["mode"].startswith("offline")
    assert spec["run_filter"]["expression"] == ("Metric('Group') == 'tisdpo_pku_main-20260101' and "
                                                "Config('paper_table') == 'tisdpo_pku_main' and Config('scale') == 'tiny'")
    assert spec["run_filter"]["api_filters"] == {"group": "tisdpo_pku_main-20260101",
                                                 "config.paper_table": "tisdpo_pku_main", "config.scale": "tiny"}
    assert spec["grouping"] == ["config.label"]

    panels = {(p["section"], p["title"]): p for p in spec["panels"]}
    frontier = panels[("Matched-KL comparison (headline)", "true reward vs KL (during training)")]
    assert frontier["keys"] == ["eval/true_reward", "eval/kl_ref"] and frontier["groupby"] == "config.label"
    assert panels[("Matched-KL comparison (headline)", "final safe rate vs KL")]["type"] == "ScatterPlot"
    curves = {p["title"] for p in spec["panels"] if p["section"] == "Training curves by method"}
    assert {"train/loss", "val/rewards/accuracies", "train/kl_penalty"} <= curves
    assert all(p["groupby"] == "config.label" for p in spec["panels"] if p["section"] == "Training curves by method")
    media = [p["keys"] for p in spec["panels"] if p["type"] == "MediaBrowser"]
    assert media == [["weights/token_view"], ["weights/histogram"]]
    assert panels[("Token weights", "weights/spearman_chosen")]["type"] == "BarPlot"

    # every run set carries the filter; the table is in the paper's layout with the paper's numbers
    runsets = [rs for b in spec["blocks"] if b["type"] == "PanelGrid" for rs in b["runsets"]]
    assert len(runsets) == 3 and {rs["filters"] for rs in runsets} == {spec["run_filter"]["expression"]}
    markdown = "\n".join(b.get("text", "") for b in spec["blocks"] if b["type"] == "MarkdownBlock")
    assert "Llama-Guard ↑ (%) (paper, ref.)" in markdown and "| 96.7 |" in markdown
    assert "paired): **better**" in markdown                               # the matched-KL verdicts
    for figure in spec["figures"]:
        assert figure.endswith(".png") and (out / "plots" / figure.split("/")[-1]).is_file()
    assert any(f.endswith("frontier_true_reward.png") for f in spec["figures"])


def test_offline_dashboard_without_plots_still_writes_the_frontier_figures(tmp_path, no_network):
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--no-plots", "--wandb", "--resamples", "100"]) == 0
    spec = json.loads((out / "wandb_report.json").read_text())
    # the table comes from the runs' `paper_table`; no group is known
    assert spec["run_filter"]["expression"] == "Config('paper_table') == 'tisdpo_pku_main' and Config('scale') == 'tiny'"
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["frontier_safe_rate.png", "frontier_true_reward.png"]


def test_online_saves_the_same_report_object(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.example/report"), raising=False)
    sweep = write_sweep(tmp_path / "sweep")
    report = build_report(str(sweep), collect_runs(sweep), load_paper_table("tisdpo_pku_main"), n_resamples=100)
    url = dashboard.write_dashboard(report, tmp_path / "out", entity="team", group="g", plots=False, online=True)
    assert url == "https://wandb.example/report" and len(saved) == 1
    assert saved[0].entity == "team" and saved[0].blocks[0].text == "Matched-KL comparison (headline)"
    assert (tmp_path / "out" / "wandb_report.json").is_file()
    with pytest.raises(dashboard.DashboardError, match="no W&B entity"):
        dashboard.write_dashboard(report, tmp_path / "out2", plots=False, online=True)


def test_online_only_with_a_key_and_a_networked_mode():
    assert not dashboard.wandb_online({})
    assert not dashboard.wandb_online({"WANDB_API_KEY": "k", "WANDB_MODE": "offline"})
    assert not dashboard.wandb_online({"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"})
    assert not dashboard.wandb_online({"WANDB_MODE": "online"})
    assert dashboard.wandb_online({"WANDB_API_KEY": "k"})


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch, no_network, capsys):
    for name in [m for m in sys.modules if m.startswith("wandb_workspaces")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    sweep = write_sweep(tmp_path / "sweep")
    assert main([str(sweep), "--out", str(tmp_path / "out"), "--no-plots", "--wandb", "--resamples", "100"]) == 2
    assert "pip install -e '.[wandb]'" in capsys.readouterr().err


# ---------------------------------------------------------------- the W&B reader

class FakeSummary:
    def __init__(self, data):
        self._json_dict = data


class FakeRun:
    def __init__(self, run_id, group, config, summary, history=None):
        self.id, self.name, self.state, self.group = run_id, f"name-{run_id}", "finished", group
        self.config, self.summary, self._history = config, FakeSummary(summary), history

    def history(self, keys=None, pandas=True):
        assert not pandas and "eval/kl_ref" in keys
        return self._history or []


def fake_api(monkeypatch, runs):
    import wandb

    calls = []

    class FakeApi:
        def runs(self, path, filters=None):
            calls.append((path, filters))
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    return calls


def test_reader_filters_by_group_table_and_scale(monkeypatch):
    config = {"label": "DPO", "seed": 0, "paper_table": "tisdpo_pku_main", "scale": "tiny"}
    history = [{"_step": 50, "eval/kl_ref": 1.0, "eval/true_reward": 2.0, "eval/safe_rate": 0.8},
               {"_step": 60, "train/loss": 0.3}]
    runs = [FakeRun("a", "sweep-1", config, {"eval/kl_ref": 2.0, "eval/true_reward": 3.0}, history),
            FakeRun("b", "sweep-2", config, {"eval/kl_ref": 2.0}),                      # another sweep
            FakeRun("c", "sweep-1", {**config, "scale": "paper"}, {"eval/kl_ref": 9.0}),   # another scale
            FakeRun("d", "sweep-1", {**config, "paper_table": "tidpo_main"}, {})]          # another table
    calls = fake_api(monkeypatch, runs)
    found = collect_runs("wandb:team/tisdpo/sweep-1", table="tisdpo_pku_main", scale="tiny")
    assert calls == [("team/tisdpo", {"group": "sweep-1", "config.paper_table": "tisdpo_pku_main",
                                      "config.scale": "tiny"})]
    # the server filters; what a lax server (or this fake) lets through is dropped here as well
    assert [r.run_id for r in found] == ["a (name-a)"]
    assert found[0].curve == [{"step": 50.0, "kl_ref": 1.0, "true_reward": 2.0, "safe_rate": 0.8}]

    calls.clear()
    collect_runs("wandb:team/tisdpo", group="sweep-1")
    assert calls == [("team/tisdpo", {"group": "sweep-1"})]
    with pytest.raises(ValueError, match="two W&B groups"):
        collect_runs("wandb:team/tisdpo/sweep-1", group="sweep-2")
    assert wandb_filters() == {}


def test_report_cli_passes_the_filters_to_the_reader(monkeypatch, tmp_path):
    config = {"label": "DPO", "seed": 0, "paper_table": "tisdpo_pku_main", "scale": "tiny", "loss": {"name": "dpo"}}
    calls = fake_api(monkeypatch, [FakeRun("a", "g", config, {"eval/safe_rate": 0.9})])
    assert main(["wandb:team/tisdpo", "--wandb-group", "g", "--table", "tisdpo_pku_main", "--scale", "tiny",
                 "--out", str(tmp_path), "--no-plots"]) == 0
    assert calls == [("team/tisdpo", {"group": "g", "config.paper_table": "tisdpo_pku_main", "config.scale": "tiny"})]
