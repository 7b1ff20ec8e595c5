"""What a report holds: our rows beside the paper's, the orderings judged, the matched-KL sections.

Plain data, built by :func:`experiments.report.build_report` and read by everything that shows a
report: the files (:mod:`experiments.report`), the tables (:mod:`experiments.report_views`) and the
W&B dashboard (:mod:`experiments.dashboard`). Kept apart so those readers import it without
importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from . import frontier as fr
from .collect import Method, Run, Stat
from .paper import MetricSpec, Ordering, PaperTable

SEPARATION = 2.0   # a link is "clear of seed noise" when its gap exceeds this many standard errors
RANK_METRIC = "true_reward_per_token"   # the ranking's order: each method's share of the oracle's gain in it
RANKING_METRICS = {"true_reward_per_token": "per token", "safe_rate": "safe rate"}   # the ranking table's shares


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
    optimal: pd.DataFrame | None = None   # the task's exact optimal frontier (kl, true_reward), built-in task only
    shares: pd.DataFrame | None = None    # each method's share of the reachable gain per budget (frontier.gain_shares)
    oracle: str | None = None             # the oracle the shares of the oracle's gain are against (one of `oracles`)
    oracle_shares: pd.DataFrame | None = None   # frontier.oracle_share_table: None without an oracle and a baseline
    ranking: pd.DataFrame | None = None   # one row per method, best first (report.ranking_frame)
    cost_source: str | None = None        # the --cost file the ranking's cost columns come from
    span: list[str] | None = None         # the methods whose common KL range the budgets span (None: every method)
    short: dict[str, float] = field(default_factory=dict)   # methods whose curves stop short of the top budget -> their max KL

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
