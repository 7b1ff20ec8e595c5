"""experiments.variants_summary: one table across the variants' reports, cells copied from matched_kl.csv."""
from __future__ import annotations

import pandas as pd
import pytest

from experiments import frontier as fr
from experiments.variants_summary import main, oracle_verdict


def _table(oracle_total: str, oracle_per_token: str) -> pd.DataFrame:
    rows = []
    for budget in (1.0, 2.0, 3.0):
        for method, verdicts in (("DPO", ("", "")), ("TIS-DPO(oracle)", (oracle_total, oracle_per_token))):
            for metric, verdict in zip(("true_reward", "true_reward_per_token"), verdicts):
                rows.append({"method": method, "kl_budget": budget, "metric": metric, "value": budget,
                             "ci_low": budget - 0.5, "ci_high": budget + 0.5, "n_seeds": 5 if method == "DPO" else 3,
                             "verdict": verdict or float("nan")})
            rows.append({"method": method, "kl_budget": budget, "metric": "safe_rate", "value": 0.5, "ci_low": 0.4,
                         "ci_high": 0.6, "n_seeds": 5, "verdict": float("nan")})
    return pd.DataFrame(rows)


def test_the_oracle_verdict_separates_credit_from_length():
    assert "per token at KL 1, 2, 3" in oracle_verdict(_table(fr.BETTER, fr.BETTER))
    assert "total reward only" in oracle_verdict(_table(fr.BETTER, fr.UNCLEAR))
    assert "never beats" in oracle_verdict(_table(fr.UNCLEAR, fr.UNCLEAR))
    unfinished = _table(fr.BETTER, fr.BETTER)
    unfinished = pd.concat([unfinished, pd.DataFrame([{"method": "DPO", "kl_budget": b, "metric": "finished_rate",
                                                      "value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n_seeds": 5}
                                                     for b in (1.0, 2.0, 3.0)])])
    assert "not trustworthy" in oracle_verdict(unfinished)


def test_the_summary_copies_the_reports_cells_at_the_middle_and_lowest_budgets(tmp_path, capsys):
    for name, verdicts in (("alpha", (fr.BETTER, fr.BETTER)), ("beta", (fr.BETTER, fr.UNCLEAR))):
        (tmp_path / name).mkdir()
        _table(*verdicts).to_csv(tmp_path / name / "matched_kl.csv", index=False)
    (tmp_path / "alpha" / "low_kl").mkdir()  # a second reading of the same sweep, inside its report
    _table(fr.UNCLEAR, fr.UNCLEAR).to_csv(tmp_path / "alpha" / "low_kl" / "matched_kl.csv", index=False)
    out = tmp_path / "summary.md"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    alpha = text.split("### alpha\n")[1].split("### ")[0]
    assert "never beats" in text.split("### alpha / low_kl")[1].split("### ")[0]
    assert "At KL 2 (middle budget)" in alpha and "At KL 1 (lowest budget)" in alpha
    assert "| TIS-DPO(oracle) | 2 [1.5, 2.5] (n=3) **b** | 2 [1.5, 2.5] (n=3) **b** | 0.5 [0.4, 0.6] |" in alpha
    assert "| DPO | 2 [1.5, 2.5] | 2 [1.5, 2.5] | 0.5 [0.4, 0.6] | – | – |" in alpha
    assert "total reward only" in text.split("### beta")[1]
    # report folders named one by one (reproduce_tiny.sh: reports/variant_*) give the same sections
    one_by_one = tmp_path / "one_by_one.md"
    assert main([str(tmp_path / "alpha"), str(tmp_path / "alpha" / "low_kl"), str(tmp_path / "beta"),
                 "--out", str(one_by_one)]) == 0
    assert one_by_one.read_text() == text
    with pytest.raises(SystemExit, match="no matched_kl.csv in it or in its subfolders"):
        main([str(tmp_path / "nothing_here")])
