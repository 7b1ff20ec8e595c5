"""Config values that would train nonsense (or crash deep inside) are one line before any model
loads; Lightning Trainer keys the pipeline sets point at the option to use; results JSON is strict."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT, compose_config
from tisdpo.errors import UserError
from tisdpo.runtime.validate import ConfigError, override_problem, validate_config

BAD_VALUES = [
    # losses: beta scales the margin; <= 0 ignores or inverts the data
    (["loss.beta=0"], "loss.beta=0 must be > 0 (the strength of the KL constraint)"),
    (["loss.beta=-0.1"], "loss.beta=-0.1 must be > 0"),
    (["loss=ipo", "loss.beta=0"], "loss.beta=0 must be > 0"),
    (["loss.beta=abc"], "loss.beta='abc' must be a number"),
    (["loss.label_smoothing=1.5"], "loss.label_smoothing=1.5 must be in [0, 0.5) (the assumed share of flipped labels"),
    (["loss.label_smoothing=0.5"], "loss.label_smoothing=0.5 must be in [0, 0.5)"),
    (["loss.label_smoothing=-0.1"], "loss.label_smoothing=-0.1 must be in [0, 0.5)"),
    (["loss=tdpo", "loss.alpha=-1"], "loss.alpha=-1 must be >= 0"),
    (["loss=tdpo", "loss.variant=tdpo3"], "loss.variant='tdpo3' is not one of tdpo1, tdpo2"),
    (["loss=kto", "loss.desirable_weight=0"], "loss.desirable_weight=0 must be > 0"),
    (["loss=kto", "loss.undesirable_weight=-1"], "loss.undesirable_weight=-1 must be > 0"),
    (["loss=tidpo", "loss.base=ipo"], "loss.base='ipo' is not one of dpo, tdpo2"),
    (["loss=tidpo", "loss.triplet.gamma=-0.1"], "loss.triplet.gamma=-0.1 must be >= 0"),
    (["loss=tidpo", "loss.triplet.temperature=0"], "loss.triplet.temperature=0 must be > 0 (anchors are sampled)"),
    (["loss=tidpo", "loss.triplet.top_p=1.5"], "loss.triplet.top_p=1.5 must be in (0, 1]"),
    (["loss=tidpo", "loss.triplet.anchor_every=0"], "loss.triplet.anchor_every=0 must be >= 1"),
    (["loss=tidpo", "estimator.lam=1.5"], "estimator.lam=1.5 must be in [0, 1] (1: no prior, 0: prior only)"),
    (["loss=tidpo", "estimator.normalize=token"], "estimator.normalize='token' is not one of response, sequence"),
    # estimators and their transforms
    (["loss=tisdpo", "estimator=dpo_pair", "estimator.beta=0"], "estimator.beta=0 must be > 0"),
    (["loss=tisdpo", "estimator=dpo_pair", "estimator.max_steps=0"], "estimator.max_steps=0 must be null or >= 1"),
    # estimator.optim follows the run's optim by interpolation (the DPO baseline's recipe): a deviation replaces the node
    (["loss=tisdpo", "estimator=dpo_pair", "estimator.optim={lr: 0, warmup_steps: 0, schedule: constant, "
      "optimizer: {_target_: torch.optim.AdamW, _partial_: true, lr: 0}}"], "estimator.optim.lr=0 must be > 0"),
    (["loss=tisdpo", "estimator=prompt", "estimator.transform.name=softmax"],
     "estimator.transform.name='softmax' is not one of exp_clamp, rank_linear, clamp_linear"),
    (["loss=tisdpo", "estimator=prompt", "estimator.transform.name=exp_clamp", "estimator.transform.exp_clamp.lower=1"],
     "estimator.transform.exp_clamp.lower=1 must be <= estimator.transform.exp_clamp.upper=0.5"),
    (["loss=tisdpo", "estimator=prompt", "estimator.transform.name=exp_clamp", "estimator.transform.exp_clamp.k=0"], "estimator.transform.exp_clamp.k=0 must be > 0"),
    (["loss=tisdpo", "estimator=sft_pair", "estimator.transform.name=rank_linear", "estimator.transform.rank_linear.low=2"],
     "estimator.transform.rank_linear.low=2 must be <= estimator.transform.rank_linear.high=1.3"),
    (["loss=tisdpo", "estimator=prompt", "estimator.transform.name=clamp_linear", "estimator.transform.clamp_linear.bound=0"],
     "estimator.transform.clamp_linear.bound=0 must be > 0"),
    (["loss=tisdpo", "estimator=random", "estimator.low=-1"], "estimator.low=-1 must be >= 0 (token weights are non-negative)"),
    # optimisers: every node with a learning rate
    (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
    (["optim.lr=inf"], "optim.lr=inf must be a finite number"),
    (["optim.lr=0"], "optim.lr=0 must be > 0"),
    (["optim.schedule=wavy"], "optim.schedule='wavy' is not one of constant, linear, cosine"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0"),
    (["sft.optim.lr=-1"], "sft.optim.lr=-1 must be > 0"),
    # run-level values
    (["seed=-1"], "seed=-1 must be in [0, 4294967295]"),
    (["seed=1.5"], "seed=1.5 must be a whole number"),
    (["torch_threads=-1"], "torch_threads=-1 must be null or >= 1 (null: torch's default, every core)"),
    (["torch_threads=0"], "torch_threads=0 must be null or >= 1"),
    (["sft.max_steps=0"], "sft.max_steps=0 must be >= 1 (or model.is_sft=true to skip the SFT stage)"),
    (["dataset.limit=-1"], "dataset.limit=-1 must be null or >= 1 (null: every row)"),
    (["dataset.limit=0"], "dataset.limit=0 must be null or >= 1"),
    (["+dataset.test_limit=0"], "dataset.test_limit=0 must be null or >= 1"),
    (["dataset.task.n_train_pairs=0"], "dataset.task.n_train_pairs=0 must be >= 1"),
    (["train.max_steps=0"], "train.max_steps=0 must be null or >= 1"),
    (["train.max_steps=true"], "train.max_steps=True must be a whole number"),
    (["train.grad_accum=0"], "train.grad_accum=0 must be >= 1"),
    (["train.val_every_n_steps=-1"], "train.val_every_n_steps=-1 must be >= 0 (0: no validation during training)"),
    (["checkpoint.every_n_steps=-5"], "checkpoint.every_n_steps=-5 must be >= 0 (0: off)"),
    (["checkpoint.keep_all=maybe"], "checkpoint.keep_all='maybe' must be true or false"),
    # evaluation, when it runs
    (["eval.n_prompts=0"], "eval.n_prompts=0 must be >= 1 (with eval enabled; eval=none turns evaluation off)"),
    (["eval.temperatures=[1.0,-0.5]"], "eval.temperatures[1]=-0.5 must be >= 0 (0: greedy decoding)"),
    (["eval.temperatures=[]"], "eval.temperatures=[] must be a non-empty list"),
    (["eval=judges", "eval.top_p=0"], "eval.top_p=0 must be null or in (0, 1]"),
    # Lightning keys that reached the trainer node anyway
    (["+trainer.max_steps=5"], "trainer.max_steps is controlled by the pipeline: use train.max_steps=5 instead"),
    (["+trainer.accumulate_grad_batches=4"], "use train.grad_accum=4 instead"),
    (["+trainer.val_check_interval=10"], "use train.val_every_n_steps instead"),
]


@pytest.mark.parametrize("overrides,message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_line(tmp_path, overrides, message):
    cfg = compose_config(overrides, tmp_path)
    with pytest.raises(ConfigError) as error:
        validate_config(cfg)
    text = str(error.value)
    assert message in text and "\n" not in text, text
    assert isinstance(error.value, UserError)


@pytest.mark.parametrize("overrides", [
    ["sft.max_steps=0", "model.is_sft=true"],       # the SFT stage does not run
    ["eval.enabled=false", "eval.n_prompts=0"],     # evaluation does not run
    ["eval.temperatures=[0.0]"],                     # greedy
    ["torch_threads=null", "dataset.limit=null", "seed=0", "loss.label_smoothing=0.49"],
    ["loss=tidpo", "loss.triplet.gamma=0", "estimator.lam=0"],
    ["checkpoint.keep_all=true", "checkpoint.every_n_steps=0"],
    ["+trainer.max_time=00:01:00:00"],               # a Lightning key the pipeline leaves alone
])
def test_edge_values_that_make_sense_pass(tmp_path, overrides):
    validate_config(compose_config(overrides, tmp_path))


def test_names_in_validate_match_the_registries():
    """validate.py writes the dataset names out (it must not import torch); they must not drift.
    Losses and estimators are listed only by their conf files: each one has a record."""
    from tisdpo.data import ADAPTERS
    from tisdpo.registry import estimator_record, group_names
    from tisdpo.runtime.validate import DATASET_NAMES, _takes_weights

    assert set(DATASET_NAMES) == set(ADAPTERS)
    assert {"dpo", "ipo", "kto", "tdpo", "tisdpo", "tidpo", "simpo", "tpo", "grpo"} <= set(group_names("loss"))
    assert {name for name in group_names("loss") if _takes_weights(name)} >= {"tisdpo", "tidpo"}
    for name in group_names("estimator"):
        assert estimator_record(name).kind in (None, "offline", "online"), name


def test_validation_imports_no_torch():
    """run.py checks the command line with it before Hydra composes: `--help` must stay instant."""
    code = "import sys, tisdpo.runtime.validate; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_checkpoint_key_the_code_reads_is_declared():
    declared = set(OmegaConf.load(CONF / "config.yaml").checkpoint)
    assert "keep_all" in declared and OmegaConf.load(CONF / "config.yaml").checkpoint.keep_all is False
    pattern = re.compile(r"""cfg\.checkpoint(?:\.get\(\s*["'](\w+)|\.(\w+))|node\.get\(\s*["'](\w+)""")
    read = set()
    for path in (ROOT / "tisdpo").rglob("*.py"):
        text = path.read_text()
        for match in pattern.finditer(text):
            key = next(g for g in match.groups() if g)
            if match.group(3) is None or 'cfg.get("checkpoint")' in text:
                read.add(key)
    read.discard("get")
    assert {"every_n_steps", "keep_all"} <= read | declared
    assert read <= declared | {"is_file"}, read - declared


# ---------------------------------------------------------------------------------------
# Lightning Trainer keys on the command line
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,message", [
    ("trainer.max_steps=5", "trainer.max_steps is controlled by the pipeline: use train.max_steps=5 instead "
                            "(sft.max_steps and estimator.max_steps set the other stages)"),
    ("+trainer.max_steps=5", "use train.max_steps=5 instead"),
    ("++trainer.max_epochs=3", "use train.max_steps instead (every stage trains for a number of steps, not epochs)"),
    ("trainer.accumulate_grad_batches=8", "use train.grad_accum=8 instead"),
    ("trainer.check_val_every_n_epoch=1", "use train.val_every_n_steps instead"),
    ("trainer.limit_val_batches=0", "use train.val_every_n_steps instead (0 turns validation off)"),
    ("trainer.enable_checkpointing=false", "use checkpoint.every_n_steps instead"),
    ("trainer.logger=false", "use logger instead (logger=csv, logger=wandb or logger=none)"),
    ("trainer.inference_mode=true", "trainer.inference_mode is controlled by the pipeline and cannot be configured"),
])
def test_pipeline_trainer_keys_on_the_command_line(arg, message):
    assert message in override_problem(["loss=dpo", arg])


def test_other_arguments_pass_the_command_line_check():
    assert override_problem(["trainer.devices=2", "train.max_steps=5", "~trainer.gradient_clip_val", "--cfg", "job",
                             "hydra.run.dir=x", "-m", "trainer.precision=bf16-mixed"]) is None


ENV = {**os.environ, "WANDB_MODE": "disabled"}


def run_py(tmp_path, *args):
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    return done, [line for line in done.stderr.splitlines() if line.strip()]


def test_cli_trainer_max_steps_is_one_line_naming_train_max_steps(tmp_path):
    done, lines = run_py(tmp_path, "trainer.max_steps=5")
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines == ["config error: trainer.max_steps is controlled by the pipeline: use train.max_steps=5 instead "
                     "(sft.max_steps and estimator.max_steps set the other stages)"], done.stderr[-2000:]


def test_cli_bad_value_is_one_line_and_help_still_works(tmp_path):
    done, lines = run_py(tmp_path, "loss.beta=0", "logger=none")
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines == ["config error: loss.beta=0 must be > 0 (the strength of the KL constraint)"], done.stderr[-2000:]
    done, _ = run_py(tmp_path, "--cfg", "job")
    assert done.returncode == 0 and "keep_all: false" in done.stdout, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# strict JSON for results files
# ---------------------------------------------------------------------------------------
def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_atomic_writes_non_finite_as_null_and_names_the_keys(tmp_path, caplog):
    import numpy as np
    import torch

    from tisdpo.jsonio import read_json, write_json_atomic

    results = {"val/loss": float("nan"), "eval/win_rate": 0.5, "nested": {"kl": float("inf"), "ok": [1, -math.inf]},
               "np": np.float32("nan"), "t": torch.tensor(float("nan")), "path": tmp_path, "n": 3}
    with caplog.at_level(logging.WARNING, logger="tisdpo.jsonio"):
        path = write_json_atomic(tmp_path / "results.json", results)
    parsed = _strict(path.read_text())
    assert parsed == {"val/loss": None, "eval/win_rate": 0.5, "nested": {"kl": None, "ok": [1, None]}, "np": None,
                      "t": None, "path": str(tmp_path), "n": 3}
    assert read_json(path) == parsed
    [record] = caplog.records
    assert record.getMessage() == (f"{path}: 5 non-finite values written as null: val/loss, nested/kl, nested/ok[1], "
                                   "np, t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


def test_write_json_atomic_is_quiet_for_finite_values(tmp_path, caplog):
    from tisdpo.jsonio import write_json_atomic

    with caplog.at_level(logging.WARNING, logger="tisdpo.jsonio"):
        write_json_atomic(tmp_path / "r.json", {"a": [1.5, 2], "b": None})
    assert not caplog.records and _strict((tmp_path / "r.json").read_text()) == {"a": [1.5, 2], "b": None}
