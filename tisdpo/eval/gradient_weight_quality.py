"""Built-in task: how well TI-DPO's online gradient weights track |true token reward|, logged at intervals."""
from __future__ import annotations

import logging

import lightning as L
import torch

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.data.collate import PreferenceCollator
from tisdpo.eval.weight_quality import quality_metrics
from tisdpo.models.sharding import is_sharded

log = logging.getLogger(__name__)


class GradientWeightQuality(L.Callback):
    """Every ``every_n_steps`` (and at the end), weight a fixed probe set of training pairs with the
    current policy and log Spearman/AUROC against |true reward| (gradient weights measure
    importance, not sign). ``latest`` holds the last values for results.json."""

    def __init__(self, weights, rows: list[dict], train_examples: list[dict], pad_token_id: int,
                 every_n_steps: int = 50, n_probe: int = 128):
        self.weights, self.every = weights, every_n_steps
        self.probe = train_examples[:n_probe]
        self.rows = rows
        self.collate = PreferenceCollator(pad_token_id)
        self.latest: dict[str, float] = {}
        self._warned = False

    def measure(self, pl_module) -> dict[str, float]:
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in self.collate(self.probe).items()}
        chosen, rejected = self.weights(pl_module.step_context(batch))
        per_side = {}
        for side, w in zip(SIDES, (chosen, rejected)):
            response = batch[f"{side}_labels"] != IGNORE_INDEX
            per_side[side] = [row[m].cpu() for row, m in zip(w.detach(), response)]
        return quality_metrics(self.rows, self.probe, per_side, prefix="weights", target="abs")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if is_sharded(pl_module.policy):
            # The attribution's backward outside the training step would leave FSDP's units mid-backward
            # (no root backward resets them), and the next checkpoint refuses that state. The probe is
            # a diagnostic of the built-in task, whose models never need sharding.
            if not self._warned:
                log.warning("TI-DPO weight quality (weights/spearman_*): not measured under FSDP")
                self._warned = True
            return
        if step % self.every == 0 or step >= (trainer.max_steps or 0):
            self.latest = self.measure(pl_module)
            if trainer.logger:
                trainer.logger.log_metrics(self.latest, step=step)
