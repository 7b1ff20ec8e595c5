"""Aggregate seeds and write the paper's table with our numbers, the orderings check and failures.

    python -m experiments.report <multirun dir | wandb:entity/project[/group]> [--table NAME] [--out DIR]
                                 [--baseline DPO] [--budgets 1,2,4] [--wandb] [--wandb-group G] [--scale S]
                                 [--controls DIR] [--oracle LABEL] [--cost method_cost.csv]

Writes ``report.md`` (everything), ``table.md``, ``table.csv`` (mean/std/n per metric, and the
paper's value), ``table.tex``, ``orderings.csv``, ``matched_kl.csv``, ``runs.csv`` and PNGs under
``plots/`` (``frontier_true_reward.png``, ``frontier_safe_rate.png``, ...); with ``--wandb`` also the
table's W&B report (``wandb_report.json`` offline, see :mod:`experiments.dashboard`). With an oracle
control and the baseline among the methods, also the ranking by share of the oracle's gain at matched
KL (``ranking.csv``, ``oracle_share.csv``), with each method's token-weight quality and, given
``--cost`` (``python -m bench.method_cost``), its cost relative to DPO.

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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import frontier as fr
from .collect import DEFAULT_IGNORE, Method, Run, Stat, collect_runs, group_methods, method_identity, overrides_label
from .dashboard import DashboardError, write_dashboard
from .paper import MetricSpec, Ordering, PaperTable, list_paper_tables, load_paper_table
from .report_model import (RANK_METRIC, SEPARATION, FrontierSection, MatchedOrdering, OrderingResult, Report,
                           ReportRow)
from .report_views import (display_frame, failures_frame, frontier_plots, jobs_summary, numeric_frame, orderings_frame,
                           render_matched_kl_sections, to_latex, to_markdown)

# ---------------------------------------------------------------- building the report

BETA_KEYS = ("loss.beta", "beta")   # a β sweep is more points on one method's frontier, not another method
FRONTIER_KEYS = {"eval/true_reward": "true_reward", "eval/safe_rate": "safe_rate"}   # paper column key -> curve key


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
                 budgets: Sequence[float] | None = None, n_resamples: int = fr.N_RESAMPLES,
                 controls: Sequence[Run] = (), oracle: str | None = None, cost: pd.DataFrame | None = None,
                 cost_source: str | None = None) -> Report:
    """``controls``: finished runs of another sweep on the same task (the oracle, random and uniform
    weights) that join the matched-KL sections as extra methods, labelled "<label> (control)"; never
    the paper rows. ``oracle``: the oracle the ranking's shares are against (default: see
    :func:`reference_oracle`); ``cost``: :func:`read_cost`'s frame of ``cost_source`` (the ranking's
    cost columns)."""
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
    report.frontiers = build_frontiers(report, ignore, baseline, budgets, n_resamples, controls, oracle,
                                       cost, cost_source)
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
                    budgets: Sequence[float] | None = None, n_resamples: int = fr.N_RESAMPLES,
                    controls: Sequence[Run] = (), oracle: str | None = None, cost: pd.DataFrame | None = None,
                    cost_source: str | None = None) -> list[FrontierSection]:
    """One matched-KL section per table condition. Pooling runs of different conditions (label-noise
    levels) into one method's curve would compare methods across conditions, so each condition's runs
    get their own frontier, budgets and verdicts; a claim on a column is judged in its column's.
    ``controls`` (another sweep's control runs) join the unconditioned section. A section with an
    oracle and the baseline gets its ranking (:func:`add_ranking`, ``cost`` from :func:`read_cost`)."""
    labels = frontier_labels(report, ignore)
    mine = {r.label for r in report.runs}
    extra = [r for r in controls if r.ok and r.label and r.label not in mine]
    labels.update({id(r): f"{r.label} (control)" for r in extra})
    sections = []
    for condition in table_conditions(report):
        runs = [r for r in report.runs if r.ok and all(r.has_setting(k, v) for k, v in condition.items())]
        runs += [r for r in extra if all(r.has_setting(k, v) for k, v in condition.items())] if not condition else []
        section = build_frontier(runs, labels, baseline, budgets, n_resamples, oracle,
                                 controls_span=report.table is None)
        section.condition = condition
        add_ranking(section, runs, labels, cost, cost_source)
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
                   budgets: Sequence[float] | None = None, n_resamples: int = fr.N_RESAMPLES,
                   oracle: str | None = None, controls_span: bool = False) -> FrontierSection:
    """One matched-KL section; with an oracle control and the baseline, each method's share of the
    oracle's gain too (``oracle_shares``, against :func:`reference_oracle`).

    Budgets default to the KL range every method reached. With ``controls_span`` (a comparison with no
    paper table, whose claims would need every method at each budget) and both the baseline and an
    oracle present, they span the range those two reach instead: one method that barely moves (TI-DPO
    stops near KL 0.2 on the credit task) would otherwise pin every verdict to a range where even the
    oracle cannot be told from DPO. Methods that stop short have no value at the budgets beyond them
    (``FrontierSection.short``)."""
    points = fr.frontier_points(runs, lambda run: labels.get(id(run)))
    methods = list(dict.fromkeys(points["method"]))
    baseline = _find_label(methods, baseline)
    oracles = [m for m in methods if "oracle" in m.lower()]
    reference = reference_oracle(oracles, oracle)
    span = ([baseline, reference] if controls_span and budgets is None and baseline and reference else None)
    if budgets is not None:
        chosen = np.asarray(list(budgets), float)
    else:
        chosen = fr.kl_budgets(points if span is None else points[points["method"].isin(span)])
    table = fr.matched_kl_table(points, chosen, baseline, n_resamples=n_resamples)
    optimal = fr.optimal_curve([r.optimal_frontier for r in runs if labels.get(id(r)) is not None])
    section = FrontierSection(points, [float(b) for b in chosen], table, baseline, fr.has_curves(points),
                              [m for m in methods if fr.method_basis(points[points["method"] == m]) == fr.POOLED],
                              oracles=oracles, n_resamples=n_resamples,
                              optimal=optimal, shares=fr.gain_shares(points, optimal, chosen))
    section.span = span
    if len(chosen):
        reach = points.groupby("method")["kl"].max()
        section.short = {m: float(reach[m]) for m in methods if reach[m] < float(np.max(chosen)) - 1e-12}
    section.oracle = reference
    if section.oracle is not None and baseline is not None and not section.empty:
        section.oracle_shares = fr.oracle_share_table(points, section.budgets, baseline, section.oracle,
                                                      n_resamples=n_resamples)
    return section


#: the oracle a ranking is against by default: TIS-DPO with the true token rewards as weights
DEFAULT_ORACLE = "TIS-DPO(oracle)"


def reference_oracle(oracles: Sequence[str], wanted: str | None = None) -> str | None:
    """The oracle the shares are against: ``wanted`` (with or without " (control)") if it is one of
    ``oracles``, else :data:`DEFAULT_ORACLE` (idem) if present, else the first; None without one."""
    for name in (wanted, DEFAULT_ORACLE):
        found = _find_label(oracles, name) or _find_label(oracles, f"{name} (control)" if name else None)
        if found is not None:
            return found
    return oracles[0] if oracles and wanted is None else None


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


# ---------------------------------------------------------------- the ranking (share of the oracle's gain)

WEIGHT_QUALITY_KEYS = {"spearman_chosen": "weights/spearman_chosen", "spearman_rejected": "weights/spearman_rejected",
                       "auroc_chosen": "weights/auroc_chosen", "auroc_rejected": "weights/auroc_rejected"}
#: every offline estimator's run logs it (tisdpo/stages/weights.py); online weights (TI-DPO, OTPO) do not, and
#: their quality is measured against |true reward| on a probe (tisdpo/eval/gradient_weight_quality.py)
OFFLINE_WEIGHTS_KEY = "weights/bound_fraction"
SIGNED, ABSOLUTE = "signed", "abs"
COST_RATIOS = ("wall_ratio", "cpu_ratio", "peak_rss_ratio")   # bench/method_cost.py's columns, x DPO
OPTIONAL_COST_RATIOS = ("train_ratio",)


def weight_quality_frame(runs: Sequence[Run], labels: dict[int, str]) -> pd.DataFrame:
    """Per method (``labels[id(run)]``): the mean over its finished runs of each token-weight quality
    metric (Spearman, AUROC against the true token rewards, chosen and rejected; NaN where no run
    logged it), ``weight_runs`` (runs that logged any) and ``weight_target`` (:data:`SIGNED`: offline
    weights as the loss uses them vs the true reward; :data:`ABSOLUTE`: online weights vs |reward|;
    "" without weights)."""
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        if run.ok and labels.get(id(run)) is not None:
            by_method.setdefault(labels[id(run)], []).append(run)
    records = []
    for method, members in by_method.items():
        measured = [r for r in members if any(k in r.metrics for k in WEIGHT_QUALITY_KEYS.values())]
        record: dict[str, Any] = {"method": method, "weight_runs": len(measured),
                                  "weight_target": "" if not measured else
                                  SIGNED if all(OFFLINE_WEIGHTS_KEY in r.metrics for r in measured) else ABSOLUTE}
        for column, key in WEIGHT_QUALITY_KEYS.items():
            values = [r.metrics[key] for r in measured if math.isfinite(r.metrics.get(key, math.nan))]
            record[column] = float(np.mean(values)) if values else math.nan
        records.append(record)
    return pd.DataFrame.from_records(records, columns=["method", *WEIGHT_QUALITY_KEYS, "weight_runs", "weight_target"])


def read_cost(path: Path) -> pd.DataFrame:
    """``bench/method_cost.py``'s CSV (or TSV): one row per ``method`` (its config name, e.g.
    ``tisdpo_d``) with its ``label`` and the :data:`COST_RATIOS` to DPO. ValueError if it is not one."""
    try:
        frame = pd.read_csv(path, sep=None, engine="python")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from error
    missing = [c for c in ("method", *COST_RATIOS) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a bench/method_cost.py table (no column {', '.join(missing)})")
    if "label" not in frame.columns:
        frame["label"] = ""
    frame["label"] = frame["label"].fillna("").astype(str)
    frame["method"] = frame["method"].astype(str)
    return frame


def _method_names(runs: Sequence[Run], labels: dict[int, str]) -> dict[str, set[str]]:
    """Label -> the ``method=`` config names its runs were launched with."""
    names: dict[str, set[str]] = {}
    for run in runs:
        value = run.setting("method")
        if labels.get(id(run)) is not None and isinstance(value, str):
            names.setdefault(labels[id(run)], set()).add(value)
    return names


def cost_by_method(cost: pd.DataFrame, runs: Sequence[Run], labels: dict[int, str]) -> pd.DataFrame:
    """The cost ratios of each frontier method: the cost row with the method's label (a control's
    without its " (control)"), else the row of the one ``method=`` name its runs were launched with."""
    ratios = [c for c in (*COST_RATIOS, *OPTIONAL_COST_RATIOS) if c in cost.columns]
    names = _method_names(runs, labels)
    records = []
    for method in dict.fromkeys(labels[id(r)] for r in runs if labels.get(id(r)) is not None):
        plain = _norm_label(method.removesuffix(" (control)"))
        rows = cost[cost["label"].map(_norm_label) == plain]
        if not len(rows) and len(names.get(method, ())) == 1:
            rows = cost[cost["method"] == next(iter(names[method]))]
        if len(rows):
            records.append({"method": method, **{c: float(rows.iloc[0][c]) for c in ratios}})
    return pd.DataFrame.from_records(records, columns=["method", *ratios])


def share_columns(shares: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """The long share table, wide: one row per method, ``<metric> share|low|high|status KL <b>`` columns."""
    rows = shares[shares["metric"].isin(metrics)]
    if not len(rows):
        return pd.DataFrame(columns=["method"])
    records: dict[str, dict[str, Any]] = {}
    for row in rows.itertuples(index=False):
        record = records.setdefault(row.method, {"method": row.method})
        for field in ("share", "low", "high", "status"):
            record[f"{row.metric} {field} KL {row.kl_budget:.3g}"] = getattr(row, field)
    return pd.DataFrame.from_records(list(records.values()))


def ranking_frame(section: FrontierSection, quality: pd.DataFrame, cost: pd.DataFrame | None) -> pd.DataFrame:
    """One row per method, best first: its share of the oracle's gain in :data:`RANK_METRIC` at the
    middle budget (NaN last; ties and n/a broken by the share of the optimal frontier there), that
    share at every budget for every verdict metric, the share of the frontier, weight quality and cost."""
    budget = fr.middle_budget(section.budgets)
    shares = section.oracle_shares
    at = shares[(shares["metric"] == RANK_METRIC) & np.isclose(shares["kl_budget"], budget)].set_index("method")
    frontier = (section.shares[np.isclose(section.shares["kl_budget"], budget)].set_index("method")
                if section.shares is not None and len(section.shares) else pd.DataFrame())
    records = []
    for method in dict.fromkeys(section.points["method"]):
        role = "oracle" if method == section.oracle else "baseline" if method == section.baseline else ""
        record = {"method": method, "role": role, "rank_budget": budget,
                  "share": at["share"].get(method, math.nan), "share_low": at["low"].get(method, math.nan),
                  "share_high": at["high"].get(method, math.nan)}
        for column in ("share", "min", "max"):
            record[f"frontier_{column}"] = frontier[column].get(method, math.nan) if len(frontier) else math.nan
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    frame = frame.merge(quality, on="method", how="left")
    if cost is not None:
        frame = frame.merge(cost, on="method", how="left")
    frame = frame.merge(share_columns(shares, fr.VERDICT_METRICS), on="method", how="left")
    frame = frame.sort_values(["share", "frontier_share"], ascending=False, na_position="last", kind="stable")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame.reset_index(drop=True)


def add_ranking(section: FrontierSection, runs: Sequence[Run], labels: dict[int, str],
                cost: pd.DataFrame | None, cost_source: str | None) -> None:
    """Fill ``section.ranking`` (from the section's ``runs``, named by ``labels``) when the section has
    shares of an oracle's gain, i.e. an oracle control and the baseline."""
    if section.oracle_shares is None:
        return
    section.cost_source = cost_source if cost is not None else None
    section.ranking = ranking_frame(section, weight_quality_frame(runs, labels),
                                    cost_by_method(cost, runs, labels) if cost is not None else None)


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


# ---------------------------------------------------------------- report.md and runs.csv


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
    for name, frame in (("ranking.csv", ranking_csv(report.frontiers, "ranking")),
                        ("oracle_share.csv", ranking_csv(report.frontiers, "oracle_shares"))):
        if frame is not None:
            frame.to_csv(out / name, index=False)
            written.append(out / name)
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


def ranking_csv(sections: Sequence[FrontierSection], field: str) -> pd.DataFrame | None:
    """Every ranked section's ``ranking`` or ``oracle_shares`` frame (``field``); a ``condition``
    column when the table has conditions; None when no section has one."""
    ranked = [s for s in sections if getattr(s, field) is not None]
    if not ranked:
        return None
    if len(sections) == 1 and not ranked[0].condition:
        return getattr(ranked[0], field)
    return pd.concat([getattr(s, field).assign(condition=s.heading) for s in ranked], ignore_index=True)


#: the control methods' labels (conf/method/*.yaml): what perfect and uninformative weights do
CONTROL_LABELS = ("TIS-DPO(oracle)", "random weight", "equal weight")


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
    parser.add_argument("--controls", type=Path, metavar="DIR",
                        help="a sweep on the same task whose runs labelled --control-labels join the matched-KL "
                             "section (e.g. the oracle and random weights of experiment=variant_credit)")
    parser.add_argument("--control-labels", default=",".join(CONTROL_LABELS),
                        help=f"labels taken from --controls (default: {','.join(CONTROL_LABELS)})")
    parser.add_argument("--oracle", metavar="LABEL",
                        help=f"the oracle the ranking's shares of the oracle's gain are against (default: "
                             f"{DEFAULT_ORACLE} if present, else the first method labelled *oracle*)")
    parser.add_argument("--cost", type=Path, metavar="FILE",
                        help="python -m bench.method_cost's CSV: each method's time and peak memory relative to "
                             "DPO, as the ranking's cost columns (without it they are '-')")
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
    controls: list[Run] = []
    if args.controls is not None:
        wanted = {label.strip() for label in args.control_labels.split(",") if label.strip()}
        try:
            controls = [r for r in collect_runs(str(args.controls)) if r.label in wanted]
        except (FileNotFoundError, ValueError) as error:
            print(f"error: --controls: {error}", file=sys.stderr)
            return 2
    cost = None
    if args.cost is not None:
        try:
            cost = read_cost(args.cost)
        except ValueError as error:
            print(f"error: --cost: {error}", file=sys.stderr)
            return 2
    report = build_report(args.source, runs, table, [*DEFAULT_IGNORE, *args.ignore], baseline=args.baseline,
                          budgets=args.budgets, n_resamples=args.resamples, controls=controls, oracle=args.oracle,
                          cost=cost, cost_source=str(args.cost) if args.cost is not None else None)
    if args.oracle and not any(s.oracle for s in report.frontiers):
        print(f"warning: --oracle {args.oracle!r}: no method of that label (with 'oracle' in it): no ranking",
              file=sys.stderr)
    out = args.out or default_out_dir(args.source)
    write_report(report, out, args.digits, plots=not args.no_plots)
    dashboard = None
    if args.wandb:
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
