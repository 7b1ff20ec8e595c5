"""Critical tokens (Lin et al., ICML 2025, "Critical Tokens Matter", arXiv 2411.19943): token weights
from contrastive estimation between a positive and a negative model.

π+ = SFT on the chosen responses, π− = SFT on the rejected ones (both from the base model, as
TIS-DPO(S)); per response token the contrastive probability

    p_t = softmax_v((1 + c) · log π+(v | x, y<t) − c · log π−(v | x, y<t))[y_t]      (c = ``contrast``)

(the release: ``cd_logits = (1 + 1) * pos_logits - 1 * neg_logits``; log-softmax is per-model
shift-invariant, so logits or log-probs give the same p). The released weights are
w^l_t = 1 − p_t on the rejected side (a token the contrast rules out, a critical token, weighs
~1) and w^w_t = 1 on the chosen side (``only_neg: True``; ``weight_chosen=true``: w^w_t = p_t),
EOS weight 1 on both sides. This module scores s_t = 2 p_t − 1 ∈ [−1, 1] (chosen: s = 1 when
the chosen side is not weighted; EOS: +1 chosen, −1 rejected, the release's appended 1 / 0) and
the yaml's transform (clamp_linear, bound 1, [0, 1]) maps it to exactly those weights:
chosen (s + 1)/2 = p, rejected (1 − s)/2 = 1 − p. Both models are in memory at once (the
normaliser of p needs both distributions at every position).
Not cDPO of ``loss=dpo loss.label_smoothing`` (conservative DPO): the paper calls its method cDPO
too; here it is ``method=critical_tokens``.
"""
from __future__ import annotations

import torch

from tisdpo import checks
from tisdpo.constants import SIDES
from tisdpo.data.collate import PreferenceCollator, concat_pair
from tisdpo.kernels.logprobs import token_logps
from tisdpo.weights.contrast import response_token_ids
from tisdpo.weights.estimators.common import check_pair_training, check_scoring
from tisdpo.weights.estimators.record import OFFLINE, EstimatorInputs, EstimatorRecord


@torch.no_grad()
def contrastive_logps(positive, negative, examples: list[dict], pad_token_id: int, *, contrast: float,
                      batch_size: int) -> dict[str, list[torch.Tensor]]:
    """{side: [log p_t per response token]} of the contrastive distribution (module docstring)."""
    collate = PreferenceCollator(pad_token_id)
    device = next(positive.parameters()).device
    out: dict[str, list[torch.Tensor]] = {side: [] for side in SIDES}
    for model in (positive, negative):
        model.eval()
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start: start + batch_size]).items()}
        ids, attention, labels = (concat_pair(batch, key) for key in ("input_ids", "attention_mask", "labels"))
        pos = positive(input_ids=ids, attention_mask=attention, use_cache=False).logits.float().log_softmax(-1)
        neg = negative(input_ids=ids, attention_mask=attention, use_cache=False).logits.float().log_softmax(-1)
        logps, mask = token_logps((1 + contrast) * pos - contrast * neg, labels)
        half = batch["chosen_input_ids"].shape[0]
        for i in range(ids.shape[0]):
            out[SIDES[0] if i < half else SIDES[1]].append(logps[i][mask[i]].cpu())
    return out


def critical_token_scores(inputs: EstimatorInputs):
    node = inputs.node
    positive = inputs.load_model(inputs.models_dir / "positive")
    negative = inputs.load_model(inputs.models_dir / "negative")
    logps = contrastive_logps(positive, negative, inputs.examples, inputs.tokenizer.pad_token_id,
                              contrast=float(node.contrast), batch_size=int(node.score_batch_size))
    eos = inputs.tokenizer.eos_token_id
    scores = {}
    for side, eos_score in zip(SIDES, (1.0, -1.0)):
        side_scores = []
        for lp, ids, n in zip(logps[side], response_token_ids(inputs.examples, side), inputs.lengths[side]):
            s = 2 * lp.exp() - 1 if (side == SIDES[1] or bool(node.weight_chosen)) else torch.ones(len(lp))
            s = s[:n].clone()
            if ids and eos is not None and ids[-1] == eos and len(s) == len(ids):
                s[-1] = eos_score
            side_scores.append(s)
        scores[side] = side_scores
    return scores


def check_options(cfg) -> None:
    check_scoring(cfg)
    check_pair_training(cfg, max_steps_nullable=False)
    checks.one_of(cfg, "estimator.init", ("base", "sft"))
    checks.in_range(cfg, "estimator.contrast", low=0, note="the weight of the negative model in the contrast")
    checks.flag(cfg, "estimator.weight_chosen")


ESTIMATOR = EstimatorRecord(kind=OFFLINE, scores=critical_token_scores, pair_models="sft", check=check_options)
