"""Supervised fine-tuning: next-token NLL on response tokens (prompt tokens masked)."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from tisdpo.constants import IGNORE_INDEX
from tisdpo.kernels.logprobs import head_token_logps
from tisdpo.kernels.scoring import chunked_head, last_hidden
from tisdpo.models.sharding import is_sharded
from tisdpo.modules.optim import ShardedNormClipping, configure_optimizer


class SFTModule(ShardedNormClipping, L.LightningModule):
    def __init__(self, model, optim_cfg: Any, total_steps: int | None = None, logits_chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk = logits_chunk_size
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps

    def _nll(self, batch) -> torch.Tensor:
        head = None if is_sharded(self.model) else chunked_head(self.model, batch["input_ids"])
        if head is not None:  # a real vocabulary: the head in chunks, the [N, T, V] logits never exist
            hidden = last_hidden(self.model, batch["input_ids"], batch["attention_mask"])
            logps, mask = head_token_logps(hidden, head, batch["labels"], chunk_size=self.chunk)
            return -(logps.sum() / mask.sum().clamp(min=1))
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        # Position t predicts token t+1; prompt and padding carry IGNORE_INDEX.
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )

    def training_step(self, batch, batch_idx):
        loss = self._nll(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"SFT step {self.global_step}: non-finite loss on examples {batch.get('index')}")
        self.log("sft/train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("sft/val_loss", self._nll(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def on_fit_start(self):
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps it as found

    def configure_optimizers(self):
        return configure_optimizer(self.model.parameters(), self.optim_cfg, self.total_steps)
