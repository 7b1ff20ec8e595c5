"""Each method's cost as a separate process: wall time, CPU time and peak memory of a whole run, over DPO's.

    python -m bench.method_cost                                  # the methods of experiment=token_methods, seed 0
    python -m bench.method_cost --methods dpo,confpo --extra "train.max_steps=20 sft.max_steps=50" --repeat 2
    python -m experiments.report <sweep> --cost method_cost.csv  # the ranking's cost columns

For each method ``m`` (DPO first: it is the anchor of every ratio) this runs

    python run.py method=m seed=0 logger=none trainer.enable_progress_bar=false hydra.run.dir=<tmp> [extra ...]

as a child process with ``TISDPO_CACHE`` set to a fresh empty directory, so the cost is that of a
whole run from nothing: data, the SFT model, every estimator or pair model the method needs
(TIS-DPO(D)'s pi+/pi-, the DPO model of TGDPO and SePO, ...), its scores, the reference log-probs,
training and evaluation. (In a sweep the SFT model and the estimator models are cached and shared,
so the ratios here overstate what one more seed costs; ``train_s``, the training stage alone from
the run's ``results.json``, is beside them.) The child is reaped with ``os.wait4``, which gives

- ``cpu_s``: its user + system CPU seconds (``ru_utime + ru_stime``, its reaped children included);
- ``peak_rss_mb``: its peak resident set size in MiB (``ru_maxrss``: the largest single process
  among it and its reaped children, not a sum; host memory only, a GPU's memory is not in it).
  Linux keeps the high-water mark across the child's exec, so the figure is never below this
  process's own peak RSS when it spawned the child (the *floor*, printed; ~100 MiB, far below a
  run's, which loads torch and the models);
- ``wall_s``: the wall-clock seconds from start to exit.

With ``--repeat N`` each figure is the median over the N rounds (methods in the same order each
round, so a burst of load on a shared machine hits every method alike). Writes ``--out`` (CSV: one
row per method, with ``wall_ratio``, ``cpu_ratio``, ``peak_rss_ratio`` and ``train_ratio`` to the
``dpo`` row) and the same table as Markdown beside it (``.md``), and prints the Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOKEN_METHODS = ROOT / "conf" / "experiment" / "token_methods.yaml"
ANCHOR = "dpo"
BASE_OVERRIDES = ("logger=none", "trainer.enable_progress_bar=false")
STAGE_TIMES = {"sft_s": "time/sft_s", "weights_s": "time/weights_s", "train_s": "time/train_s", "eval_s": "time/eval_s"}
MEASURES = ("wall_s", "cpu_s", "peak_rss_mb")
RATIOS = {"wall_ratio": "wall_s", "cpu_ratio": "cpu_s", "peak_rss_ratio": "peak_rss_mb", "train_ratio": "train_s"}
COLUMNS = ["method", "label", "runs", "status", *MEASURES, *STAGE_TIMES, *RATIOS]
NOTE = ("One run of each method as its own process with an empty cache (TISDPO_CACHE): the cost includes the SFT "
        "stage and any estimator / pair models the method needs. Ratios are over the dpo row; peak RSS is the "
        "largest single process's (host memory; a GPU's memory is not in it).")


@dataclass(frozen=True)
class Measurement:
    """What ``os.wait4`` and a clock say of one child process."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int


def maxrss_mb(ru_maxrss: int, platform: str = sys.platform) -> float:
    """``ru_maxrss`` in MiB: Linux reports KiB, macOS bytes."""
    return ru_maxrss / 2**20 if platform == "darwin" else ru_maxrss / 2**10


def measure(command: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            log: Path | None = None, timeout: float | None = None) -> Measurement:
    """Run ``command`` to its end and measure it: wall time, CPU time (user + system) and peak RSS
    from ``os.wait4`` (the child and the children it reaped). Output goes to ``log`` (else
    discarded); past ``timeout`` seconds the child is killed (returncode -9)."""
    sink = open(log, "wb") if log is not None else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, process.kill) if timeout else None
        if timer is not None:
            timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            if timer is not None:
                timer.cancel()
        wall = time.perf_counter() - start
    finally:
        if log is not None:
            sink.close()
    process.returncode = os.waitstatus_to_exitcode(status)   # reaped here: Popen must not wait for it again
    return Measurement(wall, usage.ru_utime + usage.ru_stime, maxrss_mb(usage.ru_maxrss), process.returncode)


def rss_floor_mb() -> float:
    """The least peak RSS a child of this process can show (see the module docstring): a trivial child's."""
    return measure([sys.executable, "-c", ""]).peak_rss_mb


def default_methods(path: Path = TOKEN_METHODS) -> list[str]:
    """The methods ``experiment=token_methods`` sweeps (its ``hydra.sweeper.params.method``)."""
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [m.strip() for m in str(config["hydra"]["sweeper"]["params"]["method"]).split(",") if m.strip()]


def anchor_first(methods: Sequence[str], anchor: str = ANCHOR) -> list[str]:
    """``methods`` without repeats, the anchor (DPO) first whether it was asked for or not."""
    return [anchor, *dict.fromkeys(m for m in methods if m != anchor)]


def run_command(method: str, run_dir: Path, seed: int = 0, extra: Sequence[str] = ()) -> list[str]:
    """The command line of one measured run."""
    return [sys.executable, "run.py", f"method={method}", f"seed={seed}", *BASE_OVERRIDES,
            f"hydra.run.dir={run_dir}", *extra]


def read_results(path: Path) -> dict[str, Any]:
    """The run's label and stage times from its ``results.json`` ({} when it wrote none)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    out: dict[str, Any] = {"label": config.get("label") or results.get("method_label") or ""}
    for column, key in STAGE_TIMES.items():
        if isinstance(results.get(key), (int, float)):
            out[column] = float(results[key])
    return out


def run_method(method: str, root: Path, seed: int = 0, extra: Sequence[str] = (), keep: bool = False,
               timeout: float | None = None) -> dict[str, Any]:
    """One measured run of ``method`` under ``root`` (its own empty cache and run dir): one row."""
    work = Path(tempfile.mkdtemp(prefix=f"{method}_", dir=root))
    env = {**os.environ, "TISDPO_CACHE": str(work / "cache"), "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    log = work / "run.out"
    result = measure(run_command(method, work / "run", seed, extra), env=env, cwd=ROOT, log=log, timeout=timeout)
    row = {"method": method, "wall_s": result.wall_s, "cpu_s": result.cpu_s, "peak_rss_mb": result.peak_rss_mb,
           "status": "ok" if result.returncode == 0 else f"failed (exit {result.returncode}; log {log})",
           **read_results(work / "run" / "results.json")}
    if not keep and result.returncode == 0:
        shutil.rmtree(work, ignore_errors=True)
    return row


def summarise(rows: Sequence[dict[str, Any]], anchor: str = ANCHOR) -> pd.DataFrame:
    """One row per method (in first-seen order): the median of its successful runs' figures, ``runs``
    (how many), ``status`` (ok, or the last failure), and each ratio to the ``anchor`` row."""
    frame = pd.DataFrame.from_records(list(rows))
    for column in COLUMNS:
        if column not in frame.columns:
            frame[column] = "" if column in ("label", "status") else float("nan")
    records = []
    for method, runs in frame.groupby("method", sort=False):
        ok = runs[runs["status"] == "ok"]
        record = {"method": method, "label": next((l for l in runs["label"] if isinstance(l, str) and l), ""),
                  "runs": len(ok), "status": "ok" if len(ok) else runs["status"].iloc[-1]}
        for column in (*MEASURES, *STAGE_TIMES):
            record[column] = float(pd.to_numeric(ok[column], errors="coerce").median()) if len(ok) else float("nan")
        records.append(record)
    table = pd.DataFrame.from_records(records)
    base = table[table["method"] == anchor]
    for ratio, column in RATIOS.items():
        table[ratio] = table[column] / base[column].iloc[0] if len(base) else float("nan")
    return table[COLUMNS]


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: seconds to 0.1, MiB to 1, ratios to 0.01; ``-`` for a missing value."""
    def cell(column: str, value: Any) -> str:
        if not isinstance(value, float):
            return str(value).replace("|", "\\|")
        if value != value:   # NaN
            return "-"
        digits = 2 if column.endswith("ratio") else 0 if column == "peak_rss_mb" else 1
        return f"{value:.{digits}f}"

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(table.columns, row)) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.method_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated method configs (default: experiment=token_methods's); "
                                          f"{ANCHOR} always runs, first")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the methods; figures are medians")
    parser.add_argument("--extra", action="append", default=[], metavar="OVERRIDES",
                        help="Hydra overrides for every run (repeatable, space-separated), e.g. 'train.max_steps=20'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("method_cost.csv"), help="the CSV (the Markdown: .md beside it)")
    parser.add_argument("--workdir", type=Path, help="where the runs' caches and run dirs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep every run's cache and run dir (failed ones are kept)")
    parser.add_argument("--timeout", type=float, help="seconds before a run is killed (default: none)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    methods = anchor_first(args.methods.split(",") if args.methods else default_methods())
    extra = [override for chunk in args.extra for override in shlex.split(chunk)]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)   # a named workdir need not exist yet
    root = Path(tempfile.mkdtemp(prefix="method_cost_", dir=args.workdir))
    rows = []
    for round_ in range(args.repeat):
        for method in methods:
            row = run_method(method, root, args.seed, extra, keep=args.keep, timeout=args.timeout)
            print(f"[{round_ + 1}/{args.repeat}] {method}: {row['status']}, wall {row['wall_s']:.1f}s, "
                  f"CPU {row['cpu_s']:.1f}s, peak RSS {row['peak_rss_mb']:.0f} MiB", flush=True)
            rows.append(row)
    table = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    text = (f"{NOTE}\n\nCommand: `{shlex.join(run_command('M', Path('TMP'), args.seed, extra)[1:])}`, "
            f"{args.repeat} round(s), medians; peak RSS floor (the measuring process's own) "
            f"{rss_floor_mb():.0f} MiB.\n\n{markdown(table)}\n")
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(f"\n{text}\nwrote {args.out} and {args.out.with_suffix('.md')}")
    if not any(True for _ in root.iterdir()):
        root.rmdir()
    return table


if __name__ == "__main__":
    main()
