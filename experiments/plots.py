"""PNG figures for a report: win rate vs sampling temperature, training curves, token weights.

- ``eval/win_rate...@T<t>`` keys -> one figure per base key, one line per method (mean ± std
  over seeds): the TL;DR figure.
- a run's ``metrics.csv`` (Lightning CSVLogger, anywhere under its job dir) -> one figure per
  metric with one line per run.
- a run's ``weights.npz`` / ``weights.pt`` with ``chosen_weights`` and ``rejected_weights``
  (arrays, tensors or lists of them; flattened; optional ``chosen_mask``/``rejected_mask`` select
  real tokens, non-finite values are dropped) -> a histogram per run.
- reward-vs-KL and safe-rate-vs-KL frontiers (:func:`plot_frontier`, points from
  :mod:`experiments.frontier`): per method the mean over seeds on a common KL grid with a
  min–max band over seeds, every run's final point, and the matched-KL budgets as dotted lines.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .collect import Method, Run, Stat  # noqa: E402

WIN_RATE_AT_T = re.compile(r"^(?P<base>eval/win_rate[^@]*)@T(?P<t>[0-9]*\.?[0-9]+)$")
CURVE_PRIORITY = ("train/loss", "val/loss", "val/rewards/accuracies", "val/rewards/margins",
                  "train/rewards/accuracies", "train/rewards/margins")
MAX_CURVES = 8


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------- win rate vs temperature

def temperature_series(methods: Sequence[Method]) -> dict[str, dict[str, list[tuple[float, Stat]]]]:
    """{base key: {method label: [(temperature, Stat over seeds), ...] sorted by temperature}}."""
    series: dict[str, dict[str, list[tuple[float, Stat]]]] = {}
    for method in methods:
        keys = {k for run in method.runs for k in run.metrics}
        for key in sorted(keys):
            match = WIN_RATE_AT_T.match(key)
            if not match:
                continue
            stat = Stat.of(method.values(key))
            if stat is not None:
                series.setdefault(match["base"], {}).setdefault(method.label, []).append((float(match["t"]), stat))
    for by_method in series.values():
        for points in by_method.values():
            points.sort(key=lambda p: p[0])
    return series


def plot_win_rate_vs_temperature(by_method: dict[str, list[tuple[float, Stat]]], path: Path,
                                 title: str = "Win rate vs sampling temperature") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in by_method.items():
        temps = [t for t, _ in points]
        means = [s.mean for _, s in points]
        errs = [0.0 if math.isnan(s.std) else s.std for _, s in points]
        ax.errorbar(temps, means, yerr=errs, marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("win rate")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- training curves

def find_file(run: Run, *names: str) -> Path | None:
    if run.path is None:
        return None
    for name in names:
        direct = run.path / name
        if direct.is_file():
            return direct
    for name in names:
        found = sorted(run.path.rglob(name))
        if found:
            return found[0]
    return None


def load_curves(path: Path):
    import pandas as pd

    frame = pd.read_csv(path)
    x = "step" if "step" in frame.columns else ("epoch" if "epoch" in frame.columns else None)
    return frame, x


def plot_training_curves(runs: Sequence[Run], labels: dict[int, str], out_dir: Path) -> list[Path]:
    curves = []
    for run in runs:
        path = find_file(run, "metrics.csv")
        if path is not None:
            frame, x = load_curves(path)
            curves.append((labels.get(id(run), run.run_id), run, frame, x))
    if not curves:
        return []
    columns = {c for _, _, frame, x in curves for c in frame.columns if c not in ("step", "epoch", x)}
    numeric = [c for c in columns if any(c in f.columns and np.issubdtype(f[c].dtype, np.number)
                                         for _, _, f, _ in curves)]
    chosen = [c for c in CURVE_PRIORITY if c in numeric] + sorted(c for c in numeric if c not in CURVE_PRIORITY)
    written = []
    colours = {label: f"C{i % 10}" for i, label in enumerate(dict.fromkeys(c[0] for c in curves))}
    for column in chosen[:MAX_CURVES]:
        fig, ax = plt.subplots(figsize=(6, 4))
        seen = set()
        for label, run, frame, x in curves:
            if column not in frame.columns:
                continue
            data = frame[[c for c in (x, column) if c]].dropna(subset=[column])
            xs = data[x] if x else np.arange(len(data))
            ax.plot(xs, data[column], color=colours[label], alpha=0.8,
                    label=None if label in seen else label)
            seen.add(label)
        ax.set_xlabel(x or "row")
        ax.set_ylabel(column)
        ax.set_title(column)
        ax.legend(fontsize=8)
        written.append(_save(fig, out_dir / f"curve_{safe_name(column)}.png"))
    return written


# ---------------------------------------------------------------- token weights

def _flatten(value: Any) -> np.ndarray:
    if value is None:
        return np.zeros(0)
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    if isinstance(value, (list, tuple)):
        parts = [_flatten(v) for v in value]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(value, dtype=float).ravel()


def load_weights(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            raw = {k: data[k] for k in data.files}
    else:
        import torch

        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict with chosen_weights/rejected_weights")
    out = {}
    for side in ("chosen", "rejected"):
        if f"{side}_weights" not in raw:
            continue
        weights = _flatten(raw[f"{side}_weights"])
        mask = raw.get(f"{side}_mask")
        if mask is not None:
            mask = _flatten(mask)
            if mask.shape == weights.shape:
                weights = weights[mask > 0]
        out[side] = weights[np.isfinite(weights)]
    if not out:
        raise ValueError(f"{path}: no chosen_weights or rejected_weights")
    return out


def plot_weight_histogram(weights: dict[str, np.ndarray], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    values = np.concatenate([v for v in weights.values() if v.size]) if any(v.size for v in weights.values()) else np.zeros(1)
    bins = np.linspace(values.min(), values.max() + 1e-9, 50)
    for side, colour in (("chosen", "C2"), ("rejected", "C3")):
        if side in weights and weights[side].size:
            ax.hist(weights[side], bins=bins, alpha=0.5, color=colour,
                    label=f"{side} (n={weights[side].size}, mean={weights[side].mean():.3f})")
    ax.set_xlabel("token weight")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_weight_histograms(runs: Sequence[Run], labels: dict[int, str], out_dir: Path) -> list[Path]:
    written = []
    for run in runs:
        path = find_file(run, "weights.npz", "weights.pt")
        if path is None:
            continue
        label = labels.get(id(run), run.run_id)
        name = f"weights_{safe_name(label)}_s{safe_name(str(run.seed))}.png"
        written.append(plot_weight_histogram(load_weights(path), out_dir / name, f"token weights: {label}"))
    return written


# ---------------------------------------------------------------- reward vs KL

GRID_POINTS = 60


def plot_frontier(points, metric: str, path: Path, budgets: Sequence[float] = (), title: str | None = None,
                  optimal=None) -> Path:
    """One method per colour: mean over seeds (line) and min–max over seeds (band) of ``metric``
    against KL on a common grid, each run's final point (x), the KL budgets (dotted), and ``optimal``
    (columns kl, true_reward: the task's exact optimal frontier) as a black dashed line."""
    from .frontier import METRIC_LABELS, grid_band

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    usable = points[np.isfinite(points[metric].astype(float))]
    if len(usable):
        grid = np.linspace(float(usable["kl"].min()), float(usable["kl"].max()), GRID_POINTS)
        for i, (method, group) in enumerate(usable.groupby("method", sort=False)):
            colour = f"C{i % 10}"
            band = grid_band(group, metric, grid)
            ax.plot(band["kl"], band["mean"], color=colour, label=f"{method} (n={group['seed'].nunique()})")
            ax.fill_between(band["kl"], band["min"], band["max"], color=colour, alpha=0.15, linewidth=0)
            final = group[group["final"]]
            ax.scatter(final["kl"], final[metric], color=colour, marker="x", s=25)
    if optimal is not None and len(optimal) and len(usable):
        upto = float(usable["kl"].max()) * 1.05
        shown = optimal[optimal["kl"] <= upto]
        ax.plot(shown["kl"], shown["true_reward"], color="black", linestyle="--", linewidth=1.0,
                label="optimal frontier (exact)")
    for budget in budgets:
        ax.axvline(float(budget), color="grey", linestyle=":", linewidth=0.8)
    label = METRIC_LABELS.get(metric, metric)
    ax.set_xlabel("KL to the reference (nats)")
    ax.set_ylabel(label)
    ax.set_title(title or f"{label} vs KL (line: mean over seeds, band: min–max, x: final points)", fontsize=9)
    if len(usable):
        ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------- all of them

def make_plots(runs: Sequence[Run], methods: Sequence[Method], out_dir: Path,
               display: dict[str, str] | None = None) -> list[Path]:
    """Every figure the runs have data for; returns the PNG paths.

    ``display`` renames methods (our label -> e.g. the paper's row name) in legends and file names.
    """
    display = display or {}
    methods = [Method(display.get(m.label, m.label), m.identity, m.runs) for m in methods]
    labels = {id(run): m.label for m in methods for run in m.runs}
    finished = [r for r in runs if r.ok]
    written = []
    for base, by_method in temperature_series(methods).items():
        name = "win_rate_vs_temperature.png" if base == "eval/win_rate" else \
            f"{safe_name(base.removeprefix('eval/'))}_vs_temperature.png"
        written.append(plot_win_rate_vs_temperature(by_method, out_dir / name, f"{base} vs sampling temperature"))
    written += plot_training_curves(finished, labels, out_dir)
    written += plot_weight_histograms(finished, labels, out_dir)
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
