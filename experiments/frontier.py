"""Reward-vs-KL frontiers and verdicts between methods at matched KL to the reference.

A method that moves further from the reference usually gains more reward (and loses more of the
reference's behaviour), so comparing final numbers at each method's own hyperparameters mixes
"better objective" with "moved further". A verdict is only made at matched KL, over seeds.

Data: each run's ``eval/curve`` (one dict per evaluation during training: ``step``, ``kl_ref``,
``true_reward``, ``safe_rate``, ...) plus its final point (the flat ``eval/kl_ref``,
``eval/true_reward``, ``eval/safe_rate``). Runs are grouped by method label; a β sweep of a method
adds more points to the same seed's frontier (each β is another stretch of the same curve).

Statistics (all here, pure functions of the points):

- **Per-seed curve, plain interpolation.** A seed's points (every evaluation of every β, sorted by
  KL, points at the same KL averaged) are joined by straight lines: the metric at KL ``k`` is the
  linear interpolation between its neighbours, and nothing outside the seed's observed KL range
  (no extrapolation). We do *not* take the upper frontier (running maximum over KL) by default:
  the maximum of noisy evaluations grows with the number of evaluations, so a method evaluated
  more often, or swept over more β, would gain by selection alone. ``mode="upper"`` is available
  for a best-achievable view.
- **Final points only (older results without a curve).** A seed with one point cannot be
  interpolated, so the seeds' final points are *pooled* into one curve for the method
  (interpolated the same way); its uncertainty comes from resampling seeds (below).
- **KL budgets.** By default 4 budgets evenly inside [largest per-method minimum KL, smallest
  per-method maximum KL] (endpoints excluded), so every method has data at every budget.
- **Interpolation error.** Linear interpolation between curve points misses the curvature between them;
  per seed it is estimated as |linear − quadratic through the three points nearest the budget| and its
  mean over seeds widens the CI on both sides (``interp_error`` in the table). The dense default curve
  (tisdpo/eval/curve.py) keeps it small; experiments/credit_check.py measures it against a curve
  evaluated every 2 steps.
- **Optimal frontier.** On the built-in task each run carries ``eval/optimal_frontier``, the exact best
  expected reward at each KL (tisdpo/eval/optimal_frontier.py). :func:`gain_shares` gives each method's
  share of the reachable gain at a budget: (R(k) − R(0)) / (F(k) − F(0)) per seed, R the run's curve
  (R(0) its reference at step 0), F the optimal frontier.
- **CI.** Percentile bootstrap over seeds (10,000 resamples, seeded RNG): the statistic is the
  mean over seeds of the per-seed interpolated value (pooled mode: the interpolation of the
  pooled points of the resampled seeds). With 3 seeds a percentile bootstrap under-covers; read
  the intervals as a description of seed spread.
- **Share of the oracle's gain.** With an oracle control (true token rewards as weights) and the
  baseline, :func:`oracle_share_table` gives each method's (method − baseline) / (oracle − baseline) at
  each budget: the mean per-seed gain over the oracle's mean per-seed gain, on the seeds all three
  share (paired; a ratio of means, since a per-seed ratio explodes where one seed's oracle gain is
  near 0), with a percentile bootstrap CI resampling those seeds jointly. It is n/a where the oracle's
  own gain (its :func:`difference_ci` against the baseline, as in the verdicts) is not clearly
  positive: a share of a gain that is not there means nothing.
- **Verdict vs a baseline (DPO).** Per-seed differences paired by seed where both methods have
  the seed (same data order, same initialisation), else an unpaired bootstrap (independent
  resamples of the two methods); the 95% CI of the mean difference gives "better" (CI above 0),
  "worse" (below 0) or "no clear difference"; fewer than 2 seeds: "too few seeds".
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

KL = "kl_ref"
# Verdicts are given on total reward, reward per token and safe rate (a gain that is only longer answers
# shows in total reward, not per token); length and finished rate stand beside them at every budget.
VERDICT_METRICS = ("true_reward", "true_reward_per_token", "safe_rate")
DIAGNOSTICS = ("length", "finished_rate")
METRICS = VERDICT_METRICS + DIAGNOSTICS
METRIC_LABELS = {"true_reward": "true reward", "true_reward_per_token": "true reward per token",
                 "safe_rate": "safe rate", "length": "length (tokens)", "finished_rate": "finished rate"}
#: a budget where a method's samples finish less often than this is flagged (its readings describe the
#: finished answers only; high-KL readings with many unfinished samples are not trustworthy)
MIN_FINISHED = 0.9
N_BUDGETS = 4
N_RESAMPLES = 10_000
LEVEL = 0.95
PER_SEED = "per-seed curves"
POOLED = "final points pooled over seeds"
BETTER, WORSE, UNCLEAR, TOO_FEW = "better", "worse", "no clear difference", "too few seeds"


# ---------------------------------------------------------------- points

def run_points(curve: Sequence[Mapping[str, Any]] | None, final: Mapping[str, Any],
               metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One run's (step, kl, metrics..., source) points: every curve point, then the final point.

    Keys may carry an ``eval/`` prefix. The final point is dropped when it repeats the last curve
    point (the pipeline logs the last evaluation both ways). Points without a finite KL are dropped.
    """
    def value(point: Mapping[str, Any], key: str) -> float:
        raw = point.get(key, point.get(f"eval/{key}"))
        try:
            out = float(raw)
        except (TypeError, ValueError):
            return math.nan
        return out if math.isfinite(out) else math.nan

    points = []
    for source, entries in (("curve", list(curve or [])), ("final", [final])):
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            point = {"step": value(entry, "step"), "kl": value(entry, KL), "source": source,
                     **{m: value(entry, m) for m in metrics}}
            if math.isnan(point["kl"]) or all(math.isnan(point[m]) for m in metrics):
                continue
            if source == "final" and points and _same_point(points[-1], point, metrics):
                continue
            points.append(point)
    return points


def _same_point(a: Mapping[str, float], b: Mapping[str, float], metrics: Sequence[str]) -> bool:
    return all((math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
               for k in ("kl", *metrics))


def frontier_points(runs: Sequence[Any], label_of: Callable[[Any], str | None] | None = None,
                    metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Every (method, seed, beta) point of finished runs: columns method, seed, beta, run, step, kl,
    the metrics, source (``curve`` or ``final``), final (the run's last point).

    ``runs`` are :class:`experiments.collect.Run` objects (``curve``, ``metrics``, ``seed``,
    ``setting``); ``label_of(run)`` names its method (default ``run.label``; None skips the run).
    """
    label_of = label_of or (lambda run: run.label)
    records = []
    for run in runs:
        if not getattr(run, "ok", True):
            continue
        label = label_of(run)
        if label is None:
            continue
        beta = run.setting("loss.beta") if hasattr(run, "setting") else None
        beta = None if beta is None or not isinstance(beta, (int, float, str)) else beta
        points = run_points(getattr(run, "curve", None), run.metrics, metrics)
        for i, point in enumerate(points):
            records.append({"method": label, "seed": run.seed, "beta": _number(beta), "run": run.run_id,
                            **point, "final": i == len(points) - 1})
    columns = ["method", "seed", "beta", "run", "step", "kl", *metrics, "source", "final"]
    return pd.DataFrame.from_records(records, columns=columns)


def _number(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def has_curves(points: pd.DataFrame) -> bool:
    return bool((points["source"] == "curve").any()) if len(points) else False


# ---------------------------------------------------------------- curves

def seed_curve(kl: Sequence[float], y: Sequence[float], mode: str = "interpolate") -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by KL, points at equal KL averaged, non-finite y dropped.

    ``mode="upper"`` keeps the running maximum of y over KL (the best value reached at or below
    each KL); the default keeps the points as they are (see the module docstring for why).
    """
    kl, y = np.asarray(kl, float), np.asarray(y, float)
    keep = np.isfinite(kl) & np.isfinite(y)
    xs, inverse = np.unique(kl[keep], return_inverse=True)       # sorted distinct KLs
    ys = np.bincount(inverse, weights=y[keep], minlength=len(xs)) / np.maximum(np.bincount(inverse, minlength=len(xs)), 1)
    if mode == "upper":
        ys = np.maximum.accumulate(ys) if len(ys) else ys
    elif mode != "interpolate":
        raise ValueError(f"mode must be 'interpolate' or 'upper', got {mode!r}")
    return xs, ys


def interpolate(xs: np.ndarray, ys: np.ndarray, at: Sequence[float] | float) -> np.ndarray:
    """Linear interpolation of the curve at ``at``; NaN outside [min KL, max KL] (no extrapolation)."""
    at = np.atleast_1d(np.asarray(at, float))
    out = np.full(at.shape, np.nan)
    if len(xs) == 0:
        return out
    inside = (at >= xs[0] - 1e-12) & (at <= xs[-1] + 1e-12)
    out[inside] = np.interp(at[inside], xs, ys)
    return out


def interpolation_error(xs: np.ndarray, ys: np.ndarray, at: float) -> float:
    """|linear − quadratic| at ``at`` through the three curve points nearest it (0 with fewer than
    three points, NaN outside the curve): what straight lines between points may miss there.

    Capped at the spread of those three points' values: two points at nearly the same KL with
    different values (a curve whose KL steps back, as TI-DPO's does) make the parabola through them
    swing arbitrarily far, and an error estimate larger than the local values' own range says
    nothing about the curve."""
    if len(xs) < 3 or not (xs[0] - 1e-12 <= at <= xs[-1] + 1e-12):
        return 0.0 if len(xs) and xs[0] - 1e-12 <= at <= xs[-1] + 1e-12 else math.nan
    near = np.sort(np.argsort(np.abs(xs - at))[:3])
    x3, y3 = xs[near], ys[near]
    if len(np.unique(x3)) < 3:
        return 0.0
    quadratic = float(np.polyval(np.polyfit(x3, y3, 2), at))
    return min(abs(float(np.interp(at, xs, ys)) - quadratic), float(np.ptp(y3)))


def method_basis(points: pd.DataFrame) -> str:
    """Per-seed curves when some seed has points at two or more KLs, else pooled final points."""
    distinct = points.groupby("seed", dropna=False)["kl"].nunique()
    return PER_SEED if (distinct >= 2).any() else POOLED


# ---------------------------------------------------------------- budgets

def kl_range(points: pd.DataFrame) -> tuple[float, float] | None:
    """[largest per-method minimum KL, smallest per-method maximum KL], or None when empty."""
    if not len(points):
        return None
    by_method = points.groupby("method")["kl"]
    low, high = float(by_method.min().max()), float(by_method.max().min())
    return (low, high) if low <= high else None


def kl_budgets(points: pd.DataFrame, n: int = N_BUDGETS) -> np.ndarray:
    """``n`` budgets evenly spaced strictly inside the common KL range (empty when there is none)."""
    span = kl_range(points)
    if span is None or n < 1:
        return np.zeros(0)
    low, high = span
    if math.isclose(low, high):
        return np.array([low])
    return np.linspace(low, high, n + 2)[1:-1]


# ---------------------------------------------------------------- bootstrap

def bootstrap(statistic: Callable[[tuple[int, ...]], float], n: int, rng: np.random.Generator,
              n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """The statistic over ``n_resamples`` resamples (with replacement) of ``n`` seed indices.

    The statistic depends only on the multiset of indices, so each distinct resample is computed
    once (with 3 seeds there are only 10).
    """
    draws = np.sort(rng.integers(0, n, size=(n_resamples, n)), axis=1)
    unique, inverse = np.unique(draws, axis=0, return_inverse=True)
    values = np.array([statistic(tuple(int(i) for i in row)) for row in unique], float)
    return values[np.asarray(inverse).ravel()]


def bootstrap_means(values: np.ndarray, rng: np.random.Generator, n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``values``: the bootstrap of a mean,
    vectorised (same draws as :func:`bootstrap` would make)."""
    values = np.asarray(values, float)
    draws = rng.integers(0, len(values), size=(n_resamples, len(values)))
    return values[draws].mean(axis=1)


def percentile_ci(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class Estimator:
    """How one method's value at one budget is computed from a resample of its seeds."""

    seeds: list[Any]
    statistic: Callable[[tuple[int, ...]], float]
    per_seed: dict[Any, float] = field(default_factory=dict)   # PER_SEED basis only
    interp_error: float = 0.0   # mean over seeds of the interpolation error at the budget (widens the CI)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def estimate(self) -> float:
        return self.statistic(tuple(range(self.n))) if self.n else math.nan

    def resample(self, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
        if self.per_seed:   # a mean over seeds: vectorised
            return bootstrap_means(np.array([self.per_seed[s] for s in self.seeds]), rng, n_resamples)
        return bootstrap(self.statistic, self.n, rng, n_resamples)


def estimator(points: pd.DataFrame, metric: str, budget: float, basis: str, mode: str = "interpolate") -> Estimator:
    """Per-seed basis: the mean over seeds of each seed's interpolated value (seeds whose KL range
    misses the budget are left out). Pooled basis: the interpolation of the pooled points."""
    if basis == PER_SEED:
        per_seed, errors = {}, []
        for seed, group in points.groupby("seed", sort=True, dropna=False):
            curve = seed_curve(group["kl"], group[metric], mode)
            value = interpolate(*curve, budget)[0]
            if math.isfinite(value):
                per_seed[seed] = float(value)
                errors.append(interpolation_error(*curve, budget))
        seeds = list(per_seed)
        values = np.array([per_seed[s] for s in seeds], float)
        error = float(np.nanmean(errors)) if errors and np.isfinite(errors).any() else 0.0
        return Estimator(seeds, lambda idx: float(values[list(idx)].mean()) if idx else math.nan, per_seed, error)
    by_seed = {seed: group for seed, group in points.groupby("seed", sort=True, dropna=False)}
    seeds = list(by_seed)

    def pooled(idx: tuple[int, ...]) -> float:
        chosen = pd.concat([by_seed[seeds[i]] for i in idx]) if idx else points.iloc[:0]
        return float(interpolate(*seed_curve(chosen["kl"], chosen[metric], mode), budget)[0])

    return Estimator(seeds, pooled)


def mean_ci(est: Estimator, rng: np.random.Generator, n_resamples: int = N_RESAMPLES,
            level: float = LEVEL) -> tuple[float, float, float]:
    """(estimate, CI low, CI high); the CI is NaN with fewer than 2 seeds."""
    value = est.estimate()
    if est.n < 2:
        return value, math.nan, math.nan
    low, high = percentile_ci(est.resample(rng, n_resamples), level)
    return value, low - est.interp_error, high + est.interp_error


def difference_ci(a: Estimator, b: Estimator, rng: np.random.Generator, n_resamples: int = N_RESAMPLES,
                  level: float = LEVEL) -> dict[str, Any]:
    """Mean difference a - b with its bootstrap CI, paired by seed where possible.

    Paired (both per-seed and sharing ≥ 2 seeds): the mean of per-seed differences over the shared
    seeds, resampling seeds. Pooled estimators sharing seeds resample the shared seeds jointly.
    Otherwise the two methods are resampled independently (unpaired).
    """
    shared = [s for s in a.seeds if s in set(b.seeds)]
    out: dict[str, Any] = {"paired": False, "n_pairs": len(shared)}
    slack = a.interp_error + b.interp_error   # what interpolation may miss on either side
    if len(shared) >= 2 and a.per_seed and b.per_seed:
        diffs = np.array([a.per_seed[s] - b.per_seed[s] for s in shared], float)
        out.update(paired=True, diff=float(diffs.mean()))
        draws = bootstrap_means(diffs, rng, n_resamples)
    elif len(shared) >= 2 and not a.per_seed and not b.per_seed and len(shared) == a.n == b.n:
        ia = [a.seeds.index(s) for s in shared]
        ib = [b.seeds.index(s) for s in shared]
        out.update(paired=True, diff=a.estimate() - b.estimate())
        draws = bootstrap(lambda idx: a.statistic(tuple(sorted(ia[i] for i in idx)))
                          - b.statistic(tuple(sorted(ib[i] for i in idx))), len(shared), rng, n_resamples)
    else:
        out["diff"] = a.estimate() - b.estimate()
        if a.n < 2 or b.n < 2:
            out.update(low=math.nan, high=math.nan)
            return out
        draws = a.resample(rng, n_resamples) - b.resample(rng, n_resamples)
    low, high = percentile_ci(draws, level)
    out["low"], out["high"] = low - slack, high + slack
    return out


def verdict(low: float, high: float, direction: str = "up") -> str:
    """better / worse / no clear difference from the CI of (method - baseline)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return TOO_FEW
    if low > 0:
        return BETTER if direction == "up" else WORSE
    if high < 0:
        return WORSE if direction == "up" else BETTER
    return UNCLEAR


# ---------------------------------------------------------------- the table

def budget_estimators(points: pd.DataFrame, metrics: Sequence[str], budgets: Sequence[float],
                      mode: str = "interpolate") -> Iterator[tuple[str, float, dict[str, Estimator]]]:
    """(metric, budget, {method: its estimator there}) for every metric the points carry (older
    points frames carry fewer) and every budget; each method on its own basis (:func:`method_basis`)."""
    methods = list(dict.fromkeys(points["method"]))
    basis = {m: method_basis(points[points["method"] == m]) for m in methods}
    for metric in [m for m in metrics if m in points.columns]:
        usable = points[np.isfinite(points[metric].astype(float))]
        for budget in budgets:
            yield metric, float(budget), {m: estimator(usable[usable["method"] == m], metric, float(budget), basis[m], mode)
                                          for m in methods}


def matched_kl_table(points: pd.DataFrame, budgets: Sequence[float] | None = None, baseline: str | None = "DPO",
                     metrics: Sequence[str] = METRICS, n_resamples: int = N_RESAMPLES, seed: int = 0,
                     mode: str = "interpolate", level: float = LEVEL) -> pd.DataFrame:
    """One row per (method, KL budget, metric): value (mean over seeds), CI, n seeds, basis, and
    against ``baseline``: diff (method - baseline), its CI, paired or not, verdict.

    ``budgets`` default to :func:`kl_budgets`. Same ``seed`` -> same CIs.
    """
    rng = np.random.default_rng(seed)
    budgets = kl_budgets(points) if budgets is None else np.asarray(list(budgets), float)
    methods = list(dict.fromkeys(points["method"]))
    basis = {m: method_basis(points[points["method"] == m]) for m in methods}
    records = []
    for metric, budget, ests in budget_estimators(points, metrics, budgets, mode):
        for method in methods:
            est = ests[method]
            value, low, high = mean_ci(est, rng, n_resamples, level)
            record = {"method": method, "kl_budget": float(budget), "metric": metric, "value": value,
                      "ci_low": low, "ci_high": high, "n_seeds": est.n, "basis": basis[method],
                      "interp_error": est.interp_error,
                      "diff": math.nan, "diff_low": math.nan, "diff_high": math.nan, "paired": None,
                      "verdict": ""}
            if (baseline is not None and method != baseline and baseline in ests
                    and metric not in DIAGNOSTICS):
                base = ests[baseline]
                if est.n and base.n:
                    d = difference_ci(est, base, rng, n_resamples, level)
                    record.update(diff=d["diff"], diff_low=d["low"], diff_high=d["high"], paired=d["paired"],
                                  verdict=verdict(d["low"], d["high"]))
                else:
                    record["verdict"] = "no data"
            records.append(record)
    return pd.DataFrame.from_records(records, columns=[
        "method", "kl_budget", "metric", "value", "ci_low", "ci_high", "n_seeds", "basis", "interp_error", "diff",
        "diff_low", "diff_high", "paired", "verdict"])


def low_finish_budgets(table: pd.DataFrame, threshold: float = MIN_FINISHED) -> list[float]:
    """The budgets where some method's mean finished rate is below ``threshold`` (flagged in reports)."""
    rows = table[(table["metric"] == "finished_rate") & (table["value"] < threshold)]
    return sorted({float(b) for b in rows["kl_budget"]})


# ---------------------------------------------------------------- the optimal frontier

def optimal_curve(frontiers: Sequence[Sequence[Mapping[str, float]]]) -> pd.DataFrame | None:
    """The optimal frontier the runs carry (``eval/optimal_frontier``; runs of one task share it): the
    mean over runs at each KL of the first run's grid (they differ only if their prompt sets do), as
    columns kl, true_reward; None when no run has one."""
    curves = [pd.DataFrame(list(f))[["kl", "true_reward"]].sort_values("kl") for f in frontiers if f]
    if not curves:
        return None
    grid = curves[0]["kl"].to_numpy(float)
    values = np.mean([np.interp(grid, c["kl"].to_numpy(float), c["true_reward"].to_numpy(float)) for c in curves], 0)
    return pd.DataFrame({"kl": grid, "true_reward": values})


def optimal_at(optimal: pd.DataFrame, kl: Sequence[float] | float) -> np.ndarray:
    """The optimal frontier at ``kl`` (linear between its points; NaN beyond its last KL)."""
    at = np.atleast_1d(np.asarray(kl, float))
    xs, ys = optimal["kl"].to_numpy(float), optimal["true_reward"].to_numpy(float)
    out = np.interp(np.clip(at, 0, None), xs, ys)
    out[at > xs[-1]] = np.nan
    return out


def gain_shares(points: pd.DataFrame, optimal: pd.DataFrame | None, budgets: Sequence[float],
                metric: str = "true_reward") -> pd.DataFrame:
    """Each method's share of the reachable gain at each budget, per seed (R(k) − R(0)) / (F(k) − F(0))
    with R(0) the seed's first curve point (its reference) and F the optimal frontier: mean, min and max
    over seeds, n. 1 = on the optimal frontier, 0 = no better than the reference."""
    records = []
    if optimal is None or not len(points):
        return pd.DataFrame(columns=["method", "kl_budget", "share", "min", "max", "n"])
    f0 = float(optimal_at(optimal, 0.0)[0])
    curves = points[(points["source"] == "curve") & np.isfinite(points[metric].astype(float))]
    for method, group in curves.groupby("method", sort=False):
        for budget in budgets:
            reachable = float(optimal_at(optimal, budget)[0]) - f0
            shares = []
            for _, seed_points in group.groupby("seed", dropna=False):
                start = seed_points.sort_values("step")[metric].iloc[0]
                value = interpolate(*seed_curve(seed_points["kl"], seed_points[metric]), budget)[0]
                if math.isfinite(value) and reachable > 0:
                    shares.append((value - start) / reachable)
            records.append({"method": method, "kl_budget": float(budget),
                            "share": float(np.mean(shares)) if shares else math.nan,
                            "min": float(np.min(shares)) if shares else math.nan,
                            "max": float(np.max(shares)) if shares else math.nan, "n": len(shares)})
    return pd.DataFrame.from_records(records, columns=["method", "kl_budget", "share", "min", "max", "n"])


def better_budgets(table: pd.DataFrame, method: str, metric: str = "true_reward") -> list[float]:
    """The KL budgets where ``method`` is clearly better than the baseline in ``metric``, ascending."""
    rows = table[(table["method"] == method) & (table["metric"] == metric) & (table["verdict"] == BETTER)]
    return sorted(float(b) for b in rows["kl_budget"].unique())


def beats_baseline(table: pd.DataFrame, method: str, metric: str = "true_reward") -> bool:
    """Is ``method`` clearly better than the baseline at some KL budget?"""
    return bool(better_budgets(table, method, metric))


#: what an oracle control's matched-KL gain over the baseline says about a task (:func:`oracle_evidence`)
ORACLE_CREDIT, ORACLE_FLAGGED, ORACLE_LENGTH, ORACLE_NONE = "credit", "flagged", "length", "none"


def oracle_evidence(table: pd.DataFrame, oracle: str) -> tuple[str, list[float], list[float]]:
    """(kind, per-token budgets, total budgets) of the oracle's clear gains over the baseline.

    kind: ``credit`` = a per-token gain at a budget where at least :data:`MIN_FINISHED` of every method's
    samples finish (room for token weighting); ``flagged`` = such gains only at flagged budgets;
    ``length`` = a total-reward gain with none per token; ``none``. A table without the per-token metric
    (older reports) judges by total reward."""
    total = better_budgets(table, oracle, "true_reward")
    has_per_token = bool((table["metric"] == "true_reward_per_token").any())
    per_token = better_budgets(table, oracle, "true_reward_per_token") if has_per_token else []
    credit = per_token if has_per_token else total
    if credit and not set(credit) <= set(low_finish_budgets(table)):
        return ORACLE_CREDIT, per_token, total
    if credit:
        return ORACLE_FLAGGED, per_token, total
    return (ORACLE_LENGTH if total else ORACLE_NONE), per_token, total


# ---------------------------------------------------------------- the plotted band

def grid_band(points: pd.DataFrame, metric: str, grid: np.ndarray, mode: str = "interpolate") -> pd.DataFrame:
    """One method's mean, min and max over seeds on a KL grid (seeds interpolated; NaN outside
    every seed's range). Pooled basis: the pooled interpolation as mean, min = max = mean."""
    if method_basis(points) == POOLED:
        line = interpolate(*seed_curve(points["kl"], points[metric], mode), grid)
        return pd.DataFrame({"kl": grid, "mean": line, "min": line, "max": line, "n": np.isfinite(line).astype(int)})
    rows = [interpolate(*seed_curve(g["kl"], g[metric], mode), grid)
            for _, g in points.groupby("seed", dropna=False)]
    stack = np.vstack(rows)
    n = np.isfinite(stack).sum(axis=0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN grid columns are expected
            mean, low, high = np.nanmean(stack, 0), np.nanmin(stack, 0), np.nanmax(stack, 0)
    return pd.DataFrame({"kl": grid, "mean": mean, "min": low, "max": high, "n": n})


def link_differences(points: pd.DataFrame, links: Sequence[tuple[str, str]], metric: str,
                     budgets: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = 0,
                     mode: str = "interpolate", level: float = LEVEL) -> pd.DataFrame:
    """For each budget and each (a, b) in ``links``: a - b at matched KL with its CI (as in
    :func:`difference_ci`); NaN when either method has no value there."""
    rng = np.random.default_rng(seed)
    usable = points[np.isfinite(points[metric].astype(float))]
    names = {name for link in links for name in link}
    basis = {m: method_basis(usable[usable["method"] == m]) for m in names if (usable["method"] == m).any()}
    records = []
    for budget in budgets:
        ests = {m: estimator(usable[usable["method"] == m], metric, float(budget), basis[m], mode) for m in basis}
        for a, b in links:
            record = {"kl_budget": float(budget), "a": a, "b": b, "diff": math.nan, "low": math.nan,
                      "high": math.nan, "paired": None, "n_a": 0, "n_b": 0}
            if a in ests and b in ests and ests[a].n and ests[b].n:
                d = difference_ci(ests[a], ests[b], rng, n_resamples, level)
                record.update(diff=d["diff"], low=d["low"], high=d["high"], paired=d["paired"],
                              n_a=ests[a].n, n_b=ests[b].n)
            records.append(record)
    return pd.DataFrame.from_records(records, columns=["kl_budget", "a", "b", "diff", "low", "high", "paired",
                                                      "n_a", "n_b"])


# ---------------------------------------------------------------- share of the oracle's gain

#: share-table statuses besides a share: the oracle itself, the baseline itself, and why a share is missing
REFERENCE, BASELINE = "reference", "baseline"
NO_DATA, ORACLE_UNCLEAR, ORACLE_NOT_POSITIVE = ("n/a: no data at this KL", "n/a: oracle gain not clear",
                                                "n/a: oracle gain not positive on the shared seeds")
SHARE_COLUMNS = ["method", "kl_budget", "metric", "share", "low", "high", "n", "paired", "oracle_gain",
                 "oracle_low", "oracle_high", "status"]


def middle_budget(budgets: Sequence[float]) -> float:
    """The budget a ranking is read at: the middle one (the lower middle of an even number); NaN if none."""
    ordered = sorted(float(b) for b in budgets)
    return ordered[(len(ordered) - 1) // 2] if ordered else math.nan


def _ratio_draws(numerators: np.ndarray, denominators: np.ndarray) -> np.ndarray:
    """numerator / denominator per resample; NaN where the denominator (the oracle's gain) is not > 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominators > 0, numerators / np.where(denominators > 0, denominators, 1.0), np.nan)


def share_of_oracle_gain(method: Estimator, base: Estimator, oracle: Estimator, rng: np.random.Generator,
                         n_resamples: int = N_RESAMPLES, level: float = LEVEL) -> dict[str, Any]:
    """(method − base) / (oracle − base) at one budget: share, its CI, n seeds, paired or not.

    Paired (all three per-seed and ≥ 2 seeds in common): mean over the shared seeds of the method's
    per-seed gain over the mean of the oracle's, the shared seeds resampled jointly. Otherwise the
    three estimates, each resampled on its own (unpaired; no CI below 2 seeds each). A resample whose
    oracle gain is not > 0 has no share and is left out of the percentile CI; NaN share when the
    oracle's gain itself is not > 0.
    """
    shared = [s for s in method.seeds if s in set(base.seeds) and s in set(oracle.seeds)]
    if len(shared) >= 2 and method.per_seed and base.per_seed and oracle.per_seed:
        gains = np.array([method.per_seed[s] - base.per_seed[s] for s in shared], float)
        oracle_gains = np.array([oracle.per_seed[s] - base.per_seed[s] for s in shared], float)
        share = _ratio_draws(np.array([gains.mean()]), np.array([oracle_gains.mean()]))[0]
        draws = rng.integers(0, len(shared), size=(n_resamples, len(shared)))
        resampled = _ratio_draws(gains[draws].mean(axis=1), oracle_gains[draws].mean(axis=1))
        low, high = percentile_ci(resampled, level)
        return {"share": float(share), "low": low, "high": high, "n": len(shared), "paired": True}
    base_value = base.estimate()
    share = _ratio_draws(np.array([method.estimate() - base_value]), np.array([oracle.estimate() - base_value]))[0]
    out = {"share": float(share), "low": math.nan, "high": math.nan, "n": min(method.n, base.n, oracle.n),
           "paired": False}
    if min(method.n, base.n, oracle.n) >= 2:
        base_draws = base.resample(rng, n_resamples)
        resampled = _ratio_draws(method.resample(rng, n_resamples) - base_draws,
                                 oracle.resample(rng, n_resamples) - base_draws)
        out["low"], out["high"] = percentile_ci(resampled, level)
    return out


def _share_status(method: str, baseline: str, oracle: str, share: float) -> str:
    if method == oracle:
        return REFERENCE
    if method == baseline:
        return BASELINE
    return "" if math.isfinite(share) else ORACLE_NOT_POSITIVE


def oracle_share_table(points: pd.DataFrame, budgets: Sequence[float], baseline: str, oracle: str,
                       metrics: Sequence[str] = VERDICT_METRICS, n_resamples: int = N_RESAMPLES, seed: int = 0,
                       mode: str = "interpolate", level: float = LEVEL) -> pd.DataFrame:
    """One row per (method, budget, metric): the method's share of the oracle's gain over the baseline
    (:func:`share_of_oracle_gain`) and the oracle's gain with its CI (:func:`difference_ci`, as in the
    verdicts). ``status``: "" for a share, :data:`REFERENCE` / :data:`BASELINE` for the two anchors (1
    and 0 by definition), else why there is none (:data:`ORACLE_UNCLEAR`: the oracle's gain CI is
    not above 0; :data:`NO_DATA`). Same ``seed`` -> same CIs."""
    rng = np.random.default_rng(seed)
    methods = list(dict.fromkeys(points["method"]))
    records = []
    for metric, budget, ests in budget_estimators(points, metrics, budgets, mode):
        gain = (difference_ci(ests[oracle], ests[baseline], rng, n_resamples, level)
                if oracle in ests and baseline in ests and ests[oracle].n and ests[baseline].n else None)
        clear = gain is not None and math.isfinite(gain["low"]) and gain["low"] > 0
        for method in methods:
            record = {"method": method, "kl_budget": float(budget), "metric": metric, "share": math.nan,
                      "low": math.nan, "high": math.nan, "n": 0, "paired": None,
                      "oracle_gain": gain["diff"] if gain else math.nan,
                      "oracle_low": gain["low"] if gain else math.nan,
                      "oracle_high": gain["high"] if gain else math.nan,
                      "status": NO_DATA if gain is None or not ests[method].n else ORACLE_UNCLEAR}
            if clear and ests[method].n:
                record.update(share_of_oracle_gain(ests[method], ests[baseline], ests[oracle], rng,
                                                   n_resamples, level))
                record["status"] = _share_status(method, baseline, oracle, record["share"])
            records.append(record)
    return pd.DataFrame.from_records(records, columns=SHARE_COLUMNS)
