"""Paper tables as data, run collection, the report CLI and its plots, on a fake multirun dir."""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments.collect import Stat, canonical_metric_key, collect_runs, group_methods, parse_overrides
from experiments.paper import list_paper_tables, load_paper_table
from experiments.report import build_report, evaluate_ordering, main

PAPER_TABLES = ["tidpo_ablation", "tidpo_label_noise", "tidpo_main", "tisdpo_ablation", "tisdpo_llm_generated",
                "tisdpo_pku_main", "tisdpo_tldr", "tisdpo_ultrafeedback"]

# per method: overrides and per-seed metrics (fractions where the paper shows %)
METHODS = {
    "dpo": {"overrides": ["loss=dpo"], "config": {"loss": {"name": "dpo"}, "estimator": {"name": "none"}},
            "eval/safe_rate": [0.70, 0.72, 0.74], "eval/harm": [5.0, 6.0, 7.0], "eval/help": [7.9, 8.0, 8.1],
            "eval/mt_bench": [4.4, 4.5, 4.6], "eval/win_rate@T0.5": [0.5, 0.5, 0.5],
            "eval/win_rate@T1.0": [0.5, 0.45, 0.55]},
    "tis_s": {"overrides": ["loss=tisdpo", "estimator=sft_pair"],
              "config": {"loss": {"name": "tisdpo"}, "estimator": {"name": "sft_pair"}},
              "eval/safe_rate": [0.80, 0.82, 0.84], "eval/harm": [3.0, 3.5, 4.0], "eval/help": [7.5, 7.6, 7.7],
              "eval/win_rate_vs_dpo": [0.60, 0.62, 0.64], "eval/win_rate@T0.5": [0.6, 0.62, 0.64],
              "eval/win_rate@T1.0": [0.55, 0.6, 0.65]},
    "tis_d": {"overrides": ["loss=tisdpo", "estimator=dpo_pair"],
              "config": {"loss": {"name": "tisdpo"}, "estimator": {"name": "dpo_pair"}},
              "eval/safe_rate": [0.90, 0.95, 1.00], "eval/harm": [0.1, 0.2, 0.3], "eval/help": [8.0, 8.0, 8.0],
              "eval/mt_bench": [4.3, 4.3, 4.3], "eval/win_rate_vs_dpo": [0.80, 0.78, 0.82],
              "eval/win_rate@T0.5": [0.7, 0.72, 0.74], "eval/win_rate@T1.0": [0.65, 0.7, 0.75]},
}


def write_job(job: Path, overrides: list[str], results: dict | None) -> Path:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


def make_multirun(root: Path, scale: str = "tiny") -> Path:
    sweep = root / "multiruns" / "2025-01-01" / "12-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for name, spec in METHODS.items():
        for seed in range(3):
            metrics = {k: v[seed] for k, v in spec.items() if k.startswith("eval/")}
            config = {**spec["config"], "label": spec["config"]["loss"]["name"], "seed": seed, "scale": scale}
            results = {**metrics, "val/rewards/accuracies": 0.5 + 0.1 * seed, "note": "text is ignored",
                       "config": config}
            write_job(sweep / f"{num}_{name}_s{seed}", [*spec["overrides"], f"seed={seed}"], results)
            num += 1
    failed = write_job(sweep / f"{num}_kto_s0", ["loss=kto", "seed=0"], None)
    (failed / "failed.json").write_text(json.dumps({"type": "RuntimeError", "message": "CUDA out of memory"}))
    return sweep


def add_training_artifacts(sweep: Path) -> None:
    job = sweep / "6_tis_d_s0"
    (job / "csv").mkdir()
    pd.DataFrame({"step": [0, 1, 2, 2, 3], "epoch": [0] * 5, "train/loss": [0.69, 0.6, 0.5, None, 0.4],
                  "val/rewards/accuracies": [None, None, None, 0.7, None]}).to_csv(job / "csv" / "metrics.csv", index=False)
    rng = np.random.default_rng(0)
    np.savez(job / "weights.npz", chosen_weights=rng.uniform(0.7, 1.3, (4, 5)),
             rejected_weights=rng.uniform(0.7, 1.3, (4, 5)), chosen_mask=np.ones((4, 5)))
    torch = pytest.importorskip("torch")
    torch.save({"chosen_weights": [torch.ones(3), torch.full((2,), 1.2)], "rejected_weights": torch.ones(4)},
               sweep / "3_tis_s_s0" / "weights.pt")


@pytest.fixture()
def sweep(tmp_path) -> Path:
    return make_multirun(tmp_path)


def expected(method: str, key: str, scale: float = 1.0) -> tuple[float, float]:
    values = [v * scale for v in METHODS[method][key]]
    return statistics.fmean(values), statistics.stdev(values)


# ---------------------------------------------------------------- paper tables

def test_every_paper_table_loads_and_its_orderings_hold_on_the_paper_numbers():
    assert list_paper_tables() == PAPER_TABLES
    for name in PAPER_TABLES:
        table = load_paper_table(name)
        assert table.citation["arxiv"] in ("2410.04350", "2505.19653")
        assert table.metrics and table.rows and table.orderings
        assert all(m.key.startswith(("eval/", "bench/")) and m.direction in ("up", "down") for m in table.metrics)
        for ordering in table.orderings:
            result = evaluate_ordering(ordering, table, [])
            if table.figure_only:
                assert result.paper_holds is None
            else:
                assert result.paper_holds is True, (name, ordering)


def test_paper_numbers_are_recorded_as_printed():
    main_table = load_paper_table("tisdpo_pku_main")
    assert main_table.row("TIS-DPO(D)").values == {"Llama-Guard": 96.7, "Harm": 0.1, "Help": 8.0, "MT": 4.3, "Win": 79.3}
    assert main_table.row("DPO").values["Win"] is None
    assert main_table.metric("Llama-Guard").key == "eval/safe_rate"
    assert main_table.metric("Harm").direction == "down" and main_table.metric("Win").ours_scale == 100
    assert load_paper_table("tisdpo_ablation").row("random weight").values["LG"] == 21.0
    assert load_paper_table("tidpo_main").row("TIS-DPO").values == {"Avg": 61.1}
    noise = load_paper_table("tidpo_label_noise")
    assert noise.metric("40%").where == {"dataset.label_noise": 0.4}
    assert noise.row("TI-DPO").values["40%"] == 68.3
    assert load_paper_table("tisdpo_tldr").figure_only


def test_unknown_paper_table_names_the_known_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="tisdpo_pku_main"):
        load_paper_table("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"metrics": [{"name": "X", "key": "eval/x"}],
                                   "rows": [{"method": "A", "values": {"Y": 1}}]}))
    with pytest.raises(ValueError, match=r"bad.yaml.*unknown metrics \['Y'\]"):
        load_paper_table(bad)


# ---------------------------------------------------------------- collection

def test_collect_groups_seeds_and_records_the_failure(sweep):
    runs = collect_runs(sweep)
    assert len(runs) == 10
    failed = [r for r in runs if not r.ok]
    assert [r.run_id for r in failed] == ["9_kto_s0"] and "CUDA out of memory" in failed[0].error
    methods = group_methods(runs)
    assert [m.label for m in methods] == ["dpo", "tisdpo [estimator=sft_pair]", "tisdpo [estimator=dpo_pair]"]
    assert [sorted(r.seed for r in m.runs) for m in methods] == [[0, 1, 2]] * 3
    assert "note" not in runs[0].metrics and runs[0].metrics["val/rewards/accuracies"] == 0.5


def test_job_without_results_is_a_failure_with_the_log_error(tmp_path):
    job = write_job(tmp_path / "0", ["loss=dpo"], None)
    (job / "run.log").write_text("[INFO] start\nValueError: dataset.path='x' does not exist\n")
    (run,) = collect_runs(tmp_path)
    assert run.status == "failed"
    assert "no results.json" in run.error and "dataset.path='x' does not exist" in run.error


def test_overrides_and_keys_are_normalised():
    assert parse_overrides(["+experiment=pku/main", "++loss.beta=0.2", "~logger", "seed=1"]) == \
        {"experiment": "pku/main", "loss.beta": "0.2", "logger": "<deleted>", "seed": "1"}
    assert canonical_metric_key("eval/win_rate@T1.0") == canonical_metric_key("eval/win_rate@T1") == "eval/win_rate@T1"
    assert canonical_metric_key("eval/win_rate@T0.50") == "eval/win_rate@T0.5"
    assert Stat.of([1.0]).n == 1 and math.isnan(Stat.of([1.0]).std) and Stat.of([]) is None


def test_explicit_labels_and_results_method_label(tmp_path):
    write_job(tmp_path / "a", ["loss=tisdpo", "seed=0"], {"eval/x": 1.0, "config": {"experiment": {"label": "TIS-DPO(D)"}}})
    write_job(tmp_path / "b", ["loss=ipo", "seed=0"], {"eval/x": 2.0, "method_label": "IPO", "config": {}})
    write_job(tmp_path / "c", ["loss=kto", "seed=0"], {"eval/x": 3.0, "config": {"label": "${loss.name}"}})
    assert [m.label for m in group_methods(collect_runs(tmp_path))] == ["TIS-DPO(D)", "IPO", "loss=kto"]


class FakeSummary:
    def __init__(self, data):
        self._json_dict = data


class FakeWandbRun:
    def __init__(self, run_id, state, config, summary):
        self.id, self.name, self.state, self.config, self.summary = run_id, f"name-{run_id}", state, config, FakeSummary(summary)


def test_wandb_source_uses_the_api_and_only_then(monkeypatch, sweep):
    wandb = pytest.importorskip("wandb")
    calls = []

    class FakeApi:
        def __init__(self, *args, **kwargs):
            calls.append("init")

        def runs(self, path, filters=None):
            calls.append(path)
            assert filters is None       # no group, table or scale given: the whole project
            return [FakeWandbRun("r1", "finished", {"label": "dpo", "seed": 0, "_wandb": {}},
                                 {"eval/safe_rate": 0.7, "_step": 10, "_runtime": 3.0, "text": "x"}),
                    FakeWandbRun("r2", "finished", {"label": "dpo", "seed": 1}, {"eval/safe_rate": 0.8}),
                    FakeWandbRun("r3", "crashed", {"label": "kto", "seed": 0}, {})]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    runs = collect_runs("wandb:my-team/tisdpo")
    assert calls == ["init", "my-team/tisdpo"]
    assert [r.status for r in runs] == ["ok", "ok", "failed"] and "crashed" in runs[2].error
    assert runs[0].metrics == {"eval/safe_rate": 0.7} and "_wandb" not in runs[0].config
    (method,) = group_methods(runs)
    assert method.label == "dpo" and len(method.runs) == 2
    calls.clear()
    collect_runs(sweep)  # a directory never touches W&B
    assert calls == []
    with pytest.raises(ValueError, match="wandb:<entity>/<project>"):
        collect_runs("wandb:just-a-project")


# ---------------------------------------------------------------- the report CLI

def test_report_cli_writes_the_paper_layout_with_exact_numbers(sweep, tmp_path):
    add_training_artifacts(sweep)
    out = tmp_path / "report"
    assert main([str(sweep), "--table", "tisdpo_pku_main", "--out", str(out)]) == 0

    table = pd.read_csv(out / "table.csv").set_index("method")
    assert list(table.index) == ["DPO", "PPO", "IPO", "TDPO", "KTO", "TIS-DPO(P)", "TIS-DPO(S)", "TIS-DPO(D)"]
    for row, method in (("DPO", "dpo"), ("TIS-DPO(S)", "tis_s"), ("TIS-DPO(D)", "tis_d")):
        for name, key, scale in (("Llama-Guard", "eval/safe_rate", 100), ("Harm", "eval/harm", 1),
                                 ("Help", "eval/help", 1)):
            mean, std = expected(method, key, scale)
            assert table.loc[row, f"{name} mean"] == pytest.approx(mean, abs=1e-9)
            assert table.loc[row, f"{name} std"] == pytest.approx(std, abs=1e-9)
            assert table.loc[row, f"{name} n"] == 3
        assert table.loc[row, "runs"] == 3
    assert table.loc["TIS-DPO(D)", "Win mean"] == pytest.approx(80.0) and table.loc["TIS-DPO(D)", "Win std"] == pytest.approx(2.0)
    assert table.loc["TIS-DPO(S)", "MT n"] == 0 and math.isnan(table.loc["TIS-DPO(S)", "MT mean"])
    assert table.loc["TIS-DPO(D)", "Llama-Guard paper"] == 96.7 and table.loc["KTO", "runs"] == 0

    markdown = (out / "table.md").read_text()
    assert "| TIS-DPO(D) | 3 | 95.00 ± 5.00 | 0.20 ± 0.10 | 8.00 ± 0.00 | 4.30 ± 0.00 | 80.00 ± 2.00 |" in markdown
    assert "Llama-Guard ↑ (%) (paper, ref.)" in markdown and "| 96.7 |" in markdown
    assert "95.00 $\\pm$ 5.00" in (out / "table.tex").read_text()
    assert "\\begin{tabular}" in (out / "table.tex").read_text()

    orderings = pd.read_csv(out / "orderings.csv")
    assert list(orderings["ours"]) == ["reproduced", "reproduced", "reproduced", "reproduced", "reproduced",
                                       "not reproduced"]
    assert (orderings["paper holds"] == "yes").all()
    assert "✗ DPO 4.5" in orderings["detail"].iloc[-1]

    report = (out / "report.md").read_text()
    assert "5 reproduced (5 with every link more than 2 standard errors apart), 1 not reproduced" in report
    # weakest link = gap / sqrt(sd_a^2/n_a + sd_b^2/n_b): LG D vs S (95-82)/sqrt(25/3+4/3) = 4.18;
    # Harm S vs DPO (6-3.5)/sqrt(.25/3+1/3) = 3.87; MT D vs DPO (4.3-4.5)/sqrt(0+.01/3) = -3.46
    assert list(orderings["weakest link"].iloc[[0, 2, 5]]) == [
        "TIS-DPO(D) vs TIS-DPO(S): +4.2 SE", "TIS-DPO(S) vs DPO: +3.9 SE", "TIS-DPO(D) vs DPO: -3.5 SE"]
    assert "9_kto_s0" in report and "RuntimeError: CUDA out of memory" in report
    assert "for reference, not comparison" in report

    plots = out / "plots"
    for png in ("win_rate_vs_temperature.png", "curve_train_loss.png", "curve_val_rewards_accuracies.png",
                "weights_TIS-DPO_D_s0.png"):
        assert (plots / png).stat().st_size > 1000, png
    assert (plots / "weights_TIS-DPO_S_s0.png").is_file()


def test_report_with_paper_scale_puts_the_paper_beside_ours(tmp_path):
    sweep = make_multirun(tmp_path / "runs", scale="paper")
    out = tmp_path / "out"
    assert main([str(sweep), "--table", "tisdpo_pku_main", "--out", str(out), "--no-plots"]) == 0
    header = (out / "table.md").read_text().splitlines()[0]
    assert "| Llama-Guard ↑ (%) ours | Llama-Guard ↑ (%) paper | Harm ↓ ours | Harm ↓ paper |" in header
    assert not (out / "plots").exists()


def test_report_without_a_table_lists_every_metric(sweep, capsys):
    assert main([str(sweep), "--no-plots"]) == 0
    assert "report in" in capsys.readouterr().out
    table = pd.read_csv(sweep / "report" / "table.csv").set_index("method")
    mean, std = expected("tis_d", "eval/safe_rate")
    assert table.loc["tisdpo [estimator=dpo_pair]", "eval/safe_rate mean"] == pytest.approx(mean)
    assert table.loc["dpo", "val/rewards/accuracies mean"] == pytest.approx(0.6)
    assert table.loc["dpo", "eval/win_rate@T1 std"] == pytest.approx(0.05)
    assert "## Orderings" not in (sweep / "report" / "report.md").read_text()


def test_orderings_are_not_evaluated_without_the_methods(sweep, tmp_path):
    assert main([str(sweep), "--table", "tisdpo_ablation", "--out", str(tmp_path), "--no-plots"]) == 0
    orderings = pd.read_csv(tmp_path / "orderings.csv")
    assert set(orderings["ours"]) == {"not evaluated"}
    assert "w/o η (no result)" in orderings["detail"].iloc[0]


def test_label_noise_columns_come_from_where_settings(tmp_path):
    for method, acc in (("dpo", {0.0: [0.70, 0.72], 0.4: [0.60, 0.62]}), ("tidpo", {0.0: [0.73, 0.75], 0.4: [0.68, 0.70]})):
        for noise, values in acc.items():
            for seed, value in enumerate(values):
                write_job(tmp_path / f"{method}_{noise}_{seed}",
                          [f"loss={method}", f"dataset.label_noise={noise}", f"seed={seed}"],
                          {"bench/gsm8k/exact_match": value, "config": {"label": method}})
    report = build_report(str(tmp_path), collect_runs(tmp_path), load_paper_table("tidpo_label_noise"))
    rows = {r.label: r for r in report.rows}
    assert set(rows) == {"DPO", "TPO", "TI-DPO"}
    assert rows["TI-DPO"].ours["0%"].mean == pytest.approx(74.0) and rows["TI-DPO"].ours["0%"].n == 2
    assert rows["DPO"].ours["40%"].mean == pytest.approx(61.0) and rows["DPO"].ours["10%"] is None
    status = [(o.ordering.metric, o.ordering.chain, o.status) for o in report.orderings]
    assert ("0%", ("TI-DPO", "DPO"), "reproduced") in status and ("40%", ("TI-DPO", "DPO"), "reproduced") in status
    assert ("10%", ("TI-DPO", "DPO"), "not evaluated") in status
    drop = next(o for o in report.orderings if o.ordering.drop_from == "0%" and o.ordering.chain == ("TI-DPO", "DPO"))
    # DPO loses 71 -> 61 = 10 points, TI-DPO 74 -> 69 = 5: TI-DPO degrades less
    assert (drop.status, drop.paper_holds) == ("reproduced", True)
    assert drop.detail == "TI-DPO 5 ✓ DPO 10" and drop.ordering.describe(drop.metric) == "drop 0%→40% ↓: TI-DPO < DPO"


def test_a_drop_ordering_fails_when_the_method_loses_more(tmp_path):
    for method, (clean, noisy) in (("dpo", (0.70, 0.65)), ("tidpo", (0.90, 0.70))):
        for noise, value in ((0.0, clean), (0.4, noisy)):
            write_job(tmp_path / f"{method}_{noise}", [f"loss={method}", f"dataset.label_noise={noise}", "seed=0"],
                      {"bench/gsm8k/exact_match": value, "config": {"label": method}})
    report = build_report(str(tmp_path), collect_runs(tmp_path), load_paper_table("tidpo_label_noise"))
    results = {(o.ordering.drop_from, o.ordering.metric, o.ordering.chain): o.status for o in report.orderings}
    assert results[("0%", "40%", ("TI-DPO", "DPO"))] == "not reproduced"     # ahead at 0% and 40%, but lost more
    assert results[(None, "40%", ("TI-DPO", "DPO"))] == "reproduced"


def test_a_malformed_drop_ordering_is_refused(tmp_path):
    table = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments/paper_tables/tidpo_label_noise.yaml").read_text())
    table["orderings"].append({"drop": ["0%", "90%"], "chain": ["TI-DPO", "DPO"]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(table))
    with pytest.raises(ValueError, match="unknown metric '90%'"):
        load_paper_table(path)


def test_more_specific_paper_rows_win(tmp_path):
    write_job(tmp_path / "a", ["loss=tisdpo", "estimator=dpo_pair", "loss.use_eta=false", "seed=0"],
              {"eval/safe_rate": 0.9, "config": {"label": "tisdpo"}})
    write_job(tmp_path / "b", ["loss=tisdpo", "estimator=dpo_pair", "seed=0"],
              {"eval/safe_rate": 0.95, "config": {"label": "tisdpo", "loss": {"name": "tisdpo", "use_eta": True}}})
    report = build_report(str(tmp_path), collect_runs(tmp_path), load_paper_table("tisdpo_ablation"))
    by_row = {r.paper_method: r.ours["LG"].mean for r in report.rows if r.method}
    assert by_row == {"TIS-DPO(D)": pytest.approx(95.0), "w/o η": pytest.approx(90.0)}


def write_builtin_task_runs(root: Path, scale: str) -> Path:
    """Runs that logged only the built-in task's metrics (no MT-Bench, no reward-model judges)."""
    builtin = {"dpo": (["loss=dpo"], {"eval/true_reward": [9.0, 10.0], "eval/win_rate": [0.90, 0.92],
                                      "eval/harmful_rate": [0.010, 0.012], "eval/helpfulness": [6.0, 6.0]}),
               "tis_d": (["loss=tisdpo", "estimator=dpo_pair"],
                         {"eval/true_reward": [11.0, 12.0], "eval/win_rate": [0.96, 0.98],
                          "eval/harmful_rate": [0.004, 0.006], "eval/helpfulness": [7.0, 7.0]})}
    for name, (overrides, metrics) in builtin.items():
        for seed in range(2):
            write_job(root / f"{name}_{seed}", [*overrides, f"seed={seed}"],
                      {**{k: v[seed] for k, v in metrics.items()}, "eval/safe_rate": 0.9,
                       "config": {"label": name, "scale": scale}})
    return root


def test_below_paper_scale_unlogged_metrics_read_their_built_in_stand_ins(tmp_path):
    runs = write_builtin_task_runs(tmp_path / "runs", scale="tiny")
    out = tmp_path / "out"
    assert main([str(runs), "--table", "tisdpo_pku_main", "--out", str(out), "--no-plots"]) == 0
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert table.loc["TIS-DPO(D)", "MT mean"] == pytest.approx(11.5)        # eval/true_reward
    assert table.loc["TIS-DPO(D)", "Win mean"] == pytest.approx(97.0)       # eval/win_rate x100
    assert table.loc["DPO", "Harm mean"] == pytest.approx(1.1)              # eval/harmful_rate in %
    assert table.loc["TIS-DPO(D)", "MT paper"] == 4.3                       # the paper's value, untouched
    header = (out / "table.md").read_text().splitlines()[0]
    assert "MT ↑ [true reward]" in header and "MT ↑ (paper, ref.)" in header
    orderings = pd.read_csv(out / "orderings.csv")
    mt = orderings[orderings["claim"] == "MT ↑: TIS-DPO(D) > DPO"].iloc[0]
    assert mt["ours"] == "reproduced" and "true reward (`eval/true_reward`)" in mt["measured by"]
    harm = orderings[orderings["claim"] == "Harm ↓: TIS-DPO(D) < TIS-DPO(S) < DPO"].iloc[0]
    assert harm["ours"] == "not evaluated"                                  # no TIS-DPO(S) runs
    assert (orderings[orderings["claim"].str.startswith("Llama-Guard")]["measured by"] == "the paper's metric").all()
    assert "Stand-ins: no run logged Harm, Help, MT, Win" in (out / "report.md").read_text()


def test_at_paper_scale_stand_ins_are_never_used(tmp_path):
    runs = write_builtin_task_runs(tmp_path / "runs", scale="paper")
    report = build_report(str(runs), collect_runs(runs), load_paper_table("tisdpo_pku_main"))
    assert not any(m.standing_in for m in report.metrics)
    assert {o.status for o in report.orderings if o.ordering.metric == "MT"} == {"not evaluated"}


def test_a_logged_paper_metric_wins_over_its_stand_in(tmp_path):
    runs = write_builtin_task_runs(tmp_path / "runs", scale="tiny")
    write_job(runs / "judged", ["loss=dpo", "seed=9"], {"eval/mt_bench": 4.0, "config": {"label": "dpo", "scale": "tiny"}})
    report = build_report(str(runs), collect_runs(runs), load_paper_table("tisdpo_pku_main"))
    metrics = {m.name: m for m in report.metrics}
    assert not metrics["MT"].standing_in and metrics["Win"].standing_in


def test_a_malformed_stand_in_names_the_metric(tmp_path):
    table = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments/paper_tables/tisdpo_ablation.yaml").read_text())
    table["metrics"][3]["stand_in"] = "eval/true_reward"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(table))
    with pytest.raises(ValueError, match="metric 'MT': stand_in must be a mapping"):
        load_paper_table(path)


def test_tidpo_ablation_rows_are_told_apart_by_their_settings(tmp_path):
    def config(label, lam=0.7, gamma=0.1, estimator="gradient"):
        return {"label": label, "loss": {"name": "tidpo", "triplet": {"gamma": gamma}},
                "estimator": {"name": estimator, "lam": lam}}

    for name, cfg in (("full", config("TI-DPO")), ("prior_only", config("prior only", lam=0.0)),
                      ("no_prior", config("w/o Gaussian prior", lam=1.0)),
                      ("no_triplet", config("w/o triplet loss", gamma=0.0)),
                      ("uniform", config("uniform weights", estimator="uniform"))):
        write_job(tmp_path / name, [f"method={name}", "seed=0"], {"eval/true_reward": 1.0, "config": cfg})
    report = build_report(str(tmp_path), collect_runs(tmp_path), load_paper_table("tidpo_ablation"))
    rows = {r.method.label: r.paper_method for r in report.rows if r.method}
    assert rows == {"TI-DPO": "full TI-DPO", "prior only": None, "w/o Gaussian prior": "w/o Gaussian prior",
                    "w/o triplet loss": "w/o triplet loss", "uniform weights": "uniform weights"}


def test_weakest_link_needs_a_spread_and_handles_exact_ties(tmp_path):
    def safe_rate_orderings(root, with_single_seed_method):
        methods = [("dpo", ["loss=dpo"], [0.5, 0.5]), ("tis_d", ["loss=tisdpo", "estimator=dpo_pair"], [0.5, 0.5])]
        if with_single_seed_method:
            methods.append(("tis_s", ["loss=tisdpo", "estimator=sft_pair"], [0.4]))
        for name, overrides, values in methods:
            for seed, value in enumerate(values):
                write_job(root / f"{name}_{seed}", [*overrides, f"seed={seed}"], {"eval/safe_rate": value, "config": {}})
        report = build_report(str(root), collect_runs(root), load_paper_table("tisdpo_pku_main"))
        return {(o.ordering.chain, o.ordering.best): o for o in report.orderings if o.ordering.metric == "Llama-Guard"}

    chain = safe_rate_orderings(tmp_path / "a", True)[(("TIS-DPO(D)", "TIS-DPO(S)", "DPO"), None)]
    assert chain.status == "not reproduced" and chain.weakest_link is None      # TIS-DPO(S) has one seed
    best = safe_rate_orderings(tmp_path / "b", False)[((), "TIS-DPO(D)")]
    assert best.status == "not reproduced" and best.weakest_link == ("TIS-DPO(D)", "DPO", 0.0)   # an exact tie


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "neither a directory" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no job dirs" in capsys.readouterr().err
    write_job(tmp_path / "0", ["loss=dpo"], {"eval/x": 1.0, "config": {}})
    assert main([str(tmp_path), "--table", "nope"]) == 2
    assert "--table" in capsys.readouterr().err


def test_module_runs_as_a_script(sweep):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "experiments.report", str(sweep), "--no-plots",
                             "--table", "tisdpo_pku_main"], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "orderings reproduced 5/6" in result.stdout


# ---------------------------------------------------------------- interrupted and missing jobs

def test_interrupted_and_missing_jobs_are_counted_apart_and_cells_show_seeds_of_launched(sweep, tmp_path):
    # seed 2 of TIS-DPO(D) was preempted: failed.json says interrupted, with its signal and checkpoint
    job = sweep / "8_tis_d_s2"
    (job / "results.json").unlink()
    (job / "failed.json").write_text(json.dumps({"type": "KeyboardInterrupt", "message": "", "interrupted": True,
                                                 "signal": "SIGTERM", "last_checkpoint": str(job / "checkpoints/last.ckpt")}))
    # the summary lists a TIS-DPO(S) seed whose dir is gone
    (sweep / "sweep_summary.json").write_text(json.dumps({"jobs": [
        {"num": 0, "dir": "0_dpo_s0", "overrides": ["loss=dpo", "seed=0"], "status": "ok"},
        {"num": 10, "dir": "10_tis_s_s3", "overrides": ["loss=tisdpo", "estimator=sft_pair", "seed=3"],
         "status": "failed", "error": "RuntimeError: boom"}]}))
    runs = collect_runs(sweep)
    status = {r.run_id: r.status for r in runs}
    assert status["8_tis_d_s2"] == "interrupted" and status["9_kto_s0"] == "failed" and status["10_tis_s_s3"] == "missing"
    interrupted = next(r for r in runs if r.status == "interrupted")
    assert interrupted.signal == "SIGTERM" and interrupted.last_checkpoint.endswith("checkpoints/last.ckpt")

    out = tmp_path / "report"
    assert main([str(sweep), "--table", "tisdpo_pku_main", "--out", str(out), "--no-plots"]) == 0
    report = (out / "report.md").read_text()
    assert "11 jobs (8 finished, 1 failed or unfinished, 1 interrupted, 1 missing)" in report
    failures = report.split("## Failed or unfinished jobs", 1)[1].split("## Methods", 1)[0]
    assert "1 interrupted by a signal" in failures and "1 missing" in failures
    assert "| 8_tis_d_s2 | interrupted |  | loss=tisdpo estimator=dpo_pair seed=2 | SIGTERM |" in failures
    assert "10_tis_s_s3 | missing" in failures and "RuntimeError: boom" in failures
    table = pd.read_csv(out / "table.csv").set_index("method")
    assert (table.loc["TIS-DPO(D)", "runs"], table.loc["TIS-DPO(D)", "launched"]) == (2, 3)
    assert (table.loc["TIS-DPO(S)", "runs"], table.loc["TIS-DPO(S)", "launched"]) == (3, 4)
    assert (table.loc["KTO", "runs"], table.loc["KTO", "launched"]) == (0, 1)       # only the failed job
    markdown = (out / "table.md").read_text()
    assert "| TIS-DPO(D) | 2/3 |" in markdown and "| TIS-DPO(S) | 3/4 |" in markdown and "| KTO | 0/1 |" in markdown
    assert "| DPO | 3 |" in markdown


def test_jobs_of_the_sweep_grid_that_never_started_are_missing(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"params": {"loss": "dpo,ipo", "seed": "0,1"}},
        "overrides": {"task": ["seed=range(0,3)", "logger=csv"]}}}))
    for num, (loss, seed) in enumerate((("dpo", 0), ("dpo", 1), ("dpo", 2), ("ipo", 0))):
        write_job(sweep / str(num), [f"loss={loss}", f"seed={seed}", "logger=csv"],
                  {"eval/x": 1.0, "config": {"label": loss}})
    runs = collect_runs(sweep)
    missing = sorted(r.run_id for r in runs if r.status == "missing")
    assert missing == ["(not started) loss=ipo seed=1 logger=csv", "(not started) loss=ipo seed=2 logger=csv"]
    report = build_report(str(sweep), runs, None)
    assert {r.label: (r.n_runs, r.launched) for r in report.rows} == {"dpo": (3, 3), "ipo": (1, 3)}


# ---------------------------------------------------------------- the ranking by share of the oracle's gain

# method config name: (label, gain over DPO at KL 1 in reward per token / safe rate / total reward (a multiple of
# KL, so every share is the same at every budget), per-seed weight quality (Spearman chosen), online weights?)
RANKED = {"dpo": ("DPO", (0.0, 0.0, 0.0), None, False),
          "tisdpo_oracle": ("TIS-DPO(oracle)", (0.02, 0.04, 2.0), [0.9, 0.8, 0.7], False),
          "tisdpo_d": ("TIS-DPO(D)", (0.01, 0.01, 1.0), [0.3, 0.4, 0.5], False),
          "otpo": ("OTPO", (0.015, 0.03, 0.5), [0.1, 0.2, 0.3], True),
          "confpo": ("ConfPO", (-0.005, 0.0, -0.5), None, False)}


def write_ranked_sweep(root: Path, methods: dict = RANKED) -> Path:
    """Straight-line curves through the reference at KL 0 (no interpolation error): DPO's reward =
    KL + a seed offset, each other method DPO's + its gain × KL; the runs carry the optimal frontier
    (F(k) = 4 k) and, for weighted methods, weight quality (offline ones also weights/bound_fraction)."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    offsets = [0.0, 0.2, -0.1]
    for name, (label, (per_token, safe, total), spearman, online) in methods.items():
        for seed, offset in enumerate(offsets):
            curve = [{"step": step, "kl_ref": step / 50, "true_reward": step / 50 * (1 + total) + offset,
                      "true_reward_per_token": step / 50 * (0.1 + per_token) + offset / 10,
                      "safe_rate": 0.5 + step / 50 * (0.05 + safe) + offset / 10, "length": 10.0, "finished_rate": 1.0}
                     for step in (0, 50, 100, 150, 200)]
            results = {"eval/kl_ref": 4.0, "eval/true_reward": curve[-1]["true_reward"], "eval/curve": curve,
                       "eval/optimal_frontier": [{"kl": k, "true_reward": 4.0 * k} for k in range(6)],
                       "config": {"label": label, "seed": seed}}
            if spearman is not None:
                results.update({"weights/spearman_chosen": spearman[seed], "weights/spearman_rejected": 0.1,
                                "weights/auroc_chosen": 0.6 + 0.1 * seed, "weights/auroc_rejected": float("nan")})
                if not online:
                    results["weights/bound_fraction"] = 0.0
            write_job(root / f"{name}_s{seed}", [f"method={name}", f"seed={seed}"], results)
    return root


def write_cost(path: Path, rows: list[tuple[str, str, float, float, float]]) -> Path:
    """bench/method_cost.py's CSV: (method, label, wall, CPU and peak RSS ratios)."""
    pd.DataFrame([{"method": m, "label": label, "wall_s": 10 * w, "cpu_s": 10 * c, "peak_rss_mb": 100 * r,
                   "wall_ratio": w, "cpu_ratio": c, "peak_rss_ratio": r} for m, label, w, c, r in rows]).to_csv(path, index=False)
    return path


def test_ranking_orders_methods_by_their_share_of_the_oracles_gain(tmp_path):
    sweep = write_ranked_sweep(tmp_path / "sweep")
    cost = write_cost(tmp_path / "cost.csv", [("dpo", "DPO", 1.0, 1.0, 1.0), ("tisdpo_d", "TIS-DPO(D)", 3.0, 3.5, 1.5),
                                             ("otpo", "", 2.0, 2.5, 1.25)])   # OTPO found by its method= name
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--no-plots", "--resamples", "500", "--budgets", "1,2,3",
                 "--cost", str(cost)]) == 0
    ranking = pd.read_csv(out / "ranking.csv")
    # per token: oracle +0.02, OTPO +0.015 (75%), TIS-DPO(D) +0.01 (50%), DPO 0, ConfPO -0.005 (-25%)
    assert list(ranking["method"]) == ["TIS-DPO(oracle)", "OTPO", "TIS-DPO(D)", "DPO", "ConfPO"]
    assert list(ranking["rank"]) == [1, 2, 3, 4, 5] and set(ranking["rank_budget"]) == {2.0}
    assert list(ranking["share"]) == pytest.approx([1.0, 0.75, 0.5, 0.0, -0.25])
    by = ranking.set_index("method")
    assert by.loc["OTPO", "safe_rate share KL 3"] == pytest.approx(0.75)         # 0.03 / 0.04
    assert by.loc["TIS-DPO(D)", "true_reward share KL 1"] == pytest.approx(0.5)   # 1 / 2
    # share of the optimal frontier in total reward at KL 2: (R(2) - R(0)) / (F(2) - F(0)) = 2 (1 + gain) / 8
    assert list(ranking["frontier_share"]) == pytest.approx([0.75, 0.375, 0.5, 0.25, 0.125])
    # weight quality: mean over seeds; NaN values left out; none for DPO and ConfPO; OTPO's are online
    assert by.loc["TIS-DPO(D)", "spearman_chosen"] == pytest.approx(0.4)
    assert by.loc["TIS-DPO(D)", "auroc_chosen"] == pytest.approx(0.7) and math.isnan(by.loc["TIS-DPO(D)", "auroc_rejected"])
    assert by.loc["TIS-DPO(D)", "weight_target"] == "signed" and by.loc["OTPO", "weight_target"] == "abs"
    assert by.loc["DPO", "weight_runs"] == 0 and math.isnan(by.loc["ConfPO", "spearman_chosen"])
    # cost: by label, else by the runs' method= name; none for the methods the file lacks
    assert by.loc["TIS-DPO(D)", "wall_ratio"] == 3.0 and by.loc["OTPO", "cpu_ratio"] == 2.5
    assert math.isnan(by.loc["ConfPO", "wall_ratio"])

    text = (out / "report.md").read_text()
    section = text.split("### Ranking: share of the oracle's gain at matched KL")[1].split("## Table")[0]
    assert "(method − DPO) / (TIS-DPO(oracle) − DPO)" in section
    assert "in true reward per token at KL 2 (the middle budget)" in section
    assert ("| 2 | OTPO | 75% [75%, 75%] | 75% [75%, 75%] | 75% [75%, 75%] | 75% [75%, 75%] | 75% [75%, 75%] "
            "| 75% [75%, 75%] | 38% | 0.20 / 0.10 † | 0.70 / - † | 2.00 / 2.50 / 1.25 |") in section
    assert "| 1 | TIS-DPO(oracle) | 100% (oracle) |" in section and "| 4 | DPO | 0% (baseline) |" in section
    assert section.count("| - | - | - |") == 1                                   # ConfPO: no weights, no cost
    assert "`" + str(cost) + "` (`python -m bench.method_cost`)" in section
    total = section.split("**Share of the oracle's gain in true reward**")[1]
    assert [line.split(" | ")[0] for line in total.splitlines() if line.startswith("| ") and "%" in line] == [
        "| TIS-DPO(oracle)", "| OTPO", "| TIS-DPO(D)", "| DPO", "| ConfPO"]          # the ranking's order
    shares = pd.read_csv(out / "oracle_share.csv")
    assert set(shares["metric"]) == {"true_reward", "true_reward_per_token", "safe_rate"} and len(shares) == 5 * 3 * 3


def test_ranking_without_a_cost_file_or_with_an_unclear_oracle(tmp_path):
    methods = {**RANKED, "tisdpo_oracle": ("TIS-DPO(oracle)", (0.0, 0.0, 0.0), [0.9, 0.8, 0.7], False)}
    out = tmp_path / "report"
    assert main([str(write_ranked_sweep(tmp_path / "sweep", methods)), "--out", str(out), "--no-plots",
                 "--resamples", "300", "--budgets", "1,2,3"]) == 0
    section = (out / "report.md").read_text().split("### Ranking")[1].split("## Table")[0]
    assert "**No ranking by share of the oracle's gain**" in section and "(not clear: shares n/a)" in section
    assert 'Cost: "-": no `--cost` file' in section
    ranking = pd.read_csv(out / "ranking.csv")
    assert ranking["share"].isna().all() and "wall_ratio" not in ranking.columns
    # ordered by the share of the frontier instead: total-reward gains 1 (TIS-DPO(D)), 0.5, 0 (two), -0.5
    assert list(ranking["method"]) == ["TIS-DPO(D)", "OTPO", "DPO", "TIS-DPO(oracle)", "ConfPO"]


def test_no_ranking_without_an_oracle_and_a_bad_cost_file_is_refused(tmp_path, capsys):
    sweep = write_ranked_sweep(tmp_path / "sweep", {k: v for k, v in RANKED.items() if k != "tisdpo_oracle"})
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--no-plots", "--resamples", "200"]) == 0
    assert "### Ranking" not in (out / "report.md").read_text() and not (out / "ranking.csv").exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("method,wall_s\ndpo,1\n")
    assert main([str(sweep), "--out", str(out), "--no-plots", "--cost", str(bad)]) == 2
    assert "not a bench/method_cost.py table (no column wall_ratio, cpu_ratio, peak_rss_ratio)" in capsys.readouterr().err
    assert main([str(sweep), "--out", str(out), "--no-plots", "--cost", str(tmp_path / "none.csv")]) == 2
    assert main([str(sweep), "--out", str(out), "--no-plots", "--resamples", "200", "--oracle", "TGDPO(oracle)"]) == 0
    assert "--oracle 'TGDPO(oracle)': no method of that label" in capsys.readouterr().err


def test_the_ranking_can_be_against_another_oracle_and_names_controls_cost_by_label(tmp_path):
    from experiments.report import cost_by_method, reference_oracle

    assert reference_oracle(["TGDPO(oracle)", "TIS-DPO(oracle)"]) == "TIS-DPO(oracle)"
    assert reference_oracle(["TGDPO(oracle)", "TIS-DPO(oracle) (control)"]) == "TIS-DPO(oracle) (control)"
    assert reference_oracle(["TGDPO(oracle)", "TIS-DPO(oracle)"], "tgdpo(oracle)") == "TGDPO(oracle)"
    assert reference_oracle(["TGDPO(oracle)"]) == "TGDPO(oracle)" and reference_oracle([]) is None
    assert reference_oracle(["TGDPO(oracle)"], "nope") is None
    runs = collect_runs(write_ranked_sweep(tmp_path / "sweep"))
    labels = {id(r): (f"{r.label} (control)" if r.label == "TIS-DPO(oracle)" else r.label) for r in runs}
    cost = pd.DataFrame([{"method": "tisdpo_oracle", "label": "TIS-DPO(oracle)", "wall_ratio": 1.5, "cpu_ratio": 1.5,
                          "peak_rss_ratio": 1.0}])
    merged = cost_by_method(cost, runs, labels).set_index("method")
    assert list(merged.index) == ["TIS-DPO(oracle) (control)"] and merged.loc["TIS-DPO(oracle) (control)", "wall_ratio"] == 1.5


def test_without_a_paper_table_the_controls_set_the_budgets_and_a_slow_method_stops_short(tmp_path):
    """A method that barely moves (TI-DPO on the credit task) must not pin a comparison's budgets below the
    KL where the oracle separates from DPO: with no paper table they span DPO's and the oracle's range."""
    sweep = write_ranked_sweep(tmp_path / "sweep")
    slow = [{"step": step, "kl_ref": step / 500, "true_reward": step / 500, "true_reward_per_token": step / 5000,
             "safe_rate": 0.5, "length": 10.0, "finished_rate": 1.0} for step in (0, 50, 100, 150, 200)]
    for seed in range(3):    # reaches KL 0.4 where the others reach 4
        write_job(sweep / f"tidpo_s{seed}", ["method=tidpo", f"seed={seed}"],
                  {"eval/kl_ref": 0.4, "eval/curve": slow, "config": {"label": "TI-DPO", "seed": seed}})
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--no-plots", "--resamples", "200"]) == 0
    matched = pd.read_csv(out / "matched_kl.csv")
    budgets = sorted(matched["kl_budget"].unique())
    assert budgets[0] > 0.4 and budgets[-1] < 4.0             # inside DPO's and the oracle's [0, 4], beyond TI-DPO's
    assert (matched[matched["method"] == "TI-DPO"]["n_seeds"] == 0).all()
    text = (out / "report.md").read_text()
    assert "inside the range DPO and TIS-DPO(oracle) both reached" in text and "TI-DPO (max KL 0.4)" in text
