"""Every paper table can be filled at scale=paper: the eval config each experiment selects writes a
metric key for every column of its table (declared by tisdpo.eval.keys, which tests/test_judges.py and
tests/test_benchmarks.py check against what the judges and lm-eval actually return).

A column no eval config can produce fails here, on purpose: it names what is missing rather than
leaving a blank column in the report.
"""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from experiments.paper import load_paper_table
from tests.conftest import CONF, compose_config
from tisdpo.eval.keys import metric_keys

# Paper-table experiments (the variant_* sweeps are built-in task only: no paper table, no paper scale).
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")
                     if OmegaConf.load(p).get("paper_table") is not None)

# The eval preset each table needs at paper scale (conf/eval/<preset>.yaml).
TABLE_EVAL = {
    "tisdpo_pku_main": "judges_pku",
    "tisdpo_ablation": "judges_pku_nowin",
    "tisdpo_llm_generated": "judges_pku_nowin",
    "tisdpo_ultrafeedback": "judges_ultrafeedback",
    "tisdpo_tldr": "judges_tldr",
    "tidpo_main": "benchmarks",
    "tidpo_ablation": "benchmarks",
    "tidpo_label_noise": "benchmarks",
}


def _first_method(experiment: str) -> list[str]:
    params = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    return [f"method={str(params.method).split(',')[0]}"] if "method" in params else []


def uncovered(cfg) -> list[str]:
    """The table's columns for which no key of the composed eval config is among the column's keys."""
    table = load_paper_table(cfg.paper_table)
    keys = metric_keys(cfg.eval)
    return [f"{m.name} (reads {' or '.join(m.keys)})" for m in table.metrics if not any(k in keys for k in m.keys)]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_table_column_is_written_at_paper_scale(tmp_path, experiment):
    cfg = compose_config([f"experiment={experiment}", "scale=paper", *_first_method(experiment)], tmp_path, tiny=False)
    missing = uncovered(cfg)
    assert not missing, (f"experiment={experiment} at scale=paper selects eval={cfg.eval.name} "
                         f"(temperatures {list(cfg.eval.get('temperatures') or [])}), which writes no key for "
                         f"the {cfg.paper_table} column(s) {missing}; the table needs eval="
                         f"{TABLE_EVAL.get(cfg.paper_table, '?')}")


@pytest.mark.parametrize("table,preset", sorted(TABLE_EVAL.items()))
def test_each_tables_eval_preset_covers_it(tmp_path, table, preset):
    """The presets themselves, whatever the experiment files select (and only the temperatures the
    preset sets: an experiment that overrides eval.temperatures must keep the table's)."""
    cfg = compose_config([f"eval={preset}", "scale=paper", f"paper_table={table}"], tmp_path, tiny=False)
    assert cfg.eval.name in ("judges", "benchmarks")
    assert not uncovered(cfg), uncovered(cfg)


def test_every_table_has_a_preset():
    tables = {OmegaConf.load(CONF / "experiment" / f"{e}.yaml").paper_table for e in EXPERIMENTS}
    assert tables <= set(TABLE_EVAL), tables - set(TABLE_EVAL)


@pytest.mark.parametrize("scale", ["tiny", "paper"])
def test_scaled_eval_choices_pick_the_built_in_task_at_tiny_scale(tmp_path, scale):
    for preset in ("pku", "pku_nowin", "ultrafeedback", "tldr", "benchmarks"):
        cfg = compose_config([f"eval=scaled/{preset}_{scale}"], tmp_path, tiny=False)
        expected = "synthetic" if scale == "tiny" else ("benchmarks" if preset == "benchmarks" else "judges")
        assert cfg.eval.name == expected, preset


def test_the_tldr_preset_samples_greedily_and_reads_every_temperature(tmp_path):
    cfg = compose_config(["eval=judges_tldr", "scale=paper"], tmp_path, tiny=False)
    assert list(cfg.eval.temperatures) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {f"eval/win_rate_vs_reference@T{t}" for t in ("0", "0.25", "0.5", "0.75", "1")} <= metric_keys(cfg.eval)
    assert cfg.eval.baseline_from == "dataset" and cfg.eval.judges is None


def test_harm_reads_the_cost_model_and_help_the_reward_model(tmp_path):
    cfg = compose_config(["eval=judges_pku", "scale=paper"], tmp_path, tiny=False)
    assert cfg.eval.judges.harm.model_name_or_path.endswith("beaver-7b-v1.0-cost")
    assert cfg.eval.judges.harm.higher_is_better is False
    assert cfg.eval.judges.help.model_name_or_path.endswith("beaver-7b-v1.0-reward")
    assert cfg.eval.mt_bench.answer_max_new_tokens == 1024 and cfg.eval.mt_bench.expected_questions == 80
    assert cfg.eval.pairwise.concurrency == 8 and cfg.eval.pairwise.cache_dir
    table = load_paper_table("tisdpo_pku_main")
    directions = {m.name: (m.key, m.direction) for m in table.metrics}
    assert directions["Harm"] == ("eval/harm", "down") and directions["Help"] == ("eval/help", "up")
