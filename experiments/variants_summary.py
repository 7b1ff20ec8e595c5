"""One table across the built-in task variants, read from their reports' ``matched_kl.csv``.

    python -m experiments.variants_summary experiments/results/variants [--out summary.md]
    python -m experiments.variants_summary outputs/tiny_reproduction/reports/variant_*   # report folders

Each folder given that holds a ``matched_kl.csv`` (written by ``experiments.report``) is one variant; a
folder without one stands for every folder below it that has one (``credit/low_kl``: "credit / low_kl"). For each, at
its middle KL budget (the budget rankings are read at, ``frontier.middle_budget``) and at its lowest
budget: every method's total true reward, reward per token and safe rate (5-seed mean [95% CI]), its
length and finished rate, the verdict of its paired Δ vs DPO (**b** better, **w** worse, blank: no clear
difference), and the oracle control's verdict line (a per-token gain, a length-only gain, or none).
Nothing is recomputed: the cells are the reports' own, so this summary cannot disagree with them.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from experiments import frontier as fr
from experiments.report_views import kl_list

COLUMNS = ("true_reward", "true_reward_per_token", "safe_rate")
MARKS = {fr.BETTER: " **b**", fr.WORSE: " **w**"}


def _cell(row: pd.Series | None, digits: str = ".3g", full: bool = True) -> str:
    """mean [CI] (n=k) and the verdict mark; ``full=False`` (the diagnostics): no CI and no mark, and
    (n=k) only where the cell has no CI."""
    if row is None or not math.isfinite(row["value"]):
        return "–"
    text = f"{row['value']:{digits}}"
    has_ci = math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])
    if not full:
        return text if has_ci or int(row["n_seeds"]) >= 5 else f"{text} (n={int(row['n_seeds'])})"
    if has_ci:
        text += f" [{row['ci_low']:{digits}}, {row['ci_high']:{digits}}]"
    if int(row["n_seeds"]) < 5:
        text += f" (n={int(row['n_seeds'])})"
    return text + MARKS.get(row.get("verdict"), "")


def _rows(table: pd.DataFrame, budget: float) -> dict[tuple[str, str], pd.Series]:
    at = table[table["kl_budget"] == budget]
    return {(r["method"], r["metric"]): r for _, r in at.iterrows()}


def oracle_verdict(table: pd.DataFrame, oracle: str = "TIS-DPO(oracle)") -> str:
    """Where the oracle control clearly beats DPO (:func:`frontier.oracle_evidence`): per token (room for
    token weighting), only at budgets where fewer than 90% of the samples finish (not trustworthy), total
    only (length), or nowhere."""
    kind, per_token, total = fr.oracle_evidence(table, oracle)
    if kind == fr.ORACLE_CREDIT:
        return f"the oracle beats DPO per token at KL {kl_list(per_token or total)}"
    if kind == fr.ORACLE_FLAGGED:
        return (f"the oracle beats DPO per token only at KL {kl_list(per_token or total)}, where fewer than 90% of some "
                "method's samples finish: not trustworthy")
    if kind == fr.ORACLE_LENGTH:
        return f"the oracle beats DPO in total reward only (KL {kl_list(total)}): length, not credit"
    return "the oracle never beats DPO: nothing for token weighting to show"


def variant_section(name: str, table: pd.DataFrame) -> list[str]:
    budgets = sorted(table["kl_budget"].unique())
    lines = [f"### {name}", "", f"- Budgets: {kl_list(budgets)} nats; {oracle_verdict(table)}.", ""]
    methods = list(dict.fromkeys(table["method"]))
    for label, budget in (("middle", fr.middle_budget(budgets)), ("lowest", budgets[0])):
        if label == "lowest" and budget == fr.middle_budget(budgets):
            continue
        cells = _rows(table, budget)
        lines += [f"At KL {budget:.3g} ({label} budget):", "",
                  "| method | true reward | reward per token | safe rate | length | finished |",
                  "|---|---|---|---|---|---|"]
        for method in methods:
            row = [_cell(cells.get((method, metric))) for metric in COLUMNS]
            row += [_cell(cells.get((method, "length")), ".3g", full=False),
                    _cell(cells.get((method, "finished_rate")), ".2f", full=False)]
            lines.append(f"| {method} | " + " | ".join(row) + " |")
        lines.append("")
    return lines


def report_folders(paths: list[Path]) -> list[Path]:
    """The report folders: each path that holds a matched_kl.csv, else every folder below it that does."""
    found: list[Path] = []
    for path in paths:
        found += [path] if (path / "matched_kl.csv").is_file() else sorted(p.parent for p in path.rglob("matched_kl.csv"))
    if not found:
        raise SystemExit(f"{', '.join(map(str, paths))}: no matched_kl.csv in it or in its subfolders "
                         "(run experiments.report first)")
    return found


def summarise(paths: list[Path]) -> str:
    lines = ["# Built-in task variants at matched KL (from each report's matched_kl.csv)", "",
             "Mean [95% CI] over seeds; **b**/**w**: the paired CI of Δ vs DPO excludes 0 (better/worse); "
             "(n=k): only k seeds reach that KL; – : no run reaches it.", ""]
    for folder in report_folders(paths):
        name = folder.name.removeprefix("variant_")
        if (folder.parent / "matched_kl.csv").is_file():  # a second reading of one sweep (e.g. credit/low_kl)
            name = f"{folder.parent.name.removeprefix('variant_')} / {folder.name}"
        lines += variant_section(name, pd.read_csv(folder / "matched_kl.csv"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", help="report folders, or folders of them")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here (default: stdout)")
    args = parser.parse_args(argv)
    text = summarise(args.paths)
    if args.out is None:
        sys.stdout.write(text + "\n")
    else:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
