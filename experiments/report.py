"""Aggregate seeds and write the paper's table with our numbers, the orderings check and failures.

    python -m experiments.report <multirun dir | wandb:entity/project> [--table NAME] [--out DIR]

Writes ``report.md`` (everything), ``table.md``, ``table.csv`` (mean/std/n per metric, and the
paper's value), ``table.tex``, ``orderings.csv``, ``runs.csv`` and PNGs under ``plots/``.

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

import pandas as pd

from .collect import DEFAULT_IGNORE, Method, Run, Stat, collect_runs, group_methods
from .paper import MetricSpec, Ordering, PaperTable, list_paper_tables, load_paper_table

# ---------------------------------------------------------------- the table model

SEPARATION = 2.0   # a link is "clear of seed noise" when its gap exceeds this many standard errors


@dataclass
class ReportRow:
    label: str
    paper_method: str | None                 # the paper row it stands for
    method: Method | None                    # our runs (None: paper-only row)
    ours: dict[str, Stat | None] = field(default_factory=dict)
    paper: dict[str, float | None] = field(default_factory=dict)

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
class Report:
    source: str
    runs: list[Run]
    methods: list[Method]
    metrics: list[MetricSpec]
    rows: list[ReportRow]
    table: PaperTable | None = None
    paper_scale: bool = False
    orderings: list[OrderingResult] = field(default_factory=list)

    @property
    def failures(self) -> list[Run]:
        return [r for r in self.runs if not r.ok]


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
                 ignore: Sequence[str] = DEFAULT_IGNORE) -> Report:
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

    rows: list[ReportRow] = []
    if table is None:
        rows = [ReportRow(m.label, None, m, ours(m)) for m in methods]
    else:
        assigned = assign_rows(methods, table)
        for paper_row in table.rows:
            mine = [methods[i] for i, name in assigned.items() if name == paper_row.method]
            if not mine:
                rows.append(ReportRow(paper_row.method, paper_row.method, None, {}, dict(paper_row.values)))
            for method in mine:
                label = paper_row.method if len(mine) == 1 else f"{paper_row.method} [{method.label}]"
                rows.append(ReportRow(label, paper_row.method, method, ours(method), dict(paper_row.values)))
        rows += [ReportRow(methods[i].label, None, methods[i], ours(methods[i]))
                 for i, name in assigned.items() if name is None]
    report = Report(source, runs, methods, metrics, rows, table, paper_scale)
    if table is not None:
        by_name = {m.name: m for m in metrics}
        report.orderings = [evaluate_ordering(o, table, rows, by_name[o.metric]) for o in table.orderings]
    return report


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
        record: dict[str, str] = {"Method": row.label, "runs": str(row.n_runs)}
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
                                  "runs": row.n_runs}
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



def failures_frame(report: Report) -> pd.DataFrame:
    records = [{"job": r.run_id, "status": r.status, "label": r.label or "",
                "overrides": " ".join(f"{k}={v}" for k, v in r.overrides.items()), "error": (r.error or "")[:500]}
               for r in report.failures]
    return pd.DataFrame.from_records(records, columns=["job", "status", "label", "overrides", "error"])


def runs_frame(report: Report) -> pd.DataFrame:
    label_of = {id(run): m.label for m in report.methods for run in m.runs}
    records = []
    for run in report.runs:
        records.append({"job": run.run_id, "status": run.status, "method": label_of.get(id(run), ""),
                        "seed": run.seed, **run.metrics})
    return pd.DataFrame.from_records(records)


def render_markdown(report: Report, digits: int = 2) -> str:
    ok = sum(r.ok for r in report.runs)
    lines = [f"# Report: {report.table.title if report.table else 'all logged metrics'}", "",
             f"- Source: `{report.source}`; {len(report.runs)} jobs ({ok} finished, "
             f"{len(report.failures)} failed or unfinished); {len(report.methods)} methods.",
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
    lines += ["", "## Table", "", to_markdown(display_frame(report, digits)), "",
              "Cells: mean ± sample std over seeds (ddof=1), in the paper's unit; `(n=k)` when a cell "
              "has fewer values than the method has runs; `-`: no value."]
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
        lines += ["", "## Orderings claimed by the paper", ""]
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
    lines.append(to_markdown(failures_frame(report)) if report.failures else "None.")
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

    write("report.md", render_markdown(report, digits))
    write("table.md", to_markdown(display_frame(report, digits)) + "\n")
    numeric_frame(report).to_csv(out / "table.csv", index=False)
    written.append(out / "table.csv")
    write("table.tex", to_latex(report, digits))
    if report.table is not None:
        orderings_frame(report).to_csv(out / "orderings.csv", index=False)
        written.append(out / "orderings.csv")
    runs_frame(report).to_csv(out / "runs.csv", index=False)
    written.append(out / "runs.csv")
    if plots:
        from .plots import make_plots

        display = {row.method.label: row.label for row in report.rows if row.method is not None}
        written += make_plots(report.runs, report.methods, out / "plots", display)
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a Hydra multirun dir (or any dir of job dirs), or wandb:<entity>/<project>")
    parser.add_argument("--table", help=f"paper table: {', '.join(list_paper_tables())} (or a YAML path)")
    parser.add_argument("--out", type=Path, help="output dir (default: <source>/report or reports/<entity>_<project>)")
    parser.add_argument("--ignore", action="append", default=[], metavar="KEY",
                        help=f"override keys (globs) that do not define a method; always: {', '.join(DEFAULT_IGNORE)}")
    parser.add_argument("--digits", type=int, default=2, help="decimals in the formatted tables")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = collect_runs(args.source)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: no job dirs (with .hydra/ or results.json) under {args.source}", file=sys.stderr)
        return 2
    try:
        table = resolve_table(args.table, runs)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: --table: {error}", file=sys.stderr)
        return 2
    report = build_report(args.source, runs, table, [*DEFAULT_IGNORE, *args.ignore])
    out = args.out or default_out_dir(args.source)
    write_report(report, out, args.digits, plots=not args.no_plots)
    reproduced = sum(r.status == "reproduced" for r in report.orderings)
    print(f"{len(runs)} jobs, {len(report.methods)} methods, {len(report.failures)} failed; "
          + (f"orderings reproduced {reproduced}/{len(report.orderings)}; " if table else "")
          + f"report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
