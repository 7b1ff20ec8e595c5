"""Matched-KL frontiers: interpolation, budgets, bootstrap CIs, verdicts, and the report's section."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from experiments import frontier as fr
from experiments.collect import Run, collect_runs
from experiments.report import main


def points_frame(rows: list[tuple]) -> pd.DataFrame:
    """(method, seed, kl, true_reward[, safe_rate]) tuples -> the frame frontier_points returns."""
    records = []
    for row in rows:
        method, seed, kl, reward, *rest = row
        records.append({"method": method, "seed": seed, "beta": None, "run": f"{method}_{seed}", "step": math.nan,
                        "kl": kl, "true_reward": reward, "safe_rate": rest[0] if rest else math.nan,
                        "source": "curve", "final": False})
    return pd.DataFrame.from_records(records)


def curve_points(method: str, seed: int, offset: float, kls=(1.0, 2.0, 3.0, 4.0, 5.0), slope: float = 1.0) -> list[tuple]:
    return [(method, seed, kl, slope * kl + offset, 0.5 + 0.01 * kl) for kl in kls]


# ---------------------------------------------------------------- points and curves

def test_run_points_take_the_curve_and_drop_a_repeated_final_point():
    curve = [{"step": 50, "kl_ref": 1.0, "true_reward": 2.0, "safe_rate": 0.5},
             {"step": 100, "eval/kl_ref": 2.0, "eval/true_reward": 3.0, "eval/safe_rate": 0.6}]
    same_final = {"eval/kl_ref": 2.0, "eval/true_reward": 3.0, "eval/safe_rate": 0.6}
    assert [p["kl"] for p in fr.run_points(curve, same_final)] == [1.0, 2.0]
    other_final = {"eval/kl_ref": 2.5, "eval/true_reward": 3.5, "eval/safe_rate": 0.7}
    points = fr.run_points(curve, other_final)
    assert [(p["kl"], p["source"]) for p in points] == [(1.0, "curve"), (2.0, "curve"), (2.5, "final")]
    assert fr.run_points(None, {"eval/true_reward": 1.0}) == []          # no KL: no point


def test_beta_sweeps_add_points_to_the_same_seed_frontier():
    runs = [Run("a", "ok", {"eval/kl_ref": kl, "eval/true_reward": r}, {"label": "DPO", "seed": 0},
                {"loss.beta": beta, "seed": "0"}) for beta, kl, r in ((0.1, 4.0, 8.0), (0.5, 1.0, 3.0))]
    runs.append(Run("b", "failed", {"eval/kl_ref": 9.0, "eval/true_reward": 9.0}, {"label": "DPO", "seed": 0}))
    points = fr.frontier_points(runs)
    assert sorted(points["beta"]) == [0.1, 0.5] and set(points["method"]) == {"DPO"}
    assert fr.method_basis(points) == fr.PER_SEED                        # one seed, two KLs: a curve
    assert list(points["final"]) == [True, True]


def test_interpolation_matches_a_hand_computation():
    # points (1, 2), (3, 6), (3, 8), (5, 5): equal KLs averaged -> (1, 2), (3, 7), (5, 5)
    xs, ys = fr.seed_curve([3, 1, 5, 3], [6, 2, 5, 8])
    assert list(xs) == [1, 3, 5] and list(ys) == [2, 7, 5]
    values = fr.interpolate(xs, ys, [2.0, 4.0, 1.0, 5.0, 0.5, 6.0])
    # 2 + (7 - 2) * (2 - 1) / (3 - 1) = 4.5;  7 + (5 - 7) * (4 - 3) / (5 - 3) = 6
    assert values[:4] == pytest.approx([4.5, 6.0, 2.0, 5.0])
    assert np.isnan(values[4]) and np.isnan(values[5])                    # no extrapolation
    upper = fr.interpolate(*fr.seed_curve([3, 1, 5, 3], [6, 2, 5, 8], mode="upper"), [4.0])
    assert upper == pytest.approx([7.0])                                  # running max: 7 stays 7
    with pytest.raises(ValueError, match="mode"):
        fr.seed_curve([1], [1], mode="max")


def test_interpolation_error_is_the_gap_to_the_parabola_capped_by_the_local_spread():
    xs, ys = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 4.0, 9.0])
    # y = x^2 through the three nearest points: the chord from 1 to 2 reads 2.5 at 1.5, the parabola 2.25
    assert fr.interpolation_error(xs, ys, 1.5) == pytest.approx(0.25)
    # two points 1e-4 apart in KL with different values (a curve whose KL steps back): the parabola
    # through them swings by ~1e3 at 0.5; the estimate stays within the three values' own range
    xs, ys = np.array([0.0, 0.3, 0.3001, 1.0]), np.array([0.0, 0.2, 0.1, 0.4])
    err = fr.interpolation_error(xs, ys, 0.2)
    assert 0.0 <= err <= 0.2 + 1e-12


def test_budgets_lie_in_the_common_range():
    points = points_frame(curve_points("A", 0, 0.0, kls=(1.0, 3.0, 5.0)) + curve_points("B", 0, 0.0, kls=(2.0, 8.0)))
    assert fr.kl_range(points) == (2.0, 5.0)
    budgets = fr.kl_budgets(points)
    assert budgets == pytest.approx([2.6, 3.2, 3.8, 4.4])                 # linspace(2, 5, 6) without its ends
    for _, group in points.groupby("method"):
        assert group["kl"].min() <= budgets.min() and budgets.max() <= group["kl"].max()
    disjoint = points_frame(curve_points("A", 0, 0.0, kls=(1.0, 2.0)) + curve_points("B", 0, 0.0, kls=(3.0, 4.0)))
    assert len(fr.kl_budgets(disjoint)) == 0 and len(fr.kl_budgets(points.iloc[:0])) == 0


# ---------------------------------------------------------------- statistics

def test_bootstrap_ci_covers_the_true_mean():
    """Seeds = true curve (reward = kl) + a seed offset ~ N(0, 1); the true mean at KL 3 is 3."""
    rng = np.random.default_rng(1)
    covered, reps = 0, 200
    for rep in range(reps):
        rows = []
        for seed in range(10):
            rows += curve_points("A", seed, rng.normal(0.0, 1.0))
        est = fr.estimator(points_frame(rows), "true_reward", 3.0, fr.PER_SEED)
        value, low, high = fr.mean_ci(est, np.random.default_rng(rep), n_resamples=2000)
        assert low <= value <= high
        covered += low <= 3.0 <= high
    # a percentile bootstrap of a mean of 10 normals covers ~91% at a nominal 95%
    assert 0.84 <= covered / reps <= 0.99


def test_the_same_seed_gives_the_same_intervals():
    rows = [r for s in range(3) for r in curve_points("DPO", s, 0.1 * s)] + \
           [r for s in range(3) for r in curve_points("X", s, 0.5 + 0.2 * s)]
    a = fr.matched_kl_table(points_frame(rows), n_resamples=500, seed=7)
    b = fr.matched_kl_table(points_frame(rows), n_resamples=500, seed=7)
    pd.testing.assert_frame_equal(a, b)


def test_verdict_signs_paired_and_unpaired():
    offsets = [0.0, 0.3, -0.2, 0.5]
    rows = []
    for seed, offset in enumerate(offsets):
        rows += curve_points("DPO", seed, offset)
        rows += curve_points("better", seed, offset + 1.0)                # +1 at every KL, every seed
        rows += curve_points("worse", seed, offset - 1.0)
        rows += curve_points("same", seed, offset + (0.1 if seed % 2 else -0.1))
        rows += curve_points("other seeds", seed + 10, offset + 2.0)       # no seed shared with DPO
    table = fr.matched_kl_table(points_frame(rows), budgets=[2.0, 4.0], n_resamples=2000)
    reward = table[table["metric"] == "true_reward"].set_index(["method", "kl_budget"])
    assert set(reward.loc["better", "verdict"]) == {fr.BETTER}
    assert set(reward.loc["worse", "verdict"]) == {fr.WORSE}
    assert set(reward.loc["same", "verdict"]) == {fr.UNCLEAR}
    assert set(reward.loc["other seeds", "verdict"]) == {fr.BETTER}
    assert reward.loc[("better", 2.0), "diff"] == pytest.approx(1.0)
    # paired: every per-seed difference is exactly 1, so the CI is [1, 1]
    assert (reward.loc[("better", 2.0), "diff_low"], reward.loc[("better", 2.0), "diff_high"]) == pytest.approx((1.0, 1.0))
    assert reward.loc[("better", 2.0), "paired"] and not reward.loc[("other seeds", 2.0), "paired"]
    assert reward.loc[("DPO", 2.0), "verdict"] == "" and reward.loc[("DPO", 2.0), "n_seeds"] == 4
    assert reward.loc[("DPO", 2.0), "value"] == pytest.approx(2.0 + np.mean(offsets))
    assert fr.beats_baseline(table, "better") and not fr.beats_baseline(table, "same")
    assert fr.verdict(-1.0, -0.5, direction="down") == fr.BETTER and fr.verdict(math.nan, 1.0) == fr.TOO_FEW


def test_one_seed_gives_no_verdict():
    rows = curve_points("DPO", 0, 0.0) + curve_points("X", 0, 1.0)
    table = fr.matched_kl_table(points_frame(rows), budgets=[3.0], n_resamples=200)
    x = table[(table["method"] == "X") & (table["metric"] == "true_reward")].iloc[0]
    assert x["verdict"] == fr.TOO_FEW and x["diff"] == pytest.approx(1.0) and math.isnan(x["ci_low"])


def test_final_points_only_are_pooled_over_seeds():
    # one point per seed: (1, 1), (2, 2), (3, 3) for A; the pooled curve is reward = kl
    rows = [("A", s, float(s + 1), float(s + 1)) for s in range(3)] + [("B", s, float(s + 1), s + 2.0) for s in range(3)]
    points = points_frame(rows)
    points["source"] = "final"
    assert fr.method_basis(points[points["method"] == "A"]) == fr.POOLED and not fr.has_curves(points)
    table = fr.matched_kl_table(points, budgets=[2.0], baseline="A", metrics=("true_reward",), n_resamples=1000)
    a, b = table.iloc[0], table.iloc[1]
    assert a["value"] == pytest.approx(2.0) and a["basis"] == fr.POOLED and a["n_seeds"] == 3
    assert b["diff"] == pytest.approx(1.0) and b["paired"]               # same seeds: resampled jointly
    band = fr.grid_band(points[points["method"] == "A"], "true_reward", np.array([1.5, 2.5, 4.0]))
    assert list(band["mean"][:2]) == pytest.approx([1.5, 2.5]) and np.isnan(band["mean"][2])


# ---------------------------------------------------------------- the report section

METHODS = {  # name: (overrides, config, reward slope over sqrt KL, KL per step)
    "dpo": (["method=dpo"], {"label": "DPO", "loss": {"name": "dpo"}}, 3.0, 0.04),
    "tis_d": (["method=tisdpo_d"], {"label": "TIS-DPO(D)", "loss": {"name": "tisdpo"},
                                    "estimator": {"name": "dpo_pair"}}, 3.6, 0.03),
    "oracle": (["method=tisdpo_oracle"], {"label": "TIS-DPO(oracle)", "loss": {"name": "tisdpo"},
                                          "estimator": {"name": "oracle"}}, 3.0, 0.04),
}


def write_sweep(root: Path, with_curve: bool = True, seeds: int = 3) -> Path:
    """A fake multirun: each job's results.json with an eval/curve (reward = a·sqrt(KL) + seed noise);
    the oracle has DPO's curve exactly (it cannot beat it)."""
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    noise = [0.0, 0.15, -0.1, 0.05]
    num = 0
    for name, (overrides, config, slope, kl_per_step) in METHODS.items():
        for seed in range(seeds):
            job = root / f"{num}_{name}_s{seed}"
            num += 1
            (job / ".hydra").mkdir(parents=True)
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
            curve = []
            for step in (50, 100, 150):
                kl = kl_per_step * step * (1 + 0.1 * seed)
                curve.append({"step": step, "kl_ref": kl, "true_reward": slope * math.sqrt(kl) + noise[seed],
                              "safe_rate": 0.5 + 0.05 * kl * slope / 3, "length": 20.0})
            results = {"eval/kl_ref": curve[-1]["kl_ref"], "eval/true_reward": curve[-1]["true_reward"],
                       "eval/safe_rate": curve[-1]["safe_rate"],
                       "config": {**config, "seed": seed, "scale": "tiny", "paper_table": "tisdpo_pku_main"}}
            if with_curve:
                results["eval/curve"] = curve
            (job / "results.json").write_text(json.dumps(results))
    return root


def test_report_has_a_matched_kl_headline_with_verdicts_and_frontier_plots(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    out = tmp_path / "report"
    assert main([str(sweep), "--table", "tisdpo_pku_main", "--out", str(out), "--resamples", "2000"]) == 0
    text = (out / "report.md").read_text()
    assert text.index("## Matched-KL comparison (headline)") < text.index("## Table (at the paper's hyperparameters)")
    section = text.split("## Matched-KL comparison (headline)")[1].split("## Table")[0]
    assert "at 4 KL budgets" in section and "Final points only" not in section
    assert "paired): **better**" in section                                # TIS-DPO(D) vs DPO
    assert "the oracle control TIS-DPO(oracle) does not beat DPO at matched KL" in section
    assert "cannot show token-weighting gains" in section
    assert "| MT ↑: TIS-DPO(D) > DPO | reproduced | 4/4 budgets | 4/4 | true reward |" in section
    assert "![true reward vs KL](plots/frontier_true_reward.png)" in section

    table = pd.read_csv(out / "matched_kl.csv")
    reward = table[(table["metric"] == "true_reward")]
    assert set(reward["method"]) == {"DPO", "TIS-DPO(D)", "TIS-DPO(oracle)"}
    assert set(reward[reward["method"] == "TIS-DPO(D)"]["verdict"]) == {fr.BETTER}
    assert set(reward[reward["method"] == "TIS-DPO(oracle)"]["verdict"]) == {fr.UNCLEAR}
    low, high = fr.kl_range(fr.frontier_points(collect_runs(sweep)))
    assert ((reward["kl_budget"] > low) & (reward["kl_budget"] < high)).all()
    for metric in ("true_reward", "safe_rate"):
        assert (out / "plots" / f"frontier_{metric}.png").stat().st_size > 5000


def test_report_without_curves_falls_back_to_final_points_and_says_so(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", with_curve=False)
    out = tmp_path / "report"
    assert main([str(sweep), "--table", "tisdpo_pku_main", "--out", str(out), "--no-plots",
                 "--resamples", "500", "--budgets", "4.5,5"]) == 0
    section = (out / "report.md").read_text().split("## Matched-KL comparison (headline)")[1].split("## Table")[0]
    assert "**Final points only:** no run logged `eval/curve`" in section
    assert "| Method | KL 4.5 | KL 5 |" in section and "plots/frontier" not in section
    assert set(pd.read_csv(out / "matched_kl.csv")["basis"]) == {fr.POOLED}


def test_report_without_kl_says_there_is_no_matched_comparison(tmp_path):
    job = tmp_path / "runs" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["loss=dpo", "seed=0"]))
    (job / "results.json").write_text(json.dumps({"eval/safe_rate": 0.9, "config": {"label": "dpo"}}))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    assert "No finished run logged `eval/kl_ref`" in (tmp_path / "out" / "report.md").read_text()


def test_label_noise_levels_get_their_own_frontiers(tmp_path):
    """A table whose columns are different runs (tidpo_label_noise: one noise level per column) is
    compared per level: TI-DPO beats DPO at 0% noise and loses at 40% here, so pooling the levels
    into one curve per method (the earlier report) would hide both."""
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    num = 0
    for noise, edge in ((0.0, 1.0), (0.4, -1.0)):   # TI-DPO's advantage over DPO at each level
        for loss, label, gain in (("dpo", "DPO", 0.0), ("tidpo", "TI-DPO", edge)):
            for seed in range(3):
                job = root / f"{num}_{label}_n{noise}_s{seed}"
                num += 1
                (job / ".hydra").mkdir(parents=True)
                (job / ".hydra" / "overrides.yaml").write_text(
                    yaml.safe_dump([f"loss={loss}", f"dataset.label_noise={noise}", f"seed={seed}"]))
                curve = [{"step": s, "kl_ref": s / 50 * (1 + 0.1 * seed), "safe_rate": 0.5,
                          "true_reward": 2 * s / 50 - 3 * noise + gain + 0.05 * seed} for s in (50, 100, 150)]
                config = {"loss": {"name": loss}, "label": label, "seed": seed, "scale": "tiny",
                          "dataset": {"label_noise": noise}, "paper_table": "tidpo_label_noise"}
                (job / "results.json").write_text(json.dumps({
                    "eval/kl_ref": curve[-1]["kl_ref"], "eval/true_reward": curve[-1]["true_reward"],
                    "eval/safe_rate": 0.5, "eval/curve": curve, "config": config}))
    out = tmp_path / "report"
    assert main([str(root), "--table", "tidpo_label_noise", "--out", str(out), "--resamples", "500"]) == 0
    text = (out / "report.md").read_text()
    section = text.split("## Matched-KL comparison (headline)")[1].split("## Table")[0]
    assert "### dataset.label_noise = 0.0" in section and "### dataset.label_noise = 0.4" in section
    at_zero, at_forty = section.split("### dataset.label_noise = 0.4")
    assert "| 0% ↑: TI-DPO > DPO | reproduced | 4/4 budgets | 4/4 |" in at_zero
    assert "| 40% ↑: TI-DPO > DPO | not reproduced | 0/4 budgets |" in at_forty
    table = pd.read_csv(out / "matched_kl.csv")
    tidpo = table[(table["method"] == "TI-DPO") & (table["metric"] == "true_reward")]
    assert set(tidpo[tidpo["condition"] == "dataset.label_noise = 0.0"]["verdict"]) == {fr.BETTER}
    assert set(tidpo[tidpo["condition"] == "dataset.label_noise = 0.4"]["verdict"]) == {fr.WORSE}
    assert (out / "plots" / "frontier_true_reward_label_noise0.4.png").is_file()


# ---------------------------------------------------------------- share of the oracle's gain

def gain_points(gains: dict[str, list[float]], offsets=(0.0, 0.3, -0.2, 0.5), kls=(1.0, 2.0, 3.0, 4.0, 5.0)) -> pd.DataFrame:
    """DPO: reward = kl + a seed offset (reward per token = a tenth of it); every other method: DPO's
    curve + its per-seed gain at every KL (per token: a tenth of it). Straight lines: no interpolation error."""
    rows = []
    for seed, offset in enumerate(offsets):
        for method, per_seed in {"DPO": [0.0] * len(offsets), **gains}.items():
            rows += [(method, seed, kl, kl + offset + per_seed[seed], 0.5 + 0.01 * kl + 0.01 * per_seed[seed])
                     for kl in kls]
    points = points_frame(rows)
    points["true_reward_per_token"] = points["true_reward"] / 10
    return points


def test_share_of_the_oracles_gain_is_the_method_gain_over_the_oracle_gain():
    points = gain_points({"oracle": [2.0] * 4, "half": [1.0] * 4, "worse": [-0.5] * 4})
    table = fr.oracle_share_table(points, [2.0, 4.0], "DPO", "oracle", n_resamples=2000)
    rows = table.set_index(["method", "metric", "kl_budget"])
    for metric in ("true_reward", "true_reward_per_token", "safe_rate"):
        for budget in (2.0, 4.0):
            half = rows.loc[("half", metric, budget)]
            # oracle = DPO + 2, method = DPO + 1 at every seed: 1 / 2, and the paired CI is exactly [0.5, 0.5]
            assert (half["share"], half["low"], half["high"]) == pytest.approx((0.5, 0.5, 0.5))
            assert half["paired"] and half["n"] == 4 and half["status"] == ""
            assert rows.loc[("worse", metric, budget), "share"] == pytest.approx(-0.25)
            assert rows.loc[("oracle", metric, budget), "share"] == pytest.approx(1.0)
            assert rows.loc[("oracle", metric, budget), "status"] == fr.REFERENCE
            assert rows.loc[("DPO", metric, budget), "share"] == pytest.approx(0.0)
            assert rows.loc[("DPO", metric, budget), "status"] == fr.BASELINE
    assert rows.loc[("half", "true_reward", 2.0), "oracle_gain"] == pytest.approx(2.0)


def test_share_is_a_ratio_of_mean_gains_paired_by_seed():
    # per-seed oracle gains 1 and 3, the method's 1 and 1: share = mean 1 / mean 2 = 0.5 (the mean of the
    # per-seed ratios would be (1 + 1/3) / 2); resamples of the two seeds give 1/1, 1/3 and 2/4
    points = gain_points({"oracle": [1.0, 3.0], "m": [1.0, 1.0]}, offsets=(0.0, 0.1))
    table = fr.oracle_share_table(points, [3.0], "DPO", "oracle", metrics=("true_reward",), n_resamples=4000)
    row = table.set_index("method").loc["m"]
    assert row["share"] == pytest.approx(0.5)
    assert (row["low"], row["high"]) == pytest.approx((1 / 3, 1.0))


def test_share_is_na_where_the_oracle_gain_is_not_clear():
    # the oracle's gain over DPO is +0.1 or -0.1 by seed: its CI includes 0, so no share at all
    points = gain_points({"oracle": [0.1, -0.1, 0.1, -0.1], "m": [1.0] * 4})
    table = fr.oracle_share_table(points, [2.0, 4.0], "DPO", "oracle", n_resamples=2000)
    assert set(table["status"]) == {fr.ORACLE_UNCLEAR} and table["share"].isna().all()
    assert table["oracle_low"].lt(0).all() and table["oracle_high"].gt(0).all()


def test_share_without_data_at_a_budget_and_on_pooled_final_points():
    points = gain_points({"oracle": [2.0] * 4, "m": [1.0] * 4})
    short = points[~((points["method"] == "m") & (points["kl"] > 3.0))]
    table = fr.oracle_share_table(short, [4.5], "DPO", "oracle", metrics=("true_reward",), n_resamples=500)
    assert table.set_index("method").loc["m", "status"] == fr.NO_DATA
    # one final point per seed: pooled curves, resampled apart (unpaired); the share of the estimates is still 1/2
    final = points[points["kl"] == points["seed"] + 1.0].assign(source="final")
    table = fr.oracle_share_table(final, [2.5], "DPO", "oracle", metrics=("true_reward",), n_resamples=500)
    row = table.set_index("method").loc["m"]
    assert row["share"] == pytest.approx(0.5) and not row["paired"]


def test_the_middle_budget():
    assert fr.middle_budget([4.0, 1.0, 3.0, 2.0]) == 2.0 and fr.middle_budget([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(fr.middle_budget([]))


def test_the_oracle_line_tells_a_per_token_gain_from_a_length_gain():
    """The oracle control's line requires a gain per token: a gain in total reward alone is length (the old
    default task, issue #22) and gets a caution, not "leaves room for token weighting"."""
    from types import SimpleNamespace

    from experiments.report_views import oracle_lines

    def section(total: str, per_token: str | None):
        rows = [("oracle", "true_reward", 1.0, total), ("oracle", "true_reward", 2.0, fr.UNCLEAR)]
        if per_token is not None:
            rows += [("oracle", "true_reward_per_token", 1.0, per_token), ("oracle", "true_reward_per_token", 2.0, fr.UNCLEAR)]
        table = pd.DataFrame(rows, columns=["method", "metric", "kl_budget", "verdict"]).assign(value=1.0)
        return SimpleNamespace(oracles=["oracle"], baseline="DPO", empty=False, table=table)

    (both,) = oracle_lines(section(fr.BETTER, fr.BETTER))
    assert "beats DPO at matched KL in true reward per token (KL 1) and in total (KL 1)" in both
    assert "leaves room" in both
    (length,) = oracle_lines(section(fr.BETTER, fr.UNCLEAR))
    assert "Caution" in length and "in total true reward only** (KL 1)" in length and "length" in length
    assert "leaves room" not in length
    (old,) = oracle_lines(section(fr.BETTER, None))  # a report without the per-token metric: total decides
    assert "beats DPO at matched KL (KL 1)" in old
    (none,) = oracle_lines(section(fr.UNCLEAR, fr.UNCLEAR))
    assert "does not beat DPO" in none
    # a gain only where fewer than 90% of some method's samples finish is not room for token weighting
    flagged = section(fr.BETTER, fr.BETTER)
    flagged.table = pd.concat([flagged.table, pd.DataFrame(
        [("DPO", "finished_rate", 1.0, fr.UNCLEAR)], columns=["method", "metric", "kl_budget", "verdict"]).assign(value=0.8)])
    (unfinished,) = oracle_lines(flagged)
    assert "only at flagged budgets** (KL 1," in unfinished and "leaves room" not in unfinished
