"""Every config of every group composes; bad configs fail with one clear line before any model loads."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, compose_config
from tisdpo.runtime.validate import ConfigError, validate_config


def _choices(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml")
                  if not p.name.startswith("_"))


GROUP_CASES = [(g, c) for g in ("loss", "estimator", "dataset", "model", "optim", "trainer", "logger", "eval")
               for c in _choices(g)]


@pytest.mark.parametrize("group,choice", GROUP_CASES, ids=[f"{g}={c}" for g, c in GROUP_CASES])
def test_every_group_choice_composes(tmp_path, group, choice):
    overrides = [f"{group}={choice}"]
    if group == "model" and choice == "hf":
        overrides.append("model.name_or_path=some-org/some-model")
    if group == "loss" and choice == "tisdpo":
        overrides.append("estimator=dpo_pair")
    cfg = compose_config(overrides, tmp_path)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg[group] is not None


def _swept_methods(experiment: str) -> list[str]:
    params = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    return str(params.method).split(",")


EXPERIMENT_CASES = [(e, s) for e in _choices("experiment") for s in ("tiny", "paper")]


@pytest.mark.parametrize("experiment,scale", EXPERIMENT_CASES, ids=[f"{e}-{s}" for e, s in EXPERIMENT_CASES])
def test_every_experiment_composes_at_both_scales_for_every_swept_method(tmp_path, experiment, scale):
    for method in _swept_methods(experiment):
        cfg = compose_config([f"experiment={experiment}", f"scale={scale}", f"method={method}"], tmp_path, tiny=False)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["scale"] == scale, (experiment, method)
        if experiment.startswith("variant_"):  # built-in task variants: no paper table, tiny scale only
            assert resolved["paper_table"] is None and cfg.dataset.name == "synthetic"
            validate_config(cfg)
            continue
        # a paper table's sweep names its table; a comparison no paper publishes (token_methods) has none
        assert resolved["paper_table"] or experiment == "token_methods", (experiment, method)
        if scale == "tiny":
            assert cfg.dataset.name == "synthetic" and cfg.model.name_or_path is None
            validate_config(cfg)   # the tiny sweep is the one that runs here: it must pass validation
        else:
            assert cfg.model.name_or_path and cfg.dataset.name != "synthetic", (experiment, method)
            validate_config(cfg)  # the paper sweep must pass validation too (hub paths are not checked here)


def test_defaults_are_the_builtin_task_with_dpo(tmp_path):
    cfg = compose_config([], tmp_path, tiny=False)
    assert (cfg.loss.name, cfg.estimator.name, cfg.dataset.name, cfg.model.name_or_path) == ("dpo", "none", "synthetic", None)
    validate_config(cfg)


def test_real_model_config_brings_the_papers_optimiser(tmp_path):
    cfg = compose_config(["model=hf", "model.name_or_path=x"], tmp_path, tiny=False)
    assert cfg.optim.optimizer._target_ == "torch.optim.RMSprop"
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (5e-7, 150)


def test_tidpo_selects_the_gradient_estimator(tmp_path):
    cfg = compose_config(["loss=tidpo"], tmp_path)
    assert cfg.estimator.name == "gradient"
    validate_config(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["loss=tisdpo"], "loss=tisdpo needs token weights: add estimator=<one of critical_tokens, dpo_pair, dpo_reward, oracle, prompt, random, sft_pair, uniform>"),
    (["loss=tisdpo", "estimator=gradient"], "estimator=gradient gives online weights, and loss=tisdpo takes offline weights; "
                                             "valid: critical_tokens, dpo_pair, dpo_reward, oracle, prompt, random, sft_pair, uniform"),
    (["loss=dpo", "estimator=prompt"], "estimator=prompt has no effect with loss=dpo"),
    (["dataset.max_prompt_length=100"], "dataset.max_prompt_length=100 must be positive and below dataset.max_length=64"),
    (["dataset=hh", "dataset.path=/nonexistent/file.jsonl", "model.tokenizer=/tmp"], "dataset.path='/nonexistent/file.jsonl': no such file"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path='/nonexistent/model': no such file or directory"),
    (["dataset.label_noise=1.5"], "dataset.label_noise=1.5 must be a share in [0, 1]"),
    (["dataset.truncation_mode=middle"], "dataset.truncation_mode='middle' is not one of keep_end, keep_start"),
])
def test_bad_config_is_one_clear_line(tmp_path, overrides, message):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    assert message in str(error.value)


def test_unknown_group_choice_lists_the_valid_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as error:
        compose_config(["loss=nope"], tmp_path)
    for valid in ("dpo", "ipo", "kto", "tdpo", "tisdpo", "tidpo"):
        assert valid in str(error.value)
