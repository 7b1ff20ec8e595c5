"""Contrastive per-token scores, the arithmetic behind TIS-DPO's estimators (``estimators/``).

    prompt   (TIS-DPO(P)): r_t = log pi(y_t | p+, x, y<t) - log pi(y_t | p-, x, y<t), one model
    sft_pair (TIS-DPO(S)): r_t = log pi+(y_t | x, y<t) - log pi-(y_t | x, y<t),
                           pi+ = SFT on chosen, pi- = SFT on rejected (from the base model)
    dpo_pair (TIS-DPO(D)): same r_t, pi+ = DPO on the data, pi- = DPO on the swapped data (from SFT)
    random / uniform     : no models; w ~ U(low, high) or w = 1
    oracle               : the built-in task's TRUE token rewards as the scores (upper bound of
                           what token weighting can do there; the same transform as the others)

Scores are ragged: one 1-D tensor per response with one value per response token (EOS included),
in the order of the tokenised training examples. Training pi+/pi- is a stage
(``tisdpo.stages.estimator_models``); this module holds the scoring arithmetic.
"""
from __future__ import annotations

import torch

from tisdpo.constants import IGNORE_INDEX, SIDES


def response_lengths(examples: list[dict], side: str) -> list[int]:
    """Number of response tokens (EOS included) of each example's ``side``."""
    return [sum(1 for label in e[f"{side}_labels"] if label != IGNORE_INDEX) for e in examples]


def score_difference(positive: list[torch.Tensor], negative: list[torch.Tensor], lengths: list[int]) -> list[torch.Tensor]:
    """r = positive - negative, cut or zero-padded to each training response's length.

    Lengths differ only for the prompt estimator, where a longer system prompt can truncate
    the response further; the missing tail then carries no evidence (r = 0)."""
    scores = []
    for pos, neg, n in zip(positive, negative, lengths):
        m = min(len(pos), len(neg), n)
        r = torch.zeros(n)
        r[:m] = pos[:m] - neg[:m]
        scores.append(r)
    return scores


def contrastive_rows(rows: list[dict], *, task=None, template: str | None = None, positive_prompt: str | None = None,
                     negative_prompt: str | None = None) -> tuple[list[dict], list[dict]]:
    """The rows with the positive and with the negative system prompt (the prompt estimator's inputs):
    the built-in task's own prefixes, else ``template.format(system=..., prompt=...)``."""
    if task is not None:
        pairs = [task.contrastive_prompts(r["prompt"]) for r in rows]
    else:
        pairs = [(template.format(system=positive_prompt, prompt=r["prompt"]),
                  template.format(system=negative_prompt, prompt=r["prompt"])) for r in rows]
    positive = [{**r, "prompt": p} for r, (p, _) in zip(rows, pairs)]
    negative = [{**r, "prompt": n} for r, (_, n) in zip(rows, pairs)]
    return positive, negative


def contrast_scores(positive: tuple[list[torch.Tensor], list[torch.Tensor]],
                    negative: tuple[list[torch.Tensor], list[torch.Tensor]],
                    lengths: dict[str, list[int]]) -> dict[str, list[torch.Tensor]]:
    """{"chosen": [...], "rejected": [...]}: r_t = log p+(y_t) - log p-(y_t) for every response token,
    from the (chosen, rejected) per-token log-probs of ``response_logps`` under the positive and the
    negative side (two models for the pair estimators, two system prompts for the prompt estimator)."""
    return {side: score_difference(positive[i], negative[i], lengths[side]) for i, side in enumerate(SIDES)}


def response_token_ids(examples: list[dict], side: str) -> list[list[int]]:
    """The response token ids (EOS included) of each example's ``side``."""
    return [[t for t, label in zip(e[f"{side}_input_ids"], e[f"{side}_labels"]) if label != IGNORE_INDEX]
            for e in examples]


def weighted_token_masks(examples: list[dict], side: str, eos_token_id: int | None, *,
                         weight_eos: bool = False) -> list[torch.Tensor]:
    """Per response, which tokens carry an estimated weight (bool, one per response token).

    As the authors' released code (``tokenize_batch_element``: ``[0]*len(prompt) + w[:n-1] + [0]``),
    the final EOS gets weight 0 and no rank: it is out of the weighted margin and out of η
    (the losses multiply every term by the weight). ``weight_eos=True`` (the ablation) weights
    EOS like any other token. A response cut by truncation has no final EOS; all its tokens count.
    """
    masks = []
    for ids in response_token_ids(examples, side):
        m = torch.ones(len(ids), dtype=torch.bool)
        if not weight_eos and ids and eos_token_id is not None and ids[-1] == eos_token_id:
            m[-1] = False
        masks.append(m)
    return masks


def oracle_scores(true_rewards: list[list[float]], lengths: list[int]) -> list[torch.Tensor]:
    """Scores = the true token rewards, one per response token (r_t = reward of word t), 0 where
    there is none (EOS, or a word beyond a truncated response): ``estimator=oracle``."""
    scores = []
    for truth, n in zip(true_rewards, lengths):
        r = torch.zeros(n)
        m = min(n, len(truth))
        r[:m] = torch.tensor(truth[:m], dtype=torch.float32)
        scores.append(r)
    return scores
