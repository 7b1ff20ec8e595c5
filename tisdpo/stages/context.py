"""One run as its stages see it: the config, where it writes, the artifact cache, the data, and the
model training starts from once the SFT stage has made it.

Each stage is ``stage(ctx, ...) -> artifact``. The runner owns the context: it sets ``data`` after
the data stage and ``sft_dir`` after the SFT stage, and merges what stages return into
``results.json``; no stage writes into another's results or rebuilds another stage's identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tisdpo.runtime.cache import ArtifactCache
from tisdpo.stages.data import PreparedData
from tisdpo.stages.start_models import initial_model, initial_model_identity, stage_device


@dataclass
class RunContext:
    cfg: DictConfig
    output_dir: Path
    cache: ArtifactCache
    data: PreparedData
    sft_dir: Path | None = None  # the SFT artifact; None while the SFT stage has not run, or with model.is_sft

    @property
    def tokenizer(self):
        return self.data.tokenizer

    @property
    def device(self) -> torch.device:
        """Where the non-Lightning stages (scoring, reference log-probs, generation) run."""
        return stage_device(self.cfg)

    def start_model(self):
        """A fresh copy of the model training starts from: the SFT checkpoint, or the given model."""
        return initial_model(self.cfg, self.sft_dir, self.tokenizer)

    def start_identity(self) -> dict[str, Any]:
        """What determines :meth:`start_model`'s weights, for the cache keys of the stages after SFT."""
        return initial_model_identity(self.cfg, self.sft_dir)
