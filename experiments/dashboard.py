"""A W&B report (dashboard) per paper table, built with ``wandb-workspaces``.

    python -m experiments.report <sweep dir | wandb:entity/project[/group]> --table T --wandb

The report holds: the matched-KL section (headline) and the reward-vs-KL / safe-rate-vs-KL
panels, the table in the paper's layout with the paper's numbers beside ours, the orderings,
training curves grouped by method (``train/...``, ``val/...``, mean and min–max over seeds), the
token-weight views (``weights/...`` media: the coloured-token page and the histogram), and the
failed jobs. Its run set is filtered to the sweep: W&B group, ``paper_table`` and ``scale``.

Online only when ``WANDB_API_KEY`` is set and ``WANDB_MODE`` is not offline/disabled/dryrun:
then the report is saved to W&B (``Report.save()``). Otherwise nothing touches the network: the
same report object is serialised to ``<report dir>/wandb_report.json`` (title, description,
blocks and panels with their metric keys, grouping, run filter) next to the local PNGs. (The
package resolves project ids while converting a run set to W&B's own format, so the offline spec
is our serialisation of its Python objects, not W&B's wire format.)

Needs ``pip install wandb-workspaces`` (the ``wandb`` extra); imported only here, lazily.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .collect import parse_wandb_source, wandb_filters
from .report_model import Report
from .report_views import (display_frame, failures_frame, frontier_plots, orderings_frame, render_matched_kl_sections,
                           table_caption, to_markdown)

SPEC_FILE = "wandb_report.json"
GROUP_BY = "config.label"          # every run's config has `label` (the method's row name)
MEDIA_KEYS = ("weights/token_view", "weights/histogram")
DEFAULT_CURVES = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "val/loss",
                  "val/rewards/accuracies", "val/rewards/margins", "train/rewards/chosen", "train/rewards/rejected")
MAX_CURVES = 16
OFFLINE_MODES = ("offline", "disabled", "dryrun")
PLACEHOLDER_ENTITY = "<entity>"


class DashboardError(RuntimeError):
    """The W&B report cannot be built (package missing, no entity to save to, ...)."""


def workspaces():
    """``wandb_workspaces.reports.v2``, or a DashboardError that says how to install it."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as error:
        raise DashboardError("the W&B report needs the wandb-workspaces package: pip install -e '.[wandb]' "
                             "(or pip install wandb-workspaces)") from error
    return wr


def wandb_online(environ: dict[str, str] | None = None) -> bool:
    """Online only with an API key and a mode that allows the network; never guesses otherwise."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_MODE", "").strip().lower() in OFFLINE_MODES:
        return False
    return bool(environ.get("WANDB_API_KEY"))


# ---------------------------------------------------------------- where and which runs


def _common(values: Sequence[Any]) -> Any:
    distinct = {v for v in values if v not in (None, "")}
    return distinct.pop() if len(distinct) == 1 else None


def _logger_setting(report: Report, key: str) -> Any:
    values = []
    for run in report.runs:
        logger = run.config.get("logger")
        values.append(logger.get(key) if isinstance(logger, dict) else None)
    return _common(values)


def dashboard_target(report: Report, group: str | None = None, entity: str | None = None,
                     project: str | None = None) -> dict[str, Any]:
    """entity, project, group, table, scale of the dashboard's run set.

    From the arguments, else the ``wandb:entity/project/group`` source, else the runs' configs
    (``logger.entity``/``logger.project``/``logger.group``, ``project``, ``scale``)."""
    src_entity = src_project = src_group = None
    if report.source.startswith("wandb:"):
        path, src_group = parse_wandb_source(report.source[len("wandb:"):])
        src_entity, src_project = path.split("/")
    ok = [r for r in report.runs if r.ok] or report.runs
    return {
        "entity": entity or src_entity or _logger_setting(report, "entity"),
        "project": project or src_project or _logger_setting(report, "project")
        or _common([r.config.get("project") for r in ok]) or "tisdpo",
        "group": group or src_group or _logger_setting(report, "group"),
        "table": report.table.name if report.table is not None else None,
        "scale": _common([r.scale for r in ok]),
    }


def run_filter(group: str | None, table: str | None, scale: str | None) -> str:
    """The run set's filter in wandb-workspaces' expression syntax (AND of what is known)."""
    parts = []
    if group:
        parts.append(f"Metric('Group') == {group!r}")
    if table:
        parts.append(f"Config('paper_table') == {table!r}")
    if scale:
        parts.append(f"Config('scale') == {scale!r}")
    return " and ".join(parts)


# ---------------------------------------------------------------- panels


def curve_keys(report: Report) -> list[str]:
    """``train/...`` and ``val/...`` metrics to plot: the usual ones first, then any others logged."""
    logged = sorted({k for r in report.runs for k in r.metrics if k.startswith(("train/", "val/"))})
    keys = [k for k in DEFAULT_CURVES if k in logged or not logged] + [k for k in logged if k not in DEFAULT_CURVES]
    return keys[:MAX_CURVES]


def weight_keys(report: Report) -> list[str]:
    """Scalar ``weights/...`` metrics (means, spreads, Spearman vs the true token reward)."""
    return sorted({k for r in report.runs for k in r.metrics if k.startswith("weights/")})


def build_dashboard(report: Report, target: dict[str, Any], figures: Sequence[Path] = ()):
    """The ``wandb_workspaces`` Report object (nothing is sent)."""
    wr = workspaces()
    entity = target["entity"] or PLACEHOLDER_ENTITY
    project = target["project"]
    expression = run_filter(target["group"], target["table"], target["scale"])

    def runset(name: str):
        return wr.Runset(entity=entity, project=project, name=name, filters=expression, groupby=[GROUP_BY])

    def grouped_line(key: str, x: str = "Step", title: str | None = None):
        return wr.LinePlot(title=title or key, x=x, y=[key], groupby=GROUP_BY, groupby_aggfunc="mean",
                           groupby_rangefunc="minmax")

    title = (report.table.title if report.table else "Runs")[:128]
    matched = "\n".join(render_matched_kl_sections(report.frontiers, figures=False)[2:]).strip()
    blocks: list[Any] = [
        wr.H1("Matched-KL comparison (headline)"),
        wr.MarkdownBlock(matched or "No matched-KL data."),
        wr.PanelGrid(runsets=[runset("frontier")], panels=[
            grouped_line("eval/true_reward", x="eval/kl_ref", title="true reward vs KL (during training)"),
            grouped_line("eval/safe_rate", x="eval/kl_ref", title="safe rate vs KL (during training)"),
            wr.ScatterPlot(title="final true reward vs KL", x=wr.SummaryMetric("eval/kl_ref"),
                           y=wr.SummaryMetric("eval/true_reward")),
            wr.ScatterPlot(title="final safe rate vs KL", x=wr.SummaryMetric("eval/kl_ref"),
                           y=wr.SummaryMetric("eval/safe_rate")),
        ]),
        wr.H1("The paper's table"),
        wr.P(table_caption(report)),
        wr.MarkdownBlock(to_markdown(display_frame(report))),
    ]
    if report.table is not None:
        blocks += [wr.H2("Orderings at the paper's hyperparameters"),
                   wr.MarkdownBlock(to_markdown(orderings_frame(report)) if report.orderings else "None recorded.")]
    blocks += [
        wr.H1("Training curves by method"),
        wr.P("Mean over seeds with the min–max band, grouped by method (config `label`)."),
        wr.PanelGrid(runsets=[runset("training")], panels=[grouped_line(k) for k in curve_keys(report)]),
        wr.H1("Token weights"),
        wr.PanelGrid(runsets=[runset("weights")], panels=[
            *[wr.MediaBrowser(title=k, media_keys=[k]) for k in MEDIA_KEYS],
            *[wr.BarPlot(title=k, metrics=[wr.SummaryMetric(k)], groupby=GROUP_BY) for k in weight_keys(report)],
        ]),
    ]
    if report.failures:
        blocks += [wr.H1("Failed or unfinished jobs"), wr.MarkdownBlock(to_markdown(failures_frame(report)))]
    if figures:
        blocks += [wr.H2("Local figures"), wr.P("Written next to this report: " + ", ".join(Path(f).name for f in figures))]
    description = (f"{report.table.source}. " if report.table else "") + \
        f"Runs: {expression or 'the whole project'}; grouped by {GROUP_BY}."
    return wr.Report(project=project, entity=entity, title=title, description=description[:1000], blocks=blocks)


# ---------------------------------------------------------------- offline spec


def to_spec(obj: Any) -> Any:
    """A wandb-workspaces object tree as plain JSON: ``{"type": class name, field: value, ...}``,
    leaving out private fields and empty/None values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            if f.name.startswith("_") or f.name == "layout":
                continue
            value = to_spec(getattr(obj, f.name))
            if value in (None, "", [], {}) or (isinstance(value, list) and all(v is None for v in value)):
                continue   # unset options (W&B's defaults) would only bury the keys that matter
            out[f.name] = value
        return out
    if isinstance(obj, dict):
        return {str(k): to_spec(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_spec(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def panel_index(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with its section, type, title and metric keys (a flat view of the blocks)."""
    panels, section = [], ""
    for block in spec.get("blocks", []):
        if block["type"] in ("H1", "H2"):
            section = _text(block)
        for panel in block.get("panels", []) if block["type"] == "PanelGrid" else []:
            keys = []
            for field_name in ("y", "x", "metrics", "media_keys"):
                value = panel.get(field_name)
                for item in value if isinstance(value, list) else [value] if value else []:
                    keys.append(item.get("name") if isinstance(item, dict) else item)
            panels.append({"section": section, "type": panel["type"], "title": panel.get("title"),
                           "keys": [k for k in keys if k and k != "Step"], "groupby": panel.get("groupby")})
    return panels


def _text(block: dict[str, Any]) -> str:
    text = block.get("text")
    if isinstance(text, list):
        return "".join(t if isinstance(t, str) else str(t.get("text", "")) for t in text)
    return str(text or "")


def write_dashboard(report: Report, out: Path, group: str | None = None, entity: str | None = None,
                    project: str | None = None, plots: bool = True, online: bool | None = None) -> str:
    """Build the table's W&B report; save it online, or write ``<out>/wandb_report.json`` offline.

    Returns the report's URL online, else the spec file's path. The PNGs are written either way
    (``plots/``), so the offline dashboard has its figures.
    """
    online = wandb_online() if online is None else online
    target = dashboard_target(report, group, entity, project)
    figures = sorted((out / "plots").glob("*.png")) if plots else []
    if not any(p.name.startswith("frontier_") for p in figures):
        figures += frontier_plots(report, out / "plots")
    wandb_report = build_dashboard(report, target, figures)
    spec = {
        "title": wandb_report.title, "description": wandb_report.description,
        "entity": target["entity"], "project": target["project"],
        "mode": "online" if online else "offline (not sent; built from the same objects that .save() sends)",
        "run_filter": {"expression": run_filter(target["group"], target["table"], target["scale"]),
                       "api_filters": wandb_filters(target["group"], target["table"], target["scale"]),
                       "group": target["group"], "paper_table": target["table"], "scale": target["scale"]},
        "grouping": [GROUP_BY],
        "figures": [str(p) for p in figures],
        "panels": [],
        "blocks": to_spec(wandb_report).get("blocks", []),
    }
    spec["panels"] = panel_index(spec)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPEC_FILE
    path.write_text(json.dumps(spec, indent=2, default=str), encoding="utf-8")
    if not online:
        return str(path)
    if not target["entity"]:
        raise DashboardError("no W&B entity to save the report to: pass --wandb-entity or a wandb:<entity>/... source "
                             f"(the spec is in {path})")
    wandb_report.save()
    return str(getattr(wandb_report, "url", path))
