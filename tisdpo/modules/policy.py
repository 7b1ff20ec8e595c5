"""What every training module of a policy against a frozen reference shares: the reference kept out
of the module, the optimiser, the finite-gradient check and the start of the fit. The preference
module (pairs) and the GRPO module (online samples) subclass it."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch

from tisdpo.losses.record import BoundLoss
from tisdpo.modules.optim import ShardedNormClipping, configure_optimizer, last_checkpoint_note


class PolicyModule(ShardedNormClipping, L.LightningModule):
    """A trainable policy, a frozen reference (or None) and a bound loss. ``batch_items`` names what
    ``batch["index"]`` counts in error messages (examples, prompts)."""

    batch_items = "examples"

    def __init__(self, policy, reference, loss: BoundLoss, optim_cfg: Any, *, total_steps: int | None = None,
                 logits_chunk_size: int = 256, check_finite: bool = True):
        super().__init__()
        self.policy = policy
        # Kept out of the module's parameters/state_dict: the reference is frozen, never
        # checkpointed, and must not be seen by the optimiser or by DDP's gradient sync.
        object.__setattr__(self, "reference", reference)
        self.loss = loss
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.chunk = int(logits_chunk_size)
        self.check_finite = check_finite
        self._last_indices = torch.zeros(0, dtype=torch.long)

    def on_before_optimizer_step(self, optimizer):
        if not self.check_finite:
            return
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
            raise FloatingPointError(
                f"non-finite gradient at step {self.global_step} on {self.batch_items} {self._last_indices.tolist()}; "
                + last_checkpoint_note(self._trainer)
            )

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return configure_optimizer(params, self.optim_cfg, self.total_steps)

    def on_fit_start(self):
        # The reference is not a registered submodule, so Lightning does not move it. None: the
        # reference log-probs come cached with every batch, or the loss is reference-free.
        if self.reference is not None:
            self.reference.to(self.device)
        # from_pretrained returns models in eval mode; Lightning keeps submodule modes as found.
        self.policy.train()
