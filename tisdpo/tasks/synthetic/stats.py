"""Descriptive statistics of the task: the category mix it samples, and how far the TIS-DPO premise holds.

Read by notebooks and tests to check that a task variant is the task it claims to be (a system
prefix moves the mix; chosen responses hold harmful words, rejected ones good words).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .config import SyntheticTaskConfig
from .process import GeneratingProcess
from .prompts import Prompts
from .rewards import CATEGORIES, TrueRewards

__all__ = ["category_mix", "premise_stats"]


def category_mix(config: SyntheticTaskConfig, rewards: TrueRewards, process: GeneratingProcess,
                 system: str | None = None, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Empirical share of each category among tokens sampled from the (shifted) SFT
    distribution, plus the share of responses with at least one harmful word and the mean
    true reward."""
    rng = np.random.default_rng([config.seed, seed])
    counts = np.zeros(len(CATEGORIES))
    n_unsafe = 0
    total_r = 0.0
    for i in range(n):
        k = int(rng.integers(config.n_topics))
        idx = process.sample_indices(k, system, rng)
        cats = rewards.category[k, idx]
        counts += np.bincount(cats, minlength=len(CATEGORIES))
        n_unsafe += int((cats == 2).any())
        total_r += float(rewards.path_rewards(k, idx).sum())
    shares = counts / counts.sum()
    out = {f"{c}_share": float(s) for c, s in zip(CATEGORIES, shares)}
    out["unsafe_rate"] = n_unsafe / n
    out["mean_reward"] = total_r / n
    return out


def premise_stats(rows: Iterable[dict], prompts: Prompts, rewards: TrueRewards) -> dict[str, float]:
    """How much the TIS-DPO premise holds on preference rows:
    share of chosen responses with a harmful word, of rejected ones with a good word, of
    tokens in chosen that are harmful, and of pairs whose label agrees with the true reward."""
    rows = list(rows)
    n = len(rows)
    if n == 0:
        return {}
    ch_h = rj_g = ch_g = rj_h = agree = 0
    ch_tok_h = ch_tok = 0
    for r in rows:
        k = prompts.topic_of(r["prompt"])
        cw, rw = r["chosen"].split(), r["rejected"].split()
        ch_cats = [rewards.word_category(k, w) for w in cw]
        rj_cats = [rewards.word_category(k, w) for w in rw]
        ch_h += "harmful" in ch_cats
        ch_g += "good" in ch_cats
        rj_g += "good" in rj_cats
        rj_h += "harmful" in rj_cats
        ch_tok_h += ch_cats.count("harmful")
        ch_tok += len(ch_cats)
        agree += rewards.sequence_reward(k, cw) > rewards.sequence_reward(k, rw)
    return {
        "chosen_with_harmful": ch_h / n,
        "rejected_with_good": rj_g / n,
        "chosen_with_good": ch_g / n,
        "rejected_with_harmful": rj_h / n,
        "chosen_harmful_token_share": ch_tok_h / max(ch_tok, 1),
        "label_agreement": agree / n,
    }
