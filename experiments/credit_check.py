"""Issue #22's done-when criteria, computed from run directories by code independent of the reports.

    python -m experiments.credit_check RUN_DIR_OR_SWEEP... [--dense DIR...] [--json OUT]

Reads each run's ``results.json`` (``eval/curve``, ``eval/optimal_frontier``, ``config``); finds runs
anywhere below the given directories. Methods by label: ``DPO``, ``TIS-DPO(oracle)``, ``random weight``
(``--dpo/--oracle/--random`` rename them).

Independent of experiments/frontier.py on purpose: a reading at a KL budget is taken where the run's
curve, *in step order*, first reaches the budget (linear between the two steps around the crossing),
not by sorting the points by KL.

- Budgets: 25/50/75% of the KL range every run of those methods covers: [max of the runs' smallest
  KL, min of their largest KL].
- (1) The oracle beats DPO in reward per token in every seed at >= 2 of the 3 budgets.
- (2) Random weights get less than half the oracle's gain over DPO (mean over seeds, reward per token)
  at every budget where the oracle gains.
- (3) No curve point of any run is above ``eval/optimal_frontier`` by more than 1.96 standard errors of
  the point's reading (``true_reward_se``; the raw largest excess is printed too).
- (4) DPO's share of the reachable gain at the middle budget is <= 70%: (R(k) − R(0)) / (F(k) − F(0)),
  R the run's curve (R(0) its reference, step 0), F the optimal frontier.
- (5) With ``--dense``: for each method, seed 0, the readings at the budgets of the default schedule and
  of an ``eval.every_n_steps=2`` run of the same seed agree within 10% of DPO's reward range (max − min
  of DPO's curve), for total reward and for reward per token (its own range).
- Time: each run's ``time/total_s``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

FRACTIONS = (0.25, 0.5, 0.75)
Z95 = 1.96


def load_runs(paths):
    runs = []
    for root in paths:
        root = Path(root)
        files = [root / "results.json"] if (root / "results.json").is_file() else sorted(root.rglob("results.json"))
        for f in files:
            r = json.loads(f.read_text())
            if not r.get("eval/curve"):
                continue
            cfg = r.get("config") or {}
            runs.append({"dir": str(f.parent), "label": cfg.get("label"), "seed": cfg.get("seed"),
                         "curve": sorted(r["eval/curve"], key=lambda p: p["step"]),
                         "frontier": r.get("eval/optimal_frontier"), "seconds": r.get("time/total_s"),
                         "every": (cfg.get("eval") or {}).get("every_n_steps")})
    return runs


def reading(curve, kl, key):
    """The value of ``key`` where the curve, in step order, first reaches KL ``kl`` (linear between
    the two points around the crossing); NaN if it never does."""
    prev = None
    for p in curve:
        if prev is not None and prev["kl_ref"] < kl <= p["kl_ref"]:
            t = (kl - prev["kl_ref"]) / (p["kl_ref"] - prev["kl_ref"])
            return prev[key] + t * (p[key] - prev[key])
        if p["kl_ref"] == kl:
            return p[key]
        prev = p
    return math.nan


def frontier_value(frontier, kl):
    xs = [p["kl"] for p in frontier]
    ys = [p["true_reward"] for p in frontier]
    return float(np.interp(max(kl, 0.0), xs, ys)) if kl <= xs[-1] else math.nan


def check(runs, dense, names, fractions=FRACTIONS):
    dpo, oracle, random = names
    by = {(r["label"], r["seed"]): r for r in runs if r["label"] in names}
    seeds = sorted({s for (lab, s) in by if lab == dpo} & {s for (lab, s) in by if lab == oracle})
    used = [r for r in by.values() if r["seed"] in seeds]
    low = max(min(p["kl_ref"] for p in r["curve"]) for r in used)
    high = min(max(p["kl_ref"] for p in r["curve"]) for r in used)
    budgets = [low + f * (high - low) for f in fractions]
    out = {"seeds": seeds, "kl_range": [low, high], "budgets": budgets, "readings": {}, "criteria": {}}
    for (lab, s), r in by.items():
        if s in seeds:
            out["readings"][f"{lab}|{s}"] = {
                key: [reading(r["curve"], b, key) for b in budgets]
                for key in ("true_reward", "true_reward_per_token", "safe_rate", "length", "finished_rate")}
    R = out["readings"]

    def per_token(lab, s):
        return np.array(R[f"{lab}|{s}"]["true_reward_per_token"])

    # (1)
    wins = np.array([per_token(oracle, s) > per_token(dpo, s) for s in seeds])      # [seeds, budgets]
    every_seed = wins.all(0)
    out["criteria"]["1_oracle_beats_dpo_per_token"] = {
        "wins_per_seed_per_budget": wins.tolist(), "budgets_won_in_every_seed": int(every_seed.sum()),
        "pass": bool(every_seed.sum() >= 2)}
    # (2)
    gain_o = np.mean([per_token(oracle, s) - per_token(dpo, s) for s in seeds], 0)
    rs = [s for s in seeds if f"{random}|{s}" in R]
    crit2 = {"oracle_gain": gain_o.tolist()}
    if rs:
        gain_r = np.mean([per_token(random, s) - per_token(dpo, s) for s in rs], 0)
        where = gain_o > 0
        crit2.update(random_gain=gain_r.tolist(), random_seeds=rs,
                     pass_=bool(where.any() and (gain_r[where] < 0.5 * gain_o[where]).all()))
    out["criteria"]["2_random_less_than_half"] = crit2
    # (3)
    worst = {"excess": -math.inf}
    worst_z = {"z": -math.inf}
    above = []
    for r in runs:
        f = r["frontier"]
        if not f:
            continue
        for p in r["curve"]:
            fv = frontier_value(f, p["kl_ref"])
            if math.isnan(fv):
                continue
            excess = p["true_reward"] - fv
            se = p.get("true_reward_se") or 0.0
            z = excess / se if se > 0 else (math.inf if excess > 0 else -math.inf)
            if excess > worst["excess"]:
                worst = {"excess": excess, "run": r["dir"], "step": p["step"], "kl": p["kl_ref"], "se": se}
            if z > worst_z["z"]:
                worst_z = {"z": z, "run": r["dir"], "step": p["step"], "kl": p["kl_ref"], "excess": excess}
            if excess > Z95 * se:
                above.append({"run": r["dir"], "step": p["step"], "kl": p["kl_ref"], "excess": excess, "se": se})
    out["criteria"]["3_below_optimal_frontier"] = {"largest_excess": worst, "largest_excess_in_se": worst_z,
                                                   "points_above_by_more_than_1.96se": above, "pass": not above}
    # (4)
    mid = len(budgets) // 2
    shares = {}
    for (lab, s), r in by.items():
        if s not in seeds or not r["frontier"]:
            continue
        f0, fk = frontier_value(r["frontier"], 0.0), frontier_value(r["frontier"], budgets[mid])
        shares[f"{lab}|{s}"] = (reading(r["curve"], budgets[mid], "true_reward") - r["curve"][0]["true_reward"]) / (fk - f0)
    dpo_share = float(np.mean([shares[f"{dpo}|{s}"] for s in seeds]))
    out["criteria"]["4_dpo_leaves_30pct"] = {"shares_at_middle_budget": shares, "dpo_mean_share": dpo_share,
                                             "pass": dpo_share <= 0.7}
    # (5)
    if dense:
        d_by = {(r["label"], r["seed"]): r for r in dense}
        base = by.get((dpo, seeds[0]))
        ranges = {key: max(p[key] for p in base["curve"]) - min(p[key] for p in base["curve"])
                  for key in ("true_reward", "true_reward_per_token")}
        rows, ok = [], True
        for lab in (dpo, oracle):
            a, b = by.get((lab, seeds[0])), d_by.get((lab, seeds[0]))
            if a is None or b is None:
                ok = False
                rows.append({"method": lab, "missing": True})
                continue
            for key, span in ranges.items():
                x = [reading(a["curve"], k, key) for k in budgets]
                y = [reading(b["curve"], k, key) for k in budgets]
                err = [abs(u - v) / span for u, v in zip(x, y)]
                ok &= all(e <= 0.10 for e in err)
                rows.append({"method": lab, "metric": key, "default": x, "every_2": y, "error_share_of_dpo_range": err})
        out["criteria"]["5_interpolation_error"] = {"dpo_ranges": ranges, "rows": rows, "pass": bool(ok)}
    out["seconds"] = {f"{r['label']}|{r['seed']}": r["seconds"] for r in used}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--dense", nargs="*", default=[])
    ap.add_argument("--dpo", default="DPO")
    ap.add_argument("--oracle", default="TIS-DPO(oracle)")
    ap.add_argument("--random", default="random weight")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    result = check(load_runs(args.runs), load_runs(args.dense) if args.dense else [],
                   (args.dpo, args.oracle, args.random))
    text = json.dumps(result, indent=1, default=float)
    if args.json:
        Path(args.json).write_text(text)
    print(f"seeds {result['seeds']}  KL range {result['kl_range'][0]:.3f}..{result['kl_range'][1]:.3f}  "
          f"budgets {', '.join(f'{b:.3f}' for b in result['budgets'])}")
    print(f"{'run':28s} " + " | ".join(f"KL {b:.2f}: R  R/tok  safe  len  fin" for b in result["budgets"]))
    for name, v in sorted(result["readings"].items()):
        cells = [f"{v['true_reward'][i]:+.2f} {v['true_reward_per_token'][i]:+.4f} {v['safe_rate'][i]:.2f} "
                 f"{v['length'][i]:.1f} {v['finished_rate'][i]:.2f}" for i in range(len(result["budgets"]))]
        print(f"{name:28s} " + " | ".join(cells))
    failed = False
    for name, c in result["criteria"].items():
        passed = c.get("pass", c.get("pass_"))
        failed |= passed is False
        print(f"{name}: {'PASS' if passed else 'FAIL' if passed is False else 'n/a'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
