"""The eval curve during preference training (tisdpo/eval/curve.py): points at step 0, every N
steps and the last; training bit-identical with and without it; RNG and train mode untouched."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import compose_config
from tisdpo.eval.curve import CURVE_METRICS, EvalCurve, curve_steps
from tisdpo.stages.evaluation import check_eval_options, training_evaluators
from tisdpo.stages.runner import run
from tisdpo.runtime.validate import ConfigError
from tisdpo.tasks import SyntheticTask, SyntheticTaskConfig

# A tiny SFT (15 steps) rarely ends its answers: keep them so that every metric is a number.
CURVE = ["eval.every_n_steps=3", "eval.curve_n_prompts=16", "eval.unfinished=keep", "eval.curve_schedule=uniform"]


def _run(tmp_path, name: str, *overrides: str) -> dict:
    cfg = compose_config([*overrides, f"cache.dir={tmp_path / 'cache'}"], tmp_path / name)
    return run(cfg)


def test_curve_points_and_training_unchanged(tmp_path):
    with_curve = _run(tmp_path, "curve", *CURVE)
    # same SFT artifact (shared cache), no curve (the curve is on by default: turned off here)
    without = _run(tmp_path, "plain", "eval.unfinished=keep", "eval.every_n_steps=0")

    curve = with_curve["eval/curve"]
    assert [p["step"] for p in curve] == [0, 3, 6]  # step 0, every 3, the last (6)
    for point in curve:
        assert set(point) == {"step", "seconds", *CURVE_METRICS}
        assert all(isinstance(v, (int, float)) for v in point.values())
    assert curve[0]["kl_ref"] == pytest.approx(0.0, abs=1e-5)  # the SFT policy is the reference
    assert curve[0]["win_rate"] == pytest.approx(0.5)           # ... and samples like it (same seed)
    assert curve[-1]["kl_ref"] != curve[0]["kl_ref"]
    assert with_curve["time/curve_s"] > 0
    assert "eval/curve" not in without

    # The curve must not change training: same validation metrics and bit-identical weights.
    for key in (k for k in without if k.startswith(("val/", "train/", "eval/")) and k != "eval/curve"):
        assert with_curve[key] == without[key], key
    a = load_file(str(tmp_path / "curve" / "run" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "run" / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(SyntheticTaskConfig(seed=0, n_sft=64, n_train_pairs=32, n_test_pairs=16))


@pytest.fixture(scope="module")
def models(task):
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**task.tiny_model_config()))
    reference = LlamaForCausalLM(LlamaConfig(**task.tiny_model_config())).eval()
    return policy, reference


class _Logger:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((metrics, step))


def test_point_restores_rng_and_train_mode_and_logs(task, models):
    policy, reference = models
    callback = EvalCurve(task, task.tokenizer(), reference, every_n_steps=2, n_prompts=4, max_new_tokens=6,
                         unfinished="keep", schedule="uniform")
    trainer = SimpleNamespace(global_step=0, logger=_Logger())
    module = SimpleNamespace(policy=policy.train(), device=torch.device("cpu"))
    state = torch.random.get_rng_state()
    callback.on_train_start(trainer, module)
    assert torch.equal(torch.random.get_rng_state(), state)  # training's random stream untouched
    assert policy.training  # back in train mode

    for step in (1, 2, 2, 3):  # a repeated step (gradient accumulation) gives one point
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, 0)
    callback.on_train_end(trainer, module)
    assert [p["step"] for p in callback.latest["eval/curve"]] == [0, 2, 3]
    metrics, step = trainer.logger.logged[1]
    assert step == 2 and set(metrics) == {f"curve/{k}" for k in (*CURVE_METRICS, "seconds")}

    # Same policy, same seed at every point: the same numbers (common random numbers).
    again = callback.measure(policy)
    first = callback.latest["eval/curve"][0]
    assert {k: again[k] for k in CURVE_METRICS} == pytest.approx({k: first[k] for k in CURVE_METRICS})


def test_curve_survives_resume(task, models):
    policy, reference = models
    callback = EvalCurve(task, task.tokenizer(), reference, every_n_steps=5, n_prompts=2, max_new_tokens=4)
    callback.points = [{"step": 0, "kl_ref": 0.0}, {"step": 5, "kl_ref": 0.1}]
    resumed = EvalCurve(task, task.tokenizer(), reference, every_n_steps=5, n_prompts=2, max_new_tokens=4)
    resumed.load_state_dict(callback.state_dict())
    assert [p["step"] for p in resumed.latest["eval/curve"]] == [0, 5]
    trainer = SimpleNamespace(global_step=5, logger=None)
    resumed.on_train_start(trainer, SimpleNamespace(policy=policy, device=torch.device("cpu")))
    assert len(resumed.points) == 2  # step 5 already measured before the checkpoint: not again


def test_no_curve_off_the_builtin_task(caplog):
    cfg = compose_config(["eval=judges", "+eval.every_n_steps=10"])
    data = SimpleNamespace(task=None)
    with caplog.at_level(logging.WARNING):
        assert training_evaluators(cfg, data, reference=None) == []
    assert "no eval curve with eval=judges" in caplog.text
    # on by default (every 10 steps, dense start), but never without the built-in task's true rewards
    assert compose_config([]).eval.every_n_steps == 10 and compose_config([]).eval.curve_n_prompts == 256
    assert training_evaluators(compose_config([]), data, reference=None) == []


def test_curve_options_are_checked():
    with pytest.raises(ConfigError, match="eval.every_n_steps"):
        training_evaluators(compose_config(["eval.every_n_steps=-1"]), SimpleNamespace(task=None), None)


def test_dense_start_schedule():
    """Powers of two below N, then every N: dense where KL moves fastest (issue #22)."""
    steps = [s for s in range(1, 41) if curve_steps(s, 10)]
    assert steps == [1, 2, 4, 8, 10, 20, 30, 40]
    assert [s for s in range(1, 41) if curve_steps(s, 10, "uniform")] == [10, 20, 30, 40]
    assert [s for s in range(1, 9) if curve_steps(s, 2)] == [1, 2, 4, 6, 8]  # every 2: a superset of the default
    assert {s for s in range(1, 151) if curve_steps(s, 10)} <= {s for s in range(1, 151) if curve_steps(s, 2)}
    with pytest.raises(ValueError, match="curve_schedule"):
        curve_steps(3, 10, "sparse")
    with pytest.raises(ConfigError, match="eval.curve_schedule"):
        check_eval_options(compose_config(["eval.curve_schedule=sparse"]))


def test_dense_schedule_points_in_a_run(tmp_path):
    """The default schedule in a real run: steps 0, 1, 2, 4 and the last; the reference's distance to
    the task's generating process and the exact optimal frontier land in results.json."""
    out = _run(tmp_path, "dense", "eval.every_n_steps=5", "eval.curve_n_prompts=8", "eval.unfinished=keep")
    assert [p["step"] for p in out["eval/curve"]] == [0, 1, 2, 4, 5, 6]
    assert all(p["true_reward_se"] >= 0 for p in out["eval/curve"])
    frontier = out["eval/optimal_frontier"]
    assert frontier[0]["kl"] == pytest.approx(0.0, abs=1e-9) and len(frontier) > 100
    assert all(a["kl"] <= b["kl"] and a["true_reward"] <= b["true_reward"] + 1e-9 for a, b in zip(frontier, frontier[1:]))
    assert "eval/reference_reward_gap" not in out or isinstance(out["eval/reference_reward_gap"], float)
