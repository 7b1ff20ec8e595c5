"""The datasets the task emits: SFT examples, preference pairs and contrastive (RLCD-style) pairs.

Each row is seeded by (task seed, split, row index, stream), so row i is the same whatever n is
asked for, and the SFT rows, the pairs and the contrastive pairs draw from separate streams.
"""

from __future__ import annotations

import math

import numpy as np

from .config import SyntheticTaskConfig
from .process import GeneratingProcess
from .prompts import Prompts, split_code
from .rewards import TrueRewards
from .vocabulary import Vocabulary

__all__ = ["GeneratedData"]


class GeneratedData:
    """Rows built from the task's prompts, its generating process and its true rewards."""

    def __init__(self, config: SyntheticTaskConfig, vocabulary: Vocabulary, rewards: TrueRewards,
                 process: GeneratingProcess, prompts: Prompts) -> None:
        self.config = config
        self.vocabulary = vocabulary
        self.rewards = rewards
        self.process = process
        self.prompts = prompts

    def sft_examples(self, n: int | None = None, split: str = "sft") -> list[dict]:
        """``n`` (default ``n_sft``) rows {"prompt", "response"} from the SFT distribution;
        a share ``sft_system_share`` carry a system prefix (half <harmless>, half <harmful>)
        and their responses are drawn from the correspondingly shifted distribution."""
        c = self.config
        n = c.n_sft if n is None else int(n)
        rows = []
        for i in range(n):
            rng = np.random.default_rng([c.seed, split_code(split), i, 1])
            u = rng.random()
            if u < c.sft_system_share / 2:
                system = "harmless"
            elif u < c.sft_system_share:
                system = "harmful"
            else:
                system = None
            prompt = self.prompts.text(i, system=system, split=split)
            k = self.prompts.topic_of(prompt)
            words = self.process.sample_words(k, system, rng)
            rows.append({"prompt": prompt, "response": " ".join(words)})
        return rows

    def preference_pairs(self, split: str = "train", n: int | None = None) -> list[dict]:
        """Canonical preference rows for ``split`` ("train" | "test" | any name):
        {"prompt", "chosen", "rejected", "meta": {"topic", "chosen_token_rewards",
        "rejected_token_rewards", "chosen_reward", "rejected_reward", "label_correct"}}.
        Both responses come from the unprefixed SFT distribution; the label is Bradley–Terry on
        the true sequence reward (temperature ``bt_temperature``) with flip noise ``label_noise``.
        """
        c = self.config
        words = self.vocabulary.response_words
        n = self.pair_count(split, n)
        rows = []
        for i in range(int(n)):
            prompt = self.prompts.text(i, split=split)
            k = self.prompts.topic_of(prompt)
            rng = np.random.default_rng([c.seed, split_code(split), i, 2])
            a = self.process.sample_indices(k, None, rng)
            b = self.process.sample_indices(k, None, rng)
            ra = self.rewards.path_rewards(k, a)
            rb = self.rewards.path_rewards(k, b)
            Ra, Rb = float(ra.sum()), float(rb.sum())
            z = (Ra - Rb) / max(c.bt_temperature, 1e-12)
            p_a = 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))
            a_wins = rng.random() < p_a
            if rng.random() < c.label_noise:
                a_wins = not a_wins
            (cw, cr), (lw, lr) = ((a, ra), (b, rb)) if a_wins else ((b, rb), (a, ra))
            chosen_rewards = [float(x) for x in cr]
            rejected_rewards = [float(x) for x in lr]
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": " ".join(words[j] for j in cw),
                    "rejected": " ".join(words[j] for j in lw),
                    "meta": {
                        "topic": k,
                        "chosen_token_rewards": chosen_rewards,
                        "rejected_token_rewards": rejected_rewards,
                        "chosen_reward": float(sum(chosen_rewards)),
                        "rejected_reward": float(sum(rejected_rewards)),
                        "label_correct": bool(sum(chosen_rewards) >= sum(rejected_rewards)),
                    },
                }
            )
        return rows

    def pair_count(self, split: str, n: int | None) -> int:
        """``n``, or the configured number of pairs of ``split`` (test / any other name: train)."""
        if n is None:
            return self.config.n_test_pairs if split == "test" else self.config.n_train_pairs
        return int(n)

    def contrastive_pairs(self, split: str = "train", n: int | None = None) -> list[dict]:
        """RLCD-style "LLM-generated" pairs: chosen sampled under the <harmless> prefix, rejected under
        <harmful> (both shown without the prefix), true token rewards in meta (``dataset.pairs=contrastive``).
        With ``contrastive_shift`` the prefixes tilt by ±contrastive_shift (overlapping samples)."""
        c = self.config
        n = self.pair_count(split, n)
        rows = []
        for i in range(int(n)):
            prompt = self.prompts.text(i, split=split)
            topic = self.prompts.topic_of(prompt)
            rng = np.random.default_rng([c.seed, 7, i])
            if c.contrastive_shift is None:
                chosen, rejected = (self.process.sample_words(topic, "harmless", rng),
                                    self.process.sample_words(topic, "harmful", rng))
            else:  # weaker prefixes: the two samples overlap, a pair is not always separable
                chosen, rejected = (self.process.sample_words(topic, system, rng, c.contrastive_shift)
                                    for system in ("harmless", "harmful"))
            chosen_r = self.rewards.token_rewards(topic, chosen)
            rejected_r = self.rewards.token_rewards(topic, rejected)
            rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected),
                         "meta": {"topic": topic, "chosen_token_rewards": chosen_r, "rejected_token_rewards": rejected_r,
                                  "chosen_reward": sum(chosen_r), "rejected_reward": sum(rejected_r)}})
        return rows
