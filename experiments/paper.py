"""The papers' reported tables as data: ``load_paper_table(name)``, ``list_paper_tables()``.

One YAML file per table in ``experiments/paper_tables/``:

- ``citation`` (paper, arxiv, table or figure), ``model``, ``dataset``, optional ``notes``;
- ``metrics``: name (the paper's column), direction (up/down), unit, ``key`` (our logged metric),
  ``alt_keys`` (fallbacks), ``ours_scale`` (multiply ours to get the paper's unit, e.g. 100 for
  a fraction shown in %), ``where`` (settings a run must have to count for this column, e.g.
  {dataset.label_noise: 0.1}), ``stand_in`` (optional: ``{key, label, scale}``, the built-in task's
  metric that measures the same property, used by reports of runs below the paper's scale when
  none of the metric's own keys was logged, e.g. true reward for MT-Bench);
- ``rows``: method (the paper's label), ``match`` (settings that identify our runs of it, e.g.
  {loss: tisdpo, estimator: dpo_pair}), ``values`` {metric name: number or null};
- ``orderings``: claims checked on our numbers: ``chain: [best, ..., worst]`` or
  ``best: method`` (optionally ``among: [...]``), for ``metric`` or each of ``metrics``; or, with
  ``drop: [from metric, to metric]``, on how much each method loses between two columns (less is
  better for an "up" metric), e.g. accuracy lost from 0% to 40% label noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

TABLES_DIR = Path(__file__).resolve().parent / "paper_tables"
DIRECTIONS = {"up": "up", "↑": "up", "higher": "up", "down": "down", "↓": "down", "lower": "down"}


@dataclass(frozen=True)
class StandIn:
    """A built-in task metric that measures what a paper metric measures (same direction)."""

    key: str
    label: str
    scale: float = 1.0


@dataclass(frozen=True)
class MetricSpec:
    name: str
    key: str
    direction: str = "up"
    unit: str | None = None
    alt_keys: tuple[str, ...] = ()
    ours_scale: float = 1.0
    where: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    stand_in: StandIn | None = None
    standing_in: bool = False   # True: this spec reads the stand-in key instead of the paper's metric

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.alt_keys)

    def with_stand_in(self) -> MetricSpec:
        """The same column (name, direction, ``where``) read from the built-in task's stand-in metric."""
        if self.stand_in is None:
            raise ValueError(f"metric {self.name!r} has no stand_in")
        return replace(self, key=self.stand_in.key, alt_keys=(), ours_scale=self.stand_in.scale,
                       unit="%" if self.unit == "%" and self.stand_in.scale == 100 else None,
                       standing_in=True)

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "up" else "↓"

    def better(self, a: float, b: float) -> bool:
        """Is value ``a`` strictly better than ``b`` under this metric's direction?"""
        return a > b if self.direction == "up" else a < b


@dataclass(frozen=True)
class PaperRow:
    method: str
    values: dict[str, float | None]
    match: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ordering:
    """A claim on one metric: ``chain`` best-to-worst, or ``best`` among ``among`` (or all)."""

    metric: str
    chain: tuple[str, ...] = ()
    best: str | None = None
    among: tuple[str, ...] = ()
    claim: str = ""
    drop_from: str | None = None   # rank methods by how much they lose from this column to ``metric``

    def judged_metric(self, metric: MetricSpec) -> MetricSpec:
        """The quantity the claim ranks: ``metric`` itself, or the loss from ``drop_from`` to it."""
        if self.drop_from is None:
            return metric
        return replace(metric, name=f"drop {self.drop_from}→{metric.name}",
                       direction="down" if metric.direction == "up" else "up")

    def describe(self, metric: MetricSpec) -> str:
        metric = self.judged_metric(metric)
        sign = " > " if metric.direction == "up" else " < "
        if self.chain:
            return f"{metric.name} {metric.arrow}: " + sign.join(self.chain)
        others = ", ".join(self.among) if self.among else "all others"
        return f"{metric.name} {metric.arrow}: {self.best} best (vs {others})"


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    citation: dict[str, str]
    model: str
    dataset: str
    metrics: tuple[MetricSpec, ...]
    rows: tuple[PaperRow, ...]
    orderings: tuple[Ordering, ...]
    claims: tuple[str, ...] = ()
    notes: str = ""
    figure_only: bool = False
    path: Path | None = None

    def metric(self, name: str) -> MetricSpec:
        for metric in self.metrics:
            if metric.name == name:
                return metric
        raise KeyError(f"paper table {self.name!r} has no metric {name!r}")

    def row(self, method: str) -> PaperRow:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"paper table {self.name!r} has no row {method!r}")

    @property
    def source(self) -> str:
        c = self.citation
        where = c.get("table") or c.get("figure") or ""
        return f"{c.get('paper', '')} ({c.get('venue', '')}, arXiv {c.get('arxiv', '')}), {where}".strip()


def list_paper_tables() -> list[str]:
    return sorted(p.stem for p in TABLES_DIR.glob("*.yaml"))


def load_paper_table(name: str | Path) -> PaperTable:
    """A table by name (``tisdpo_pku_main``) or by path to a YAML file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no paper table {str(name)!r}; known tables: {', '.join(list_paper_tables())}")
    with path.open(encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    try:
        return _parse(raw, path)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def _parse(raw: dict[str, Any], path: Path) -> PaperTable:
    if not isinstance(raw, dict):
        raise ValueError("the file must hold a mapping")
    metrics = tuple(_parse_metric(m) for m in raw["metrics"])
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate metric names in {names}")
    rows = []
    for entry in raw.get("rows") or []:
        values = {str(k): (None if v is None else float(v)) for k, v in (entry.get("values") or {}).items()}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"row {entry['method']!r} has values for unknown metrics {unknown}")
        rows.append(PaperRow(str(entry["method"]), values, dict(entry.get("match") or {})))
    methods = [r.method for r in rows]
    if len(set(methods)) != len(methods):
        raise ValueError(f"duplicate row methods in {methods}")
    orderings = []
    for entry in raw.get("orderings") or []:
        drop = entry.get("drop")
        if drop is not None and (not isinstance(drop, list) or len(drop) != 2):
            raise ValueError(f"ordering {entry}: 'drop' must be [from metric, to metric]")
        metric_names = [drop[1]] if drop else entry.get("metrics") or [entry["metric"]]
        if drop and drop[0] not in names:
            raise ValueError(f"ordering {entry}: unknown metric {drop[0]!r} (metrics: {names})")
        chain = tuple(str(m) for m in entry.get("chain") or ())
        best = entry.get("best")
        among = tuple(str(m) for m in entry.get("among") or ())
        if bool(chain) == bool(best):
            raise ValueError(f"ordering {entry}: give exactly one of 'chain' or 'best'")
        if chain and len(chain) < 2:
            raise ValueError(f"ordering {entry}: a chain needs at least two methods")
        for method in (*chain, *([best] if best else []), *among):
            if method not in methods:
                raise ValueError(f"ordering {entry}: unknown method {method!r} (rows: {methods})")
        for metric_name in metric_names:
            if metric_name not in names:
                raise ValueError(f"ordering {entry}: unknown metric {metric_name!r} (metrics: {names})")
            orderings.append(Ordering(str(metric_name), chain, str(best) if best else None, among,
                                      str(entry.get("claim", "")), str(drop[0]) if drop else None))
    return PaperTable(
        name=str(raw.get("name") or path.stem), title=str(raw.get("title", "")),
        citation={str(k): str(v) for k, v in (raw.get("citation") or {}).items()},
        model=str(raw.get("model", "")), dataset=str(raw.get("dataset", "")), metrics=metrics,
        rows=tuple(rows), orderings=tuple(orderings),
        claims=tuple(str(c) for c in raw.get("claims") or ()), notes=str(raw.get("notes") or "").strip(),
        figure_only=bool(raw.get("figure_only", False)), path=path)


def _parse_metric(entry: dict[str, Any]) -> MetricSpec:
    direction = DIRECTIONS.get(str(entry.get("direction", "up")).lower())
    if direction is None:
        raise ValueError(f"metric {entry.get('name')!r}: direction must be up or down, got {entry.get('direction')!r}")
    return MetricSpec(name=str(entry["name"]), key=str(entry["key"]), direction=direction,
                      unit=entry.get("unit"), alt_keys=tuple(entry.get("alt_keys") or ()),
                      ours_scale=float(entry.get("ours_scale", 1.0)), where=dict(entry.get("where") or {}),
                      description=str(entry.get("description", "")), stand_in=_parse_stand_in(entry))


def _parse_stand_in(entry: dict[str, Any]) -> StandIn | None:
    raw = entry.get("stand_in")
    if raw is None:
        return None
    if not isinstance(raw, dict) or "key" not in raw:
        raise ValueError(f"metric {entry.get('name')!r}: stand_in must be a mapping with a 'key', got {raw!r}")
    return StandIn(key=str(raw["key"]), label=str(raw.get("label") or raw["key"]), scale=float(raw.get("scale", 1.0)))
