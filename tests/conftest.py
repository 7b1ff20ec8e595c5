"""Shared fixtures: composing the real configs with tiny, fast overrides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import tisdpo.resolvers  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT / ".." / "shared" / "data"

os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny models are fastest single-threaded; two threads on a loaded 2-core machine cost 10-80x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# The smallest Llama the unit tests build directly (vocabulary taken from the tokenizer).
TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=128)

# A model and task small enough that a whole pipeline run takes seconds on 2 CPU cores.
TINY = [
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2",
    "dataset.task.n_sft=256",
    "dataset.task.n_train_pairs=96",
    "dataset.task.n_test_pairs=32",
    "sft.max_steps=15",
    "sft.batch_size=16",
    "train.max_steps=6",
    "train.batch_size=8",
    "train.eval_batch_size=32",
    "train.val_every_n_steps=3",
    "checkpoint.every_n_steps=3",
    "eval.n_prompts=16",
    "eval.max_new_tokens=12",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def compose_config(overrides: list[str], tmp_path: Path | None = None, tiny: bool = True):
    """The composed run config, as `python run.py <overrides>` would see it."""
    extra = []
    if tmp_path is not None:
        extra = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}"]
    base = TINY if tiny else []
    # The tiny overrides only apply to the groups they were written for.
    for group, default, prefix in (("dataset", "synthetic", "dataset.task."), ("model", "tiny", "model.config."),
                                   ("eval", "synthetic", "eval.")):
        if any(o.startswith(f"{group}=") and o != f"{group}={default}" for o in overrides):
            base = [o for o in base if not o.startswith(prefix)]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=base + extra + list(overrides))


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*overrides: str):
        return compose_config(list(overrides), tmp_path)

    return make
