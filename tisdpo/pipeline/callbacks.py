"""Lightning callbacks of the pipeline: the global RNG streams, saved and restored for exact resume.

A Lightning checkpoint holds the weights, the optimiser, the LR schedule and the loop counters;
for a resumed run to end with the same parameters as an uninterrupted one it also needs the
global RNG streams (python, numpy, torch, CUDA): :class:`RNGStateCallback` saves them with the
checkpoint and restores them when training restarts; validation runs on a forked stream, so where
validation falls does not change training randomness (TI-DPO samples during validation).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def rng_states() -> dict[str, Any]:
    # Plain python values and tensors only: Lightning loads checkpoints with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                                                     float(gauss)), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(Callback):
    """Global RNG states in the checkpoint, restored at the start of resumed training; validation
    runs on a forked stream so that it never shifts the training stream."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCallback"

    def state_dict(self) -> dict[str, Any]:
        # Saved mid-validation (a checkpoint callback on validation end) the stream to resume is
        # the one validation forked from.
        return {"rng": self._outside_validation or rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self._outside_validation = rng_states()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._outside_validation is not None:
            set_rng_states(self._outside_validation)
            self._outside_validation = None
