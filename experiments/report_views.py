"""How a report reads: its tables as frames, Markdown and LaTeX, the matched-KL sections, the frontier figures.

Shared by the report's files (:mod:`experiments.report`: ``report.md``, ``table.md``, ``table.tex``)
and the W&B dashboard (:mod:`experiments.dashboard`), which shows the same tables: one rendering,
so the two never disagree, and neither imports the other for it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import frontier as fr
from .collect import Stat
from .paper import MetricSpec, PaperTable
from .report_model import RANK_METRIC, RANKING_METRICS, FrontierSection, Report, ReportRow

# ---------------------------------------------------------------- formatting


def runs_cell(row: ReportRow) -> str:
    """Finished seeds, and ``k/n`` when fewer than the n launched (a missing seed is visible)."""
    return f"{row.n_runs}/{row.launched}" if row.launched > row.n_runs else str(row.n_runs)


def format_stat(stat: Stat | None, digits: int, n_runs: int, pm: str = "±") -> str:
    if stat is None:
        return "-"
    text = f"{stat.mean:.{digits}f}"
    if stat.n > 1:
        text += f" {pm} {stat.std:.{digits}f}"
    if stat.n != n_runs:
        text += f" (n={stat.n})"
    return text


def format_paper(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def metric_header(metric: MetricSpec, table: PaperTable | None, ours: bool = True) -> str:
    """Column header; our column of a stand-in metric names the stand-in in [brackets]."""
    if table is None:
        return metric.name
    if not ours and metric.standing_in:
        metric = table.metric(metric.name)
    unit = f" ({metric.unit})" if metric.unit == "%" else ""
    stand_in = f" [{metric.stand_in.label}]" if metric.standing_in else ""
    return f"{metric.name} {metric.arrow}{unit}{stand_in}"


def display_frame(report: Report, digits: int = 2, pm: str = "±") -> pd.DataFrame:
    """Rows = methods, columns = the paper's metrics, cells formatted for Markdown/LaTeX."""
    records = []
    for row in report.rows:
        record: dict[str, str] = {"Method": row.label, "runs": runs_cell(row)}
        for metric in report.metrics:
            header = metric_header(metric, report.table)
            ours_cell = format_stat(row.ours.get(metric.name), digits, row.n_runs, pm) if row.method else "-"
            if report.table is not None and report.paper_scale:
                record[f"{header} ours"] = ours_cell
                record[f"{header} paper"] = format_paper(row.paper.get(metric.name))
            else:
                record[header] = ours_cell
        if report.table is not None and not report.paper_scale:
            for metric in report.metrics:
                record[f"{metric_header(metric, report.table, ours=False)} (paper, ref.)"] = format_paper(row.paper.get(metric.name))
        records.append(record)
    return pd.DataFrame.from_records(records)


def numeric_frame(report: Report) -> pd.DataFrame:
    """Machine-readable: mean, std, n per metric, and the paper's value."""
    records = []
    for row in report.rows:
        record: dict[str, Any] = {"method": row.label, "paper_row": row.paper_method or "",
                                  "runs": row.n_runs, "launched": max(row.launched, row.n_runs)}
        for metric in report.metrics:
            stat = row.ours.get(metric.name)
            record[f"{metric.name} mean"] = stat.mean if stat else math.nan
            record[f"{metric.name} std"] = stat.std if stat else math.nan
            record[f"{metric.name} n"] = stat.n if stat else 0
            if report.table is not None:
                value = row.paper.get(metric.name)
                record[f"{metric.name} paper"] = math.nan if value is None else value
        records.append(record)
    return pd.DataFrame.from_records(records)


def to_markdown(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "↑": r"$\uparrow$", "↓": r"$\downarrow$", "η": r"$\eta$", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(report: Report, digits: int = 2) -> str:
    frame = display_frame(report, digits)
    frame = frame.map(latex_escape)
    frame.columns = [latex_escape(c) for c in frame.columns]
    caption = table_caption(report)
    return frame.to_latex(index=False, escape=False, caption=latex_escape(caption),
                          label=f"tab:{report.table.name if report.table else 'results'}",
                          column_format="l" + "r" * (len(frame.columns) - 1))


def table_caption(report: Report) -> str:
    if report.table is None:
        return "Our runs: mean ± std over seeds."
    t = report.table
    mode = ("paper numbers beside ours (scale: paper)" if report.paper_scale
            else f"paper numbers ({t.model}) for reference only: our runs are at a smaller scale")
    return f"{t.title}. Ours: mean ± std over seeds; {mode}. Source: {t.source}."


def orderings_frame(report: Report) -> pd.DataFrame:
    records = []
    for result in report.orderings:
        records.append({"claim": result.ordering.describe(result.metric), "ours": result.status,
                        "weakest link": format_link(result.weakest_link),
                        "measured by": measured_by(result.metric),
                        "paper holds": {True: "yes", False: "NO", None: "n/a"}[result.paper_holds],
                        "detail": result.detail, "note": result.ordering.claim})
    return pd.DataFrame.from_records(records, columns=["claim", "ours", "weakest link", "measured by", "paper holds",
                                                       "detail", "note"])


def format_link(link: tuple[str, str, float] | None) -> str:
    if link is None:
        return "-"
    better, worse, separation = link
    return f"{better} vs {worse}: {separation:+.1f} SE"


def measured_by(metric: MetricSpec) -> str:
    if metric.standing_in:
        return f"built-in stand-in: {metric.stand_in.label} (`{metric.key}`)"
    return "the paper's metric"



FAILURE_COLUMNS = ["job", "status", "label", "overrides", "signal", "last checkpoint", "error"]


def failures_frame(report: Report) -> pd.DataFrame:
    records = [{"job": r.run_id, "status": r.status, "label": r.label or "",
                "overrides": " ".join(f"{k}={v}" for k, v in r.overrides.items()), "signal": r.signal or "",
                "last checkpoint": r.last_checkpoint or "", "error": (r.error or "")[:500]}
               for r in report.failures]
    return pd.DataFrame.from_records(records, columns=FAILURE_COLUMNS)


def jobs_summary(report: Report) -> str:
    """``N jobs (k finished, f failed, i interrupted, m missing)``, omitting zero counts but finished."""
    counts = [f"{report.count('ok')} finished"]
    for status, word in (("failed", "failed or unfinished"), ("running", "running"),
                         ("interrupted", "interrupted"), ("missing", "missing")):
        if report.count(status):
            counts.append(f"{report.count(status)} {word}")
    if len(counts) == 1:
        counts.append("0 failed or unfinished")
    return f"{len(report.runs)} jobs ({', '.join(counts)})"


# ---------------------------------------------------------------- matched-KL formatting


def _ci(value: float, low: float, high: float, signed: bool = False) -> str:
    fmt = "+.3g" if signed else ".3g"
    if not math.isfinite(value):
        return "-"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def matched_kl_frame(section: FrontierSection, metric: str) -> pd.DataFrame:
    """Rows = methods, columns = KL budgets; cell = mean [95% CI] (n) and the verdict vs the baseline."""
    table = section.table[section.table["metric"] == metric]
    records = []
    for method, rows in table.groupby("method", sort=False):
        record = {"Method": method}
        for row in rows.itertuples(index=False):
            cell = _ci(row.value, row.ci_low, row.ci_high) + f" (n={row.n_seeds})"
            if row.verdict and row.verdict not in ("no data",):
                diff = _ci(row.diff, row.diff_low, row.diff_high, signed=True)
                cell += f"; Δ {diff} {'(paired)' if row.paired else '(unpaired)'}: **{row.verdict}**"
            record[f"KL {row.kl_budget:.3g}"] = cell
        records.append(record)
    return pd.DataFrame.from_records(records)


def matched_orderings_frame(section: FrontierSection) -> pd.DataFrame:
    records = [{"claim": o.ordering.describe(o.metric), "at matched KL": o.status,
                "holds at": f"{o.holds}/{o.budgets} budgets", "clear (CI) at": f"{o.clear}/{o.budgets}",
                "measured by": fr.METRIC_LABELS.get(o.curve_metric, o.curve_metric), "detail": o.detail}
               for o in section.orderings]
    return pd.DataFrame.from_records(records, columns=["claim", "at matched KL", "holds at", "clear (CI) at",
                                                       "measured by", "detail"])


def share_frame(section: FrontierSection) -> pd.DataFrame | None:
    """Rows = methods, columns = KL budgets; cell = mean share of the reachable gain [min, max]."""
    if section.shares is None or not len(section.shares):
        return None
    records = []
    for method, rows in section.shares.groupby("method", sort=False):
        record = {"Method": method}
        for row in rows.itertuples(index=False):
            record[f"KL {row.kl_budget:.3g}"] = ("-" if not math.isfinite(row.share)
                                                 else f"{row.share:.0%} [{row.min:.0%}, {row.max:.0%}]")
        records.append(record)
    return pd.DataFrame.from_records(records)


def kl_list(budgets) -> str:
    """KL budgets as text: ``0.32, 0.64``."""
    return ", ".join(f"{b:.3g}" for b in budgets)


def oracle_lines(section: FrontierSection) -> list[str]:
    """The oracle control's message (:func:`frontier.oracle_evidence`): without a matched-KL gain over the
    baseline, this task variant cannot show what token weighting buys; with a gain in total reward but none
    per token, what it buys there is length (the old default task, issue #22); a gain only at budgets where
    fewer than 90% of the samples finish rests on the finished answers alone. The message says which."""
    if not section.oracles or section.baseline is None or section.empty:
        return []
    base = section.baseline
    lines = []
    for oracle in section.oracles:
        kind, per_token, total = fr.oracle_evidence(section.table, oracle)
        if kind == fr.ORACLE_CREDIT:
            where = (f"in true reward per token (KL {kl_list(per_token)})" + (f" and in total (KL {kl_list(total)})" if total else "")
                     if per_token else f"(KL {kl_list(total)})")
            lines.append(f"- The oracle control **{oracle}** beats {base} at matched KL {where}: this task variant "
                         "leaves room for token weighting to show a gain.")
        elif kind == fr.ORACLE_FLAGGED:
            lines.append(f"- **Caution: the oracle control {oracle} beats {base} at matched KL only at flagged budgets** "
                         f"(KL {kl_list(per_token or total)}, where some method finishes fewer than 90% of its samples): the "
                         "gain rests on the finished answers alone, so this task variant shows no trustworthy room for "
                         "token weighting.")
        elif kind == fr.ORACLE_LENGTH:
            lines.append(f"- **Caution: the oracle control {oracle} beats {base} at matched KL in total true reward "
                         f"only** (KL {kl_list(total)}), never in reward per token: at these budgets its gain is length. "
                         "An estimated-weight method's gain in total reward here may be length too: read the "
                         "per-token and length tables before crediting token weighting.")
        else:
            lines.append(f"- **Warning: the oracle control {oracle} does not beat {base} at matched KL** "
                         "(no KL budget where its true-reward CI is above the baseline's). Even true token "
                         "weights give no measurable gain on this task variant, so it cannot show token-weighting "
                         "gains: a tie or loss of the estimated-weight methods here says nothing about the papers' "
                         "claims.")
    return lines


# ---------------------------------------------------------------- the ranking


def share_cell(share: float, low: float, high: float, status: str) -> str:
    """A share of the oracle's gain: ``52% [31%, 80%]``; the anchors by name; ``n/a`` with no share."""
    if status == fr.REFERENCE:
        return "100% (oracle)"
    if status == fr.BASELINE:
        return "0% (baseline)"
    if status or not math.isfinite(share):
        return "n/a"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{share:.0%}"
    return f"{share:.0%} [{low:.0%}, {high:.0%}]"


def oracle_share_frame(section: FrontierSection, metric: str) -> pd.DataFrame:
    """Rows = methods (in the ranking's order when there is one), columns = KL budgets; cell = the
    share of the oracle's gain [95% CI]."""
    rows = section.oracle_shares[section.oracle_shares["metric"] == metric]
    order = list(section.ranking["method"]) if section.ranking is not None else []
    records: dict[str, dict[str, str]] = {m: {"Method": m} for m in order if m in set(rows["method"])}
    for row in rows.itertuples(index=False):
        records.setdefault(row.method, {"Method": row.method})[f"KL {row.kl_budget:.3g}"] = share_cell(
            row.share, row.low, row.high, row.status)
    return pd.DataFrame.from_records(list(records.values()))


def oracle_gain_line(section: FrontierSection, metric: str) -> str:
    """The oracle's gain over the baseline at each budget, and whether it is clear (CI above 0)."""
    rows = section.oracle_shares[(section.oracle_shares["metric"] == metric)
                                 & (section.oracle_shares["method"] == section.oracle)]
    parts = [f"KL {r.kl_budget:.3g} {_ci(r.oracle_gain, r.oracle_low, r.oracle_high, signed=True)}"
             + ("" if math.isfinite(r.oracle_low) and r.oracle_low > 0 else " (not clear: shares n/a)")
             for r in rows.itertuples(index=False)]
    return f"- {fr.METRIC_LABELS[metric]}: " + ("; ".join(parts) or "no data")


def pair_cell(a: float, b: float, digits: int = 2, mark: str = "") -> str:
    """``a / b`` (chosen / rejected, ...); ``-`` when neither is a number."""
    if not (math.isfinite(a) or math.isfinite(b)):
        return "-"
    return " / ".join("-" if not math.isfinite(v) else f"{v:.{digits}f}" for v in (a, b)) + mark


def cost_cell(row: pd.Series) -> str:
    """wall / CPU / peak RSS relative to DPO, ``-`` without a cost file or a row for the method."""
    values = [float(row.get(c, math.nan)) for c in ("wall_ratio", "cpu_ratio", "peak_rss_ratio")]
    if not any(math.isfinite(v) for v in values):
        return "-"
    return " / ".join("-" if not math.isfinite(v) else f"{v:.2f}" for v in values)


def ranking_display(section: FrontierSection) -> pd.DataFrame:
    """The ranking table as shown: rank, method, the share of the oracle's gain per token and in safe
    rate at every budget, the share of the frontier at the middle budget, weight quality, cost."""
    ranking, budget = section.ranking, fr.middle_budget(section.budgets)
    records = []
    for _, row in ranking.iterrows():
        record = {"#": str(row["rank"]), "Method": row["method"]}
        for metric, short in RANKING_METRICS.items():
            for b in section.budgets:
                key = f"{metric} {{}} KL {b:.3g}"
                record[f"{short}, KL {b:.3g}"] = share_cell(*(row.get(key.format(f), math.nan)
                                                              for f in ("share", "low", "high")),
                                                            row.get(key.format("status"), ""))
        share = row.get("frontier_share", math.nan)
        record[f"frontier share, KL {budget:.3g}"] = "-" if not math.isfinite(share) else f"{share:.0%}"
        mark = " †" if row.get("weight_target") == "abs" else ""
        record["Spearman (c / r)"] = pair_cell(row.get("spearman_chosen", math.nan),
                                               row.get("spearman_rejected", math.nan), mark=mark)
        record["AUROC (c / r)"] = pair_cell(row.get("auroc_chosen", math.nan), row.get("auroc_rejected", math.nan),
                                            mark=mark)
        record["cost ×DPO (wall / CPU / peak RSS)"] = cost_cell(row)
        records.append(record)
    return pd.DataFrame.from_records(records)


def render_ranking(section: FrontierSection) -> list[str]:
    """The ranking by share of the oracle's gain at matched KL (nothing without an oracle and a baseline)."""
    if section.ranking is None or section.oracle_shares is None:
        return []
    budget, base, oracle = fr.middle_budget(section.budgets), section.baseline, section.oracle
    ranked = section.ranking["share"].notna().any()
    lines = ["", "### Ranking: share of the oracle's gain at matched KL", "",
             f"Share of the oracle's gain = (method − {base}) / ({oracle} − {base}) at the same KL: the method's "
             f"mean gain over {base} divided by the oracle's, on the seeds the three share (paired by seed), with a "
             f"95% percentile bootstrap CI resampling those seeds ({section.n_resamples:,} resamples). 100% = as "
             f"much as the true token rewards give, 0% = no better than {base}, < 0 worse. **n/a** where the "
             f"oracle's own gain over {base} at that budget is not clearly positive (its CI, as in the verdicts "
             "above, includes 0): a share of a gain that is not there means nothing.", "",
             f"The oracle's gain over {base} (Δ [95% CI]):",
             *[oracle_gain_line(section, m) for m in fr.VERDICT_METRICS], ""]
    if ranked:
        lines.append(f"Methods in order of their share of the oracle's gain in {fr.METRIC_LABELS[RANK_METRIC]} at KL "
                     f"{budget:.3g} (the middle budget); n/a last, in order of their share of the frontier.")
    else:
        lines.append(f"**No ranking by share of the oracle's gain**: at KL {budget:.3g} (the middle budget) the "
                     f"oracle's gain in {fr.METRIC_LABELS[RANK_METRIC]} is not clear. Rows in order of their share of "
                     "the optimal frontier (total reward) instead.")
    lines += ["", to_markdown(ranking_display(section)), "",
              f"Frontier share: (R(k) − R(0)) / (F(k) − F(0)) in total reward at KL {budget:.3g}, F the exact optimal "
              "frontier (mean over seeds; \"-\": no optimal frontier in the runs). Weight quality: mean over seeds of "
              "the Spearman correlation and AUROC of the token weights the loss sees against the true token "
              "rewards, chosen / rejected (tisdpo/eval/weight_quality.py: offline weights signed as the loss uses "
              "them, chosen w − 1 and rejected 1 − w); † online weights (TI-DPO, OTPO): against |true reward| on a "
              "probe of training pairs at the end of training (importance, not sign); \"-\": no token weights.", ""]
    if section.cost_source:
        lines.append(f"Cost: `{section.cost_source}` (`python -m bench.method_cost`): one run of each method as its "
                     f"own process with an empty cache (the SFT stage and any estimator models included): wall time, "
                     f"CPU time (user + system) and peak RSS, each over {base}'s; \"-\": no row for the method.")
    else:
        lines.append("Cost: \"-\": no `--cost` file (`python -m bench.method_cost`, then `--cost method_cost.csv`).")
    lines += ["", f"**Share of the oracle's gain in {fr.METRIC_LABELS['true_reward']}** (total; a gain bought with "
              "length shows here, not per token):", "", to_markdown(oracle_share_frame(section, "true_reward"))]
    return lines


def render_matched_kl_sections(sections: Sequence[FrontierSection], figures: bool = True) -> list[str]:
    """The headline: one matched-KL section, or one per table condition (its own budgets and verdicts)."""
    if len(sections) <= 1:
        return render_matched_kl(sections[0] if sections else None, figures)
    lines = ["## Matched-KL comparison (headline)", "",
             "The table's columns are measured on different runs (" + "; ".join(s.heading for s in sections) + "): "
             "each condition is compared on its own runs, with its own KL budgets.", ""]
    for section in sections:
        body = render_matched_kl(section, figures)[2:]
        lines += [f"### {section.heading}", "", *[f"#{line}" if line.startswith("### ") else line for line in body]]
    return lines


def render_matched_kl(section: FrontierSection | None, figures: bool = True) -> list[str]:
    lines = ["## Matched-KL comparison (headline)", ""]
    if section is None or not len(section.points):
        return lines + ["No finished run logged `eval/kl_ref`: no comparison at matched KL is possible, so the "
                        "orderings below are judged only at the paper's hyperparameters (each method at its own KL).",
                        ""]
    if section.empty:
        return lines + ["The methods' KL ranges do not overlap: no common KL budget, no matched-KL verdict.", ""]
    n_methods = section.points["method"].nunique()
    where = (f"inside the range every method reached ({n_methods} methods)" if not section.span else
             f"inside the range {' and '.join(section.span)} both reached (a comparison without a paper table: the "
             "controls set the range, so that a method that barely moves cannot pin every verdict below the KL "
             "where the oracle separates from DPO)")
    if section.short:
        where += ("; curves that stop short have no value beyond their largest KL, so their n drops there: "
                  + ", ".join(f"{m} (max KL {kl:.3g})" for m, kl in section.short.items()))
    lines += [f"Each method's true reward, reward per token and safe rate (with length and finished rate beside "
              f"them) at {len(section.budgets)} KL budgets "
              f"({kl_list(section.budgets)} nats) {where}. "
              "Per seed, the points of every evaluation (and every β) are joined by "
              "linear interpolation in KL (no extrapolation); cells are the mean over seeds with a 95% percentile "
              f"bootstrap CI over seeds ({section.n_resamples:,} resamples), n = seeds with data at that KL."]
    if section.baseline:
        lines.append(f"Δ = method − {section.baseline}, paired by seed where both have it; **better**/**worse** when "
                     "the CI of Δ excludes 0, else no clear difference. With few seeds the percentile bootstrap "
                     "is narrow: read it as a description of the seed spread.")
    else:
        lines.append("No baseline method (DPO) among the runs: no verdicts.")
    if not section.curves:
        lines += ["", "**Final points only:** no run logged `eval/curve` (results from before the training curve "
                  "was stored), so each seed has a single (KL, reward) point. Each method's seeds are pooled into "
                  "one curve and the CI comes from resampling seeds; rerun to get per-seed frontiers."]
    elif section.pooled:
        lines += ["", f"Final points only for {', '.join(section.pooled)} (no `eval/curve`): pooled over seeds."]
    flagged = fr.low_finish_budgets(section.table)
    if flagged:
        lines += ["", f"**Flagged budgets: KL {kl_list(flagged)}** — some method finishes "
                  f"fewer than {fr.MIN_FINISHED:.0%} of its samples there (readings describe the finished answers "
                  "only; do not rest a verdict on them)."]
    lines += ["", "CIs are widened by each cell's interpolation error (|linear − quadratic| between the nearest "
              "curve points, mean over seeds). Verdicts are given on total reward, reward per token and safe rate; "
              "a total-reward gain that is not also a per-token gain is bought with length."]
    for metric in fr.METRICS:
        frame = matched_kl_frame(section, metric)
        if len(frame):
            if metric == "true_reward" and section.optimal is not None:
                best = fr.optimal_at(section.optimal, section.budgets)
                frame = pd.concat([frame, pd.DataFrame([{"Method": "optimal frontier (exact)",
                                   **{f"KL {b:.3g}": f"{v:.3g}" for b, v in zip(section.budgets, best)}}])],
                                  ignore_index=True)
            lines += ["", f"**{fr.METRIC_LABELS[metric]}** at matched KL:", "", to_markdown(frame)]
    shares = share_frame(section)
    if shares is not None:
        lines += ["", "**Share of the reachable gain** (R(k) − R(0)) / (F(k) − F(0)), F the exact optimal frontier, "
                  "R(0) the run's reference: mean [min, max] over seeds (1 = optimal):", "", to_markdown(shares)]
    oracle = oracle_lines(section)
    if oracle:
        lines += ["", *oracle]
    lines += render_ranking(section)
    if section.orderings:
        counts = {s: sum(o.status == s for o in section.orderings)
                  for s in ("reproduced", "mixed", "not reproduced", "not evaluated")}
        lines += ["", "### The paper's orderings at matched KL", "",
                  f"{counts['reproduced']} reproduced at every budget "
                  f"({sum(o.status == 'reproduced' and o.clear == o.budgets for o in section.orderings)} with every "
                  f"link's CI clear of 0 at every budget), {counts['mixed']} at some budgets only, "
                  f"{counts['not reproduced']} at none, {counts['not evaluated']} not evaluated "
                  f"(of {len(section.orderings)} orderings on true reward or safe rate; the others have no "
                  "matched-KL measure).", "", to_markdown(matched_orderings_frame(section))]
    if figures:
        lines += ["", f"![true reward vs KL](plots/frontier_true_reward{section.suffix}.png) "
                  f"![reward per token vs KL](plots/frontier_true_reward_per_token{section.suffix}.png) "
                  f"![safe rate vs KL](plots/frontier_safe_rate{section.suffix}.png)"]
    return lines + [""]


# ---------------------------------------------------------------- figures


def frontier_plots(report: Report, out_dir: Path) -> list[Path]:
    """``frontier_<metric>[<condition>].png`` per frontier metric with data, per condition."""
    from .plots import plot_frontier

    title = report.table.name if report.table else "runs"
    written = []
    for section in report.frontiers:
        if not len(section.points):
            continue
        where = f" ({section.heading})" if section.condition else ""
        for metric in fr.VERDICT_METRICS:
            if np.isfinite(section.points[metric].astype(float)).any():
                written.append(plot_frontier(
                    section.points, metric, out_dir / f"frontier_{metric}{section.suffix}.png", section.budgets,
                    f"{title}{where}: {fr.METRIC_LABELS[metric]} vs KL (mean, min–max over seeds; x = final points)",
                    optimal=section.optimal if metric == "true_reward" else None))
    return written
