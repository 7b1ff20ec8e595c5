"""OTPO: online token weights from an unbalanced optimal-transport plan between the chosen and the
rejected response's last-layer hidden states under the current policy (``weights/optimal_transport.py``).

Cost beyond the step's own forward: one no-grad forward of the policy on the 2B sequences for
the hidden states (the StepContext carries log-probs, not hidden states; the release reuses its
training forward's ``output_hidden_states``), then a batched Sinkhorn over B plans of
|y_w| × |y_l| entries (≤ ``max_iter`` iterations, each two [B, n, m] log-sum-exps).
"""
from __future__ import annotations

import torch

from tisdpo import checks
from tisdpo.constants import IGNORE_INDEX
from tisdpo.data.collate import concat_pair
from tisdpo.kernels.scoring import chunked_head, last_hidden
from tisdpo.losses.record import StepContext
from tisdpo.weights.estimators.record import ONLINE, EstimatorInputs, EstimatorRecord
from tisdpo.weights.optimal_transport import ot_token_weights


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N, T, H] last-layer hidden states (the model's ``hidden_states[-1]``); for a large-vocabulary
    head-only architecture the base model alone, so no [N, T, V] logits are built."""
    if chunked_head(model, input_ids) is not None:
        return last_hidden(model, input_ids, attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


class TransportWeights:
    """The per-step hook: (StepContext) -> (chosen_w, rejected_w), [B, T] aligned with the input ids
    (position t weighs token t; prompt and padding 0)."""

    def __init__(self, reg: float, reg_m: float, max_iter: int = 1000, tol: float = 1e-6):
        self.reg, self.reg_m, self.max_iter, self.tol = reg, reg_m, max_iter, tol

    @torch.no_grad()
    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        batch = ctx.batch
        ids, attention, labels = (concat_pair(batch, key) for key in ("input_ids", "attention_mask", "labels"))
        hidden = final_hidden_states(ctx.policy, ids, attention)[:, :-1].float()  # position t-1 predicts token t
        response = labels[:, 1:] != IGNORE_INDEX
        half = batch["chosen_input_ids"].shape[0]
        chosen, rejected = ot_token_weights(hidden[:half], hidden[half:], response[:half], response[half:],
                                            reg=self.reg, reg_m=self.reg_m, max_iter=self.max_iter, tol=self.tol)
        weights = hidden.new_zeros(ids.shape)
        weights[:half, 1:], weights[half:, 1:] = chosen, rejected
        return weights[:half], weights[half:]


def transport_hook(inputs: EstimatorInputs) -> TransportWeights:
    node = inputs.node
    return TransportWeights(reg=float(node.reg), reg_m=float(node.reg_m), max_iter=int(node.max_iter), tol=float(node.tol))


def check_options(cfg) -> None:
    checks.in_range(cfg, "estimator.reg", low=0, low_open=True, note="the entropic regularisation of the plan")
    checks.in_range(cfg, "estimator.reg_m", low=0, low_open=True, note="the marginal relaxation (KL weight)")
    checks.in_range(cfg, "estimator.max_iter", low=1, integer=True)
    checks.in_range(cfg, "estimator.tol", low=0, low_open=True)
    checks.in_range(cfg, "estimator.quality_every_n_steps", low=0, integer=True)


ESTIMATOR = EstimatorRecord(kind=ONLINE, online=transport_hook, check=check_options)
