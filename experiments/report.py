"""Aggregate seeds and write the paper's table with our numbers, the orderings check and failures.

    python -m experiments.report <multirun dir | wandb:entity/project[/group]> [--table NAME] [--out DIR]
                                 [--baseline DPO] [--budgets 1,2,4] [--wandb] [--wandb-group G] [--scale S]

Writes ``report.md`` (everything), ``table.md``, ``table.csv`` (mean/std/n per metric, and the
paper's value), ``table.tex``, ``orderings.csv``, ``matched_kl.csv``, ``runs.csv`` and PNGs under
``plots/`` (``frontier_true_reward.png``, ``frontier_safe_rate.png``, ...); with ``--wandb`` also the
table's W&B report (``wandb_report.json`` offline, see :mod:`experiments.dashboard`).

The headline is the matched-KL section (:mod:`experiments.frontier`): each method's true reward and
safe rate at common KL budgets with bootstrap CIs over seeds, verdicts against the baseline, and
the paper's orderings judged there; then the table and orderings at the paper's hyperparameters.

Cells are mean ± sample std (ddof=1) over the seeds of a method, in the paper's unit (ours
multiplied by the metric's ``ours_scale``). When every run's config says ``scale: paper`` the
paper's number sits beside ours for each metric; otherwise (our scaled-down setting) the paper's
numbers follow in separate "(paper, ref.)" columns: for reference only, not a comparison.
Orderings are computed on the means: "reproduced" needs every link of the claim to hold.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import frontier as fr
from .collect import DEFAULT_IGNORE, Method, Run, Stat, collect_runs, group_methods, method_identity, overrides_label
from .paper import MetricSpec, Ordering, PaperTable, list_paper_tables, load_paper_table

# ---------------------------------------------------------------- the table model

SEPARATION = 2.0   # a link is "clear of seed noise" when its gap exceeds this many standard errors
BETA_KEYS = ("loss.beta", "beta")   # a β sweep is more points on one method's frontier, not another method
FRONTIER_KEYS = {"eval/true_reward": "true_reward", "eval/safe_rate": "safe_rate"}   # paper column key -> curve key


@dataclass
class ReportRow:
    label: str
    paper_method: str | None                 # the paper row it stands for
    method: Method | None                    # our runs (None: paper-only row)
    ours: dict[str, Stat | None] = field(default_factory=dict)
    paper: dict[str, float | None] = field(default_factory=dict)
    launched: int = 0    # jobs of this method in the sweep, whatever became of them (≥ n_runs)

    @property
    def n_runs(self) -> int:
        return len(self.method.runs) if self.method else 0


@dataclass
class OrderingResult:
    ordering: Ordering
    metric: MetricSpec
    status: str              # reproduced | not reproduced | not evaluated
    detail: str
    paper_holds: bool | None
    # The claimed link our numbers support least: (better, worse, gap in standard errors of the
    # difference of means; negative = the wrong way round). None when not evaluated or n == 1.
    weakest_link: tuple[str, str, float] | None = None

    @property
    def clear_of_noise(self) -> bool:
        """Every link holds by more than 2 standard errors (descriptive, not a significance test)."""
        return self.weakest_link is not None and self.weakest_link[2] > SEPARATION


@dataclass
class MatchedOrdering:
    """A paper ordering judged at matched KL: per budget, does every link hold, and clearly (CI)?"""

    ordering: Ordering
    metric: MetricSpec
    curve_metric: str
    status: str             # reproduced | not reproduced | mixed | not evaluated
    holds: int = 0          # budgets where every link's mean difference has the claimed sign
    clear: int = 0          # budgets where every link's CI excludes 0 on the claimed side
    budgets: int = 0
    detail: str = ""


@dataclass
class FrontierSection:
    """Everything the matched-KL section shows (see :mod:`experiments.frontier`)."""

    points: pd.DataFrame
    budgets: list[float]
    table: pd.DataFrame
    baseline: str | None
    curves: bool                        # some run logged eval/curve
    pooled: list[str] = field(default_factory=list)   # methods on pooled final points
    orderings: list[MatchedOrdering] = field(default_factory=list)
    oracles: list[str] = field(default_factory=list)
    n_resamples: int = fr.N_RESAMPLES
    condition: dict[str, Any] = field(default_factory=dict)   # the runs' setting (a column's `where`), {} = all

    @property
    def empty(self) -> bool:
        return not len(self.points) or not self.budgets

    @property
    def suffix(self) -> str:
        """File-name suffix of this condition's plots ("" for the unconditioned section)."""
        return "".join(f"_{k.split('.')[-1]}{v}" for k, v in self.condition.items())

    @property
    def heading(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.condition.items())


@dataclass
class Report:
    source: str
    runs: list[Run]
    methods: list[Method]
    metrics: list[MetricSpec]
    rows: list[ReportRow]
    table: PaperTable | None = None
    paper_scale: bool = False
    orderings: list[OrderingResult] = field(default_factory=list)
    # one matched-KL section per run condition the table's columns are measured under (e.g. each
    # label-noise level: methods are compared on runs of the same level), or one section for all runs
    frontiers: list[FrontierSection] = field(default_factory=list)

    @property
    def matched_orderings(self) -> list[MatchedOrdering]:
        return [o for section in self.frontiers for o in section.orderings]

    @property
    def failures(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)


def _norm_label(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def match_score(method: Method, row, label: str) -> float:
    """How well our method fits a paper row: matched settings, +0.5 when the label is the row's."""
    run = method.runs[0]
    score = 0.0
    if row.match:
        if all(run.has_setting(k, v) for k, v in row.match.items()):
            score += len(row.match)
        else:
            return 0.5 if _norm_label(label) == _norm_label(row.method) else 0.0
    if _norm_label(label) == _norm_label(row.method):
        score += 0.5
    return score


def assign_rows(methods: Sequence[Method], table: PaperTable) -> dict[int, str | None]:
    """Our method index -> the paper row it matches best (None when none fits)."""
    out: dict[int, str | None] = {}
    for i, method in enumerate(methods):
        scores = [(match_score(method, row, method.label), -j, row.method) for j, row in enumerate(table.rows)]
        best = max(scores, default=(0.0, 0, None))
        out[i] = best[2] if best[0] > 0 else None
    return out


def discover_metrics(methods: Sequence[Method]) -> list[MetricSpec]:
    keys = sorted({k for m in methods for r in m.runs for k in r.metrics})
    return [MetricSpec(name=k, key=k) for k in keys]


def build_report(source: str, runs: list[Run], table: PaperTable | None,
                 ignore: Sequence[str] = DEFAULT_IGNORE, baseline: str | None = "DPO",
                 budgets: Sequence[float] | None = None, n_resamples: int = fr.N_RESAMPLES) -> Report:
    ignore = list(ignore)
    if table is not None:
        # a column's `where` setting (e.g. the label-noise level) is not part of a method's identity
        ignore += [k for metric in table.metrics for k in metric.where]
    methods = group_methods(runs, ignore)
    ok_runs = [r for r in runs if r.ok]
    paper_scale = bool(ok_runs) and all(r.scale == "paper" for r in ok_runs)
    metrics = list(table.metrics) if table else discover_metrics(methods)
    if table is not None and not paper_scale:
        metrics = [effective_metric(m, methods) for m in metrics]

    def ours(method: Method) -> dict[str, Stat | None]:
        return {m.name: Stat.of(method.values(m.keys, m.where, m.ours_scale)) for m in metrics}

    launched = launched_jobs(runs, ignore)
    unfinished = unfinished_methods(runs, ignore)
    rows: list[ReportRow] = []
    if table is None:
        rows = [ReportRow(m.label, None, m, ours(m), launched=len(launched[m.identity])) for m in methods]
        rows += [ReportRow(m.label, None, None, launched=len(m.runs)) for m in unfinished]
    else:
        assigned = assign_rows(methods, table)
        assigned_unfinished = assign_rows(unfinished, table)
        for paper_row in table.rows:
            mine = [methods[i] for i, name in assigned.items() if name == paper_row.method]
            never = sum(len(unfinished[i].runs) for i, name in assigned_unfinished.items() if name == paper_row.method)
            if not mine:
                rows.append(ReportRow(paper_row.method, paper_row.method, None, {}, dict(paper_row.values),
                                      launched=never))
            for method in mine:
                label = paper_row.method if len(mine) == 1 else f"{paper_row.method} [{method.label}]"
                rows.append(ReportRow(label, paper_row.method, method, ours(method), dict(paper_row.values),
                                      launched=len(launched[method.identity])))
        rows += [ReportRow(methods[i].label, None, methods[i], ours(methods[i]),
                           launched=len(launched[methods[i].identity]))
                 for i, name in assigned.items() if name is None]
        rows += [ReportRow(unfinished[i].label, None, None, launched=len(unfinished[i].runs))
                 for i, name in assigned_unfinished.items() if name is None]
    report = Report(source, runs, methods, metrics, rows, table, paper_scale)
    if table is not None:
        by_name = {m.name: m for m in metrics}
        report.orderings = [evaluate_ordering(o, table, rows, by_name[o.metric]) for o in table.orderings]
    report.frontiers = build_frontiers(report, ignore, baseline, budgets, n_resamples)
    return report


def launched_jobs(runs: Sequence[Run], ignore: Sequence[str]) -> dict[tuple, list[Run]]:
    """Every job (finished, failed, interrupted, missing) by method identity."""
    out: dict[tuple, list[Run]] = {}
    for run in runs:
        out.setdefault(method_identity(run, ignore), []).append(run)
    return out


def unfinished_methods(runs: Sequence[Run], ignore: Sequence[str]) -> list[Method]:
    """Identities launched but with no finished job: shown as rows with 0 of k runs."""
    finished = {method_identity(r, ignore) for r in runs if r.ok}
    return [Method(members[0].label or overrides_label(identity), identity, members)
            for identity, members in launched_jobs(runs, ignore).items() if identity not in finished]


# ---------------------------------------------------------------- matched KL


def frontier_labels(report: Report, ignore: Sequence[str]) -> dict[int, str]:
    """id(run) -> its frontier method: the paper row (or our label), seeds *and β values* pooled."""
    pooled = group_methods(report.runs, [*ignore, *BETA_KEYS])
    assigned = assign_rows(pooled, report.table) if report.table is not None else {}
    labels = {}
    for i, method in enumerate(pooled):
        name = assigned.get(i) or method.label
        for run in method.runs:
            labels[id(run)] = name
    return labels


def _find_label(labels: Sequence[str], wanted: str | None) -> str | None:
    if wanted is None:
        return None
    for label in labels:
        if _norm_label(label) == _norm_label(wanted):
            return label
    return None


def table_conditions(report: Report) -> list[dict[str, Any]]:
    """The run settings the table's columns are measured under (each column's ``where``, e.g. one
    label-noise level per column), each once; [{}] when no column has one."""
    seen: list[dict[str, Any]] = []
    for metric in report.metrics:
        if metric.where and dict(metric.where) not in seen:
            seen.append(dict(metric.where))
    return seen or [{}]


def build_frontiers(report: Report, ignore: Sequence[str], baseline: str | None = "DPO",
                    budgets: Sequence[float] | None = None, n_resamples: int = fr.N_RESAMPLES) -> list[FrontierSection]:
    """One matched-KL section per table condition. Pooling runs of different conditions (label-noise
    levels) into one method's curve would compare methods across conditions, so each condition's runs
    get their own frontier, budgets and verdicts; a claim on a column is judged in its column's."""
    labels = frontier_labels(report, ignore)
    sections = []
    for condition in table_conditions(report):
        runs = [r for r in report.runs if r.ok and all(r.has_setting(k, v) for k, v in condition.items())]
        section = build_frontier(runs, labels, baseline, budgets, n_resamples)
        section.condition = condition
        sections.append(section)
    if report.table is not None:
        for ordering in report.table.orderings:
            column = next(m for m in report.metrics if m.name == ordering.metric)
            section = next((s for s in sections if s.condition in ({}, dict(column.where or {}))), None)
            if section is not None and not section.empty:
                matched = matched_ordering(ordering, report, section)
                if matched is not None:
                    section.orderings.append(matched)
    return sections


def build_frontier(runs: Sequence[Run], labels: dict[int, str], baseline: str | None = "DPO",
                   budgets: Sequence[float] | None = None, n_resamples: int = fr.N_RESAMPLES) -> FrontierSection:
    points = fr.frontier_points(runs, lambda run: labels.get(id(run)))
    methods = list(dict.fromkeys(points["method"]))
    baseline = _find_label(methods, baseline)
    chosen = fr.kl_budgets(points) if budgets is None else np.asarray(list(budgets), float)
    table = fr.matched_kl_table(points, chosen, baseline, n_resamples=n_resamples)
    return FrontierSection(points, [float(b) for b in chosen], table, baseline, fr.has_curves(points),
                           [m for m in methods if fr.method_basis(points[points["method"] == m]) == fr.POOLED],
                           oracles=[m for m in methods if "oracle" in m.lower()], n_resamples=n_resamples)


def matched_ordering(ordering: Ordering, report: Report, section: FrontierSection) -> MatchedOrdering | None:
    """The claim at each KL budget; None when its column is not on the frontier (not reward or safe rate)."""
    if ordering.drop_from is not None:
        return None
    column = next(m for m in report.metrics if m.name == ordering.metric)
    curve_metric = next((FRONTIER_KEYS[k] for k in column.keys if k in FRONTIER_KEYS), None)
    if curve_metric is None:
        return None
    result = MatchedOrdering(ordering, column, curve_metric, "not evaluated", budgets=len(section.budgets))
    present = set(section.points["method"])
    if ordering.chain:
        needed = list(ordering.chain)
        links = list(zip(needed, needed[1:]))
    else:
        pool = list(ordering.among) if ordering.among else [r.method for r in report.table.rows]
        needed = [ordering.best] + [m for m in pool if m != ordering.best and m in present]
        links = [(ordering.best, m) for m in needed[1:]]
    missing = [m for m in needed if m not in present]
    if missing or not links:
        result.detail = ", ".join(f"{m} (no KL data)" for m in missing) or "no other method to compare with"
        return result
    diffs = fr.link_differences(section.points, links, curve_metric, section.budgets, section.n_resamples)
    sign = 1.0 if column.direction == "up" else -1.0
    parts = []
    for budget, at in diffs.groupby("kl_budget", sort=True):
        gaps = sign * at["diff"].to_numpy(float)
        lows = np.where(sign > 0, at["low"], -at["high"]).astype(float)
        if not np.isfinite(gaps).all():
            parts.append(f"KL {budget:.3g}: no data")
            continue
        holds = bool((gaps > 0).all())
        clear = holds and bool(np.isfinite(lows).all() and (lows > 0).all())
        result.holds += holds
        result.clear += clear
        weakest = at.iloc[int(np.argmin(gaps))]
        parts.append(f"KL {budget:.3g}: {'✓' if holds else '✗'} weakest {weakest['a']} − {weakest['b']} "
                     f"{weakest['diff']:+.3g} [{weakest['low']:+.3g}, {weakest['high']:+.3g}]")
    result.detail = "; ".join(parts)
    result.status = ("reproduced" if result.holds == result.budgets else
                     "not reproduced" if result.holds == 0 else "mixed")
    return result


def effective_metric(metric: MetricSpec, methods: Sequence[Method]) -> MetricSpec:
    """Below the paper's scale, a paper metric none of our runs logged is read from its stand-in.

    The built-in task has no MT-Bench or GSM8K; a table may name the built-in metric that measures
    the same property (``stand_in``), so the paper's orderings can still be checked on it.
    """
    if metric.stand_in is None or any(m.values(metric.keys, metric.where) for m in methods):
        return metric
    return metric.with_stand_in()


# ---------------------------------------------------------------- orderings


def evaluate_ordering(ordering: Ordering, table: PaperTable, rows: Sequence[ReportRow],
                      metric: MetricSpec | None = None) -> OrderingResult:
    """Check one claim on our means; ``metric`` is the column as the report reads it (maybe a stand-in)."""
    column = metric or table.metric(ordering.metric)
    metric = ordering.judged_metric(column)
    start = ordering.drop_from

    def judged(values: dict[str, Any]) -> float | None:
        """The ranked quantity from one row's column values (paper numbers or our means)."""
        end = values.get(column.name)
        if start is None or end is None:
            return end
        return None if values.get(start) is None else values[start] - end

    paper_values = {row.method: judged(row.values) for row in table.rows}
    ours_by_row: dict[str, list[ReportRow]] = {}
    for row in rows:
        if row.paper_method and row.method is not None:
            ours_by_row.setdefault(row.paper_method, []).append(row)

    def our_value(name: str) -> float | None | str:
        found = ours_by_row.get(name, [])
        if len(found) > 1:
            return "ambiguous"
        return judged({k: v.mean for k, v in found[0].ours.items() if v is not None}) if found else None

    def our_standard_error(name: str) -> float:
        """Standard error of the ranked mean (a drop: of the difference of two independent means)."""
        stats = ours_by_row[name][0].ours
        used = [column.name] + ([start] if start else [])
        return math.sqrt(sum(stats[c].std ** 2 / stats[c].n for c in used))

    paper_holds = _holds(ordering, metric, paper_values, table)
    ours = {name: our_value(name) for name in (r.method for r in table.rows)}
    if ordering.chain:
        needed = list(ordering.chain)
    else:
        pool = list(ordering.among) if ordering.among else [r.method for r in table.rows]
        needed = [ordering.best] + [m for m in pool if m != ordering.best and isinstance(ours[m], float)]
    missing = [m for m in needed if not isinstance(ours[m], float)]
    if missing or len(needed) < 2:
        why = ", ".join(f"{m} ({'several runs match' if ours[m] == 'ambiguous' else 'no result'})" for m in missing)
        return OrderingResult(ordering, column, "not evaluated", why or "no other method to compare with",
                              paper_holds)
    values = {m: ours[m] for m in needed}
    holds = _holds(ordering, metric, values, table, among=needed)
    detail = _detail(ordering, metric, values, needed)
    links = (list(zip(ordering.chain, ordering.chain[1:])) if ordering.chain
             else [(ordering.best, m) for m in needed if m != ordering.best])
    separations = []
    for better, worse in links:
        gap = values[better] - values[worse] if metric.direction == "up" else values[worse] - values[better]
        se = math.hypot(our_standard_error(better), our_standard_error(worse))
        if math.isnan(se):   # a single seed: no spread to compare the gap with
            separations = []
            break
        if se > 0:
            separation = gap / se
        else:   # identical values in every seed: any gap is exact
            separation = 0.0 if gap == 0 else math.copysign(math.inf, gap)
        separations.append((better, worse, separation))
    weakest = min(separations, key=lambda link: link[2]) if separations else None
    return OrderingResult(ordering, column, "reproduced" if holds else "not reproduced", detail, paper_holds, weakest)


def _holds(ordering: Ordering, metric: MetricSpec, values: dict[str, Any], table: PaperTable,
           among: Sequence[str] | None = None) -> bool | None:
    if ordering.chain:
        chain = [values.get(m) for m in ordering.chain]
        if any(not isinstance(v, float) for v in chain):
            return None
        return all(metric.better(a, b) for a, b in zip(chain, chain[1:]))
    pool = among or (list(ordering.among) if ordering.among else [r.method for r in table.rows])
    best = values.get(ordering.best)
    others = [values.get(m) for m in pool if m != ordering.best and isinstance(values.get(m), float)]
    if not isinstance(best, float) or not others:
        return None
    return all(metric.better(best, v) for v in others)


def _detail(ordering: Ordering, metric: MetricSpec, values: dict[str, float], needed: Sequence[str]) -> str:
    if ordering.chain:
        parts = [f"{ordering.chain[0]} {values[ordering.chain[0]]:.4g}"]
        for a, b in zip(ordering.chain, ordering.chain[1:]):
            mark = "✓" if metric.better(values[a], values[b]) else "✗"
            parts.append(f"{mark} {b} {values[b]:.4g}")
        return " ".join(parts)
    best = ordering.best
    beaten = [f"{'✓' if metric.better(values[best], values[m]) else '✗'} {m} {values[m]:.4g}"
              for m in needed if m != best]
    return f"{best} {values[best]:.4g} vs " + ", ".join(beaten)


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


def oracle_lines(section: FrontierSection) -> list[str]:
    """The oracle control's message: without a matched-KL gain over the baseline, this task variant
    cannot show what token weighting buys."""
    if not section.oracles or section.baseline is None or section.empty:
        return []
    lines = []
    for oracle in section.oracles:
        if fr.beats_baseline(section.table, oracle):
            budgets = section.table[(section.table["method"] == oracle) & (section.table["metric"] == "true_reward")
                                    & (section.table["verdict"] == fr.BETTER)]["kl_budget"]
            lines.append(f"- The oracle control **{oracle}** beats {section.baseline} at matched KL "
                         f"(KL {', '.join(f'{b:.3g}' for b in budgets)}): this task variant leaves room for "
                         "token weighting to show a gain.")
        else:
            lines.append(f"- **Warning: the oracle control {oracle} does not beat {section.baseline} at matched KL** "
                         "(no KL budget where its true-reward CI is above the baseline's). Even true token "
                         "weights give no measurable gain on this task variant, so it cannot show token-weighting "
                         "gains: a tie or loss of the estimated-weight methods here says nothing about the papers' "
                         "claims.")
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
        lines += [f"### {section.heading}", "", *[line.replace("### The paper's", "#### The paper's") for line in body]]
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
    lines += [f"Each method's true reward and safe rate at {len(section.budgets)} KL budgets "
              f"({', '.join(f'{b:.3g}' for b in section.budgets)} nats) inside the range every method reached "
              f"({n_methods} methods). Per seed, the points of every evaluation (and every β) are joined by "
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
    for metric in fr.METRICS:
        frame = matched_kl_frame(section, metric)
        if len(frame):
            lines += ["", f"**{fr.METRIC_LABELS[metric]}** at matched KL:", "", to_markdown(frame)]
    oracle = oracle_lines(section)
    if oracle:
        lines += ["", *oracle]
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
                  f"![safe rate vs KL](plots/frontier_safe_rate{section.suffix}.png)"]
    return lines + [""]


def runs_frame(report: Report) -> pd.DataFrame:
    label_of = {id(run): m.label for m in report.methods for run in m.runs}
    records = []
    for run in report.runs:
        records.append({"job": run.run_id, "status": run.status, "method": label_of.get(id(run), ""),
                        "seed": run.seed, **run.metrics})
    return pd.DataFrame.from_records(records)


def render_markdown(report: Report, digits: int = 2, figures: bool = True) -> str:
    lines = [f"# Report: {report.table.title if report.table else 'all logged metrics'}", "",
             f"- Source: `{report.source}`; {jobs_summary(report)}; {len(report.methods)} methods.",
             f"- Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."]
    if report.table is not None:
        t = report.table
        lines += [f"- Paper: {t.source}. Model: {t.model}. Data: {t.dataset}."]
        if report.paper_scale:
            lines.append("- Every run says `scale: paper`: the paper's numbers sit beside ours.")
        else:
            lines.append("- Our runs are not at the paper's scale (`scale: paper` absent): the paper's numbers "
                         f"({t.model}) are in the \"(paper, ref.)\" columns for reference, not comparison.")
        if t.notes:
            lines.append(f"- Note: {t.notes}")
    lines += ["", *render_matched_kl_sections(report.frontiers, figures)]
    lines += ["## Table (at the paper's hyperparameters)", "", to_markdown(display_frame(report, digits)), "",
              "Cells: mean ± sample std over seeds (ddof=1), in the paper's unit; `(n=k)` when a cell "
              "has fewer values than the method has runs; `-`: no value. `runs`: finished seeds, `k/n` when "
              "only k of the n jobs launched for the method finished (see \"Failed or unfinished jobs\")."]
    if report.table is not None:
        lines += ["", "Metric keys: " + "; ".join(
            f"{m.name} = `{'` or `'.join(m.keys)}`" + (f" ×{m.ours_scale:g}" if m.ours_scale != 1 else "")
            + (f" where {m.where}" if m.where else "")
            + (f" (built-in task stand-in: {m.stand_in.label})" if m.standing_in else "") for m in report.metrics)]
        stand_ins = [m for m in report.metrics if m.standing_in]
        if stand_ins:
            lines += ["", "Stand-ins: no run logged " + ", ".join(m.name for m in stand_ins) + ", so those columns "
                      "and the orderings on them read the built-in task's metric named in [brackets], which "
                      "measures the same property (same direction). The paper's numbers beside them are on the "
                      "paper's own scale and are not comparable in value, only in order."]
        lines += ["", "## Orderings claimed by the paper, at the paper's hyperparameters", "",
                  "Each method at its own final KL (not matched): see the matched-KL section for the verdicts.", ""]
        if report.orderings:
            counts = {s: sum(r.status == s for r in report.orderings)
                      for s in ("reproduced", "not reproduced", "not evaluated")}
            clear = sum(r.status == "reproduced" and r.clear_of_noise for r in report.orderings)
            lines += [f"{counts['reproduced']} reproduced ({clear} with every link more than {SEPARATION:g} standard "
                      f"errors apart), {counts['not reproduced']} not reproduced, "
                      f"{counts['not evaluated']} not evaluated (of {len(report.orderings)}).", "",
                      to_markdown(orderings_frame(report)), "",
                      "Reproduced: every link of the claim holds on our means. Weakest link: the claimed "
                      "comparison our runs support least, as the gap between the two means in standard errors "
                      "of their difference (negative: the other way round); a description of seed noise, not a "
                      "significance test."]
        else:
            lines.append("The table records no orderings.")
        if report.table.claims:
            lines += ["", "Other claims (not computed):", *[f"- {c}" for c in report.table.claims]]
    lines += ["", "## Failed or unfinished jobs", ""]
    if report.failures:
        if report.count("interrupted"):
            lines += [f"{report.count('interrupted')} interrupted by a signal (preemption, SIGTERM, Ctrl-C): not "
                      "failures of the method; `resume=true` (same overrides) continues them from the last "
                      "checkpoint.", ""]
        if report.count("missing"):
            lines += [f"{report.count('missing')} missing: launched or planned by the sweep but with no job dir.", ""]
        lines.append(to_markdown(failures_frame(report)))
    else:
        lines.append("None.")
    lines += ["", "## Methods", ""]
    for method in report.methods:
        seeds = ", ".join(str(r.seed) for r in method.runs)
        lines.append(f"- **{method.label}**: {len(method.runs)} runs (seeds {seeds}); "
                     + (", ".join(f"{k}={v}" for k, v in method.identity) or "no overrides"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI


def resolve_table(name: str | None, runs: Sequence[Run]) -> PaperTable | None:
    """``--table``, else the ``paper_table`` every run's config names (experiment configs may set it)."""
    if name:
        return load_paper_table(name)
    named = set()
    for run in runs:
        experiment = run.config.get("experiment")
        named.add(run.config.get("paper_table")
                  or (experiment.get("paper_table") if isinstance(experiment, dict) else None))
    if len(named) == 1 and None not in named:
        return load_paper_table(named.pop())
    return None


def default_out_dir(source: str) -> Path:
    if source.startswith("wandb:"):
        return Path("reports") / source[len("wandb:"):].replace("/", "_")
    return Path(source) / "report"


def write_report(report: Report, out: Path, digits: int = 2, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def write(name: str, text: str) -> None:
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)

    write("report.md", render_markdown(report, digits, figures=plots and any(not f.empty for f in report.frontiers)))
    write("table.md", to_markdown(display_frame(report, digits)) + "\n")
    numeric_frame(report).to_csv(out / "table.csv", index=False)
    written.append(out / "table.csv")
    write("table.tex", to_latex(report, digits))
    if report.table is not None:
        orderings_frame(report).to_csv(out / "orderings.csv", index=False)
        written.append(out / "orderings.csv")
    runs_frame(report).to_csv(out / "runs.csv", index=False)
    written.append(out / "runs.csv")
    if report.frontiers:
        matched_kl_csv(report.frontiers).to_csv(out / "matched_kl.csv", index=False)
        written.append(out / "matched_kl.csv")
    if plots:
        from .plots import make_plots

        display = {row.method.label: row.label for row in report.rows if row.method is not None}
        written += make_plots(report.runs, report.methods, out / "plots", display)
        written += frontier_plots(report, out / "plots")
    return written


def matched_kl_csv(sections: Sequence[FrontierSection]) -> pd.DataFrame:
    """Every section's matched-KL table; a ``condition`` column when the table has conditions."""
    if len(sections) == 1 and not sections[0].condition:
        return sections[0].table
    return pd.concat([s.table.assign(condition=s.heading) for s in sections], ignore_index=True)


def frontier_plots(report: Report, out_dir: Path) -> list[Path]:
    """``frontier_<metric>[<condition>].png`` per frontier metric with data, per condition."""
    from .plots import plot_frontier

    title = report.table.name if report.table else "runs"
    written = []
    for section in report.frontiers:
        if not len(section.points):
            continue
        where = f" ({section.heading})" if section.condition else ""
        for metric in fr.METRICS:
            if np.isfinite(section.points[metric].astype(float)).any():
                written.append(plot_frontier(
                    section.points, metric, out_dir / f"frontier_{metric}{section.suffix}.png", section.budgets,
                    f"{title}{where}: {fr.METRIC_LABELS[metric]} vs KL (mean, min–max over seeds; x = final points)"))
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a Hydra multirun dir (or any dir of job dirs), or "
                                       "wandb:<entity>/<project>[/<group>]")
    parser.add_argument("--table", help=f"paper table: {', '.join(list_paper_tables())} (or a YAML path)")
    parser.add_argument("--out", type=Path, help="output dir (default: <source>/report or reports/<entity>_<project>)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help=f"override keys (globs) that do not define a method; always: {', '.join(DEFAULT_IGNORE)}")
    parser.add_argument("--digits", type=int, default=2, help="decimals in the formatted tables")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--baseline", default="DPO", help="matched-KL verdicts are against this method (default DPO)")
    parser.add_argument("--budgets", type=_floats, metavar="KL,KL,...",
                        help=f"matched-KL budgets in nats (default: {fr.N_BUDGETS} inside the common KL range)")
    parser.add_argument("--resamples", type=int, default=fr.N_RESAMPLES, help="bootstrap resamples for the CIs")
    parser.add_argument("--scale", help="only runs at this scale (config `scale`): W&B filter, and kept locally")
    parser.add_argument("--wandb", action="store_true",
                        help="also build the table's W&B report (offline: <out>/wandb_report.json, never the network)")
    parser.add_argument("--wandb-group", help="W&B group of the sweep (or give wandb:<entity>/<project>/<group>)")
    parser.add_argument("--wandb-entity", help="W&B entity of the dashboard (default: the source's)")
    parser.add_argument("--wandb-project", help="W&B project of the dashboard (default: the source's or the runs')")
    return parser.parse_args(argv)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = collect_runs(args.source, group=args.wandb_group, table=args.table, scale=args.scale)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.scale and not args.source.startswith("wandb:"):
        runs = [r for r in runs if r.scale in (None, args.scale)]
    if not runs:
        print(f"error: no job dirs (with .hydra/ or results.json) under {args.source}", file=sys.stderr)
        return 2
    try:
        table = resolve_table(args.table, runs)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: --table: {error}", file=sys.stderr)
        return 2
    report = build_report(args.source, runs, table, [*DEFAULT_IGNORE, *args.ignore], baseline=args.baseline,
                          budgets=args.budgets, n_resamples=args.resamples)
    out = args.out or default_out_dir(args.source)
    write_report(report, out, args.digits, plots=not args.no_plots)
    dashboard = None
    if args.wandb:
        from .dashboard import DashboardError, write_dashboard

        try:
            dashboard = write_dashboard(report, out, group=args.wandb_group, entity=args.wandb_entity,
                                        project=args.wandb_project, plots=not args.no_plots)
        except DashboardError as error:
            print(f"error: --wandb: {error}", file=sys.stderr)
            return 2
    reproduced = sum(r.status == "reproduced" for r in report.orderings)
    matched = report.matched_orderings
    print(f"{len(runs)} jobs, {len(report.methods)} methods, {report.count('failed')} failed, "
          f"{report.count('interrupted')} interrupted, {report.count('missing')} missing; "
          + (f"at matched KL reproduced {sum(o.status == 'reproduced' for o in matched)}/{len(matched)}; "
             if matched else "")
          + (f"orderings reproduced {reproduced}/{len(report.orderings)}; " if table else "")
          + (f"W&B report {dashboard}; " if dashboard else "")
          + f"report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
