"""The task's prompts: ``"<tK> q.. q.."`` (optionally after a system token), each seeded by its split and index.

Prompt ``i`` of a split is the same whatever else is generated, so the SFT rows, the preference
pairs and the evaluation prompts of one split share their prompts, and another split never does.
"""

from __future__ import annotations

import zlib

import numpy as np

from .config import SyntheticTaskConfig
from .vocabulary import SYSTEM_TOKENS, Vocabulary

__all__ = ["Prompts", "split_code", "system_of", "with_system"]

_SPLIT_CODES = {"train": 1, "test": 2, "sft": 3, "eval": 4, "validation": 5}


def split_code(split: str) -> int:
    """The number a split's random streams are seeded with."""
    if split in _SPLIT_CODES:
        return _SPLIT_CODES[split]
    # any other split name gets its own stable stream
    return 100 + zlib.crc32(split.encode()) % 100_000


def with_system(prompt: str, system: str | None) -> str:
    """Replace/remove the system token of ``prompt`` (system None | "harmless" | "harmful")."""
    words = prompt.split()
    if words and words[0] in SYSTEM_TOKENS.values():
        words = words[1:]
    if system is not None:
        if system not in SYSTEM_TOKENS:
            raise ValueError(f"system must be None, 'harmless' or 'harmful', got {system!r}")
        words = [SYSTEM_TOKENS[system]] + words
    return " ".join(words)


def system_of(prompt: str) -> str | None:
    """The system a prompt starts with ("harmless" | "harmful"), or None."""
    inv = {v: k for k, v in SYSTEM_TOKENS.items()}
    words = prompt.split()
    return inv.get(words[0]) if words else None


class Prompts:
    """Prompt ``i`` of ``split``, its topic, and the topic of any prompt text."""

    def __init__(self, config: SyntheticTaskConfig, vocabulary: Vocabulary) -> None:
        self.config = config
        self.vocabulary = vocabulary

    def _rng(self, split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, split_code(split), int(i), 0])

    def topic(self, i: int, split: str = "train") -> int:
        return int(self._rng(split, i).integers(self.config.n_topics))

    def text(self, i: int, system: str | None = None, split: str = "train") -> str:
        """Prompt ``i`` of ``split``: "<tK> q.. q..", optionally preceded by a system token."""
        rng = self._rng(split, i)
        k = int(rng.integers(self.config.n_topics))
        words = self.vocabulary
        pool = words.prompt_words_topic[k] + words.prompt_words_shared
        picked = [pool[j] for j in rng.integers(len(pool), size=self.config.prompt_length)]
        return with_system(" ".join([words.topics[k]] + picked), system)

    def topic_of(self, prompt: str) -> int:
        """Topic index of a prompt string (the first topic token in it)."""
        for w in prompt.split():
            if w in self.vocabulary.topic_index:
                return self.vocabulary.topic_index[w]
        raise ValueError(f"no topic token in prompt {prompt!r}")
