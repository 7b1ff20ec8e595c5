"""The TRUE reward of every response word in every topic, and each word's category.

The ground truth the whole task exists for: the preference labels, the system prefixes' tilt,
the weight-quality metrics and the policy's true reward all read these tables. With
``context_negators`` a word's reward depends on the word before it (``contextual``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import SyntheticTaskConfig
from .vocabulary import Vocabulary, as_words

__all__ = ["CATEGORIES", "TrueRewards"]

CATEGORIES = ("neutral", "good", "harmful", "offtopic")


class TrueRewards:
    """``category[k, j]`` (index into :data:`CATEGORIES`) and ``reward[k, j]`` of response word j in
    topic k; ``contextual[k, prev, j]`` (prev = V: the start of the response) when the task has
    negators, else None.

    Draws from ``rng`` first: the task's generator then draws the bigram tables
    (:class:`~tisdpo.tasks.synthetic.process.GeneratingProcess`); this order defines the task.
    """

    def __init__(self, config: SyntheticTaskConfig, vocabulary: Vocabulary, rng: np.random.Generator) -> None:
        self.config = config
        self.vocabulary = vocabulary
        c, K, V = config, config.n_topics, len(vocabulary.response_words)
        words = vocabulary
        cat = np.zeros((K, V), dtype=np.int64)  # index into CATEGORIES
        reward = np.zeros((K, V), dtype=np.float64)
        idx = words.word_to_index
        for k in range(K):
            cat[k, :] = CATEGORIES.index("offtopic")
            for w in words.neutral_words:
                cat[k, idx[w]] = 0
            for w in words.good_words[k]:
                cat[k, idx[w]] = 1
            for w in words.topic_harm_words[k] + words.shared_harm_words:
                cat[k, idx[w]] = 2
        # neutral/off-topic: small distinct values per (topic, word)
        s = c.neutral_reward_scale
        reward[:] = rng.uniform(-s, s, size=(K, V))
        # shared harmful words: one value per word, same in all topics
        lo, hi = c.harmful_reward_range
        shared_h = rng.uniform(lo, hi, size=len(words.shared_harm_words))
        for j, w in enumerate(words.shared_harm_words):
            reward[:, idx[w]] = shared_h[j]
        for k in range(K):
            for w in words.topic_harm_words[k]:
                reward[k, idx[w]] = rng.uniform(lo, hi)
            glo, ghi = c.good_reward_range
            for w in words.good_words[k]:
                reward[k, idx[w]] = rng.uniform(glo, ghi)
        self.category = cat
        self.reward = reward
        # Context variant: the reward of the word after a negator is negated; R[k, prev, w] is the
        # reward of w after prev (prev = V: start). Neutral words come first in response_words.
        self.negators = np.arange(c.context_negators)
        self.contextual = None
        if c.context_negators:
            ctx = np.repeat(reward[:, None, :], V + 1, axis=1)
            ctx[:, self.negators, :] *= -1.0
            self.contextual = ctx

    def path_rewards(self, topic: int, idx: Sequence[int]) -> np.ndarray:
        """True rewards of a response given as response-word indices, position by position."""
        if self.contextual is None:
            return self.reward[topic, idx]
        idx = np.asarray(idx, dtype=np.int64)
        prev = np.concatenate([[len(self.vocabulary.response_words)], idx[:-1]]).astype(np.int64)
        return self.contextual[topic, prev, idx]

    def token_reward(self, topic: int | str, word: str) -> float:
        """Context-free true reward of ``word`` in ``topic`` (at the start of a response, or after a
        non-negator; ``token_rewards`` gives the per-position ones). Words outside the response vocabulary
        (specials, prompt/topic/system words, unknown words) get ``invalid_token_reward``.
        EOS is not a word of the response and must not be passed."""
        j = self.vocabulary.word_to_index.get(word)
        if j is None:
            return float(self.config.invalid_token_reward)
        return float(self.reward[self.vocabulary.topic_idx(topic), j])

    def word_category(self, topic: int | str, word: str) -> str:
        """"neutral" | "good" | "harmful" | "offtopic" (another topic's word; neutral reward),
        or "invalid" for words outside the response vocabulary."""
        j = self.vocabulary.word_to_index.get(word)
        if j is None:
            return "invalid"
        return CATEGORIES[self.category[self.vocabulary.topic_idx(topic), j]]

    def token_rewards(self, topic: int | str, words: str | Sequence[str]) -> list[float]:
        """True reward of every word of a response, position by position: with negators the
        reward of a word depends on the previous word (a word outside the response vocabulary
        costs ``invalid_token_reward`` and is no negator)."""
        words = as_words(words)
        if self.contextual is None:
            return [self.token_reward(topic, w) for w in words]
        k, V = self.vocabulary.topic_idx(topic), len(self.vocabulary.response_words)
        out, prev = [], V
        for w in words:
            j = self.vocabulary.word_to_index.get(w)
            if j is None:
                out.append(float(self.config.invalid_token_reward))
                prev = V
                continue
            out.append(float(self.contextual[k, prev, j]))
            prev = j
        return out

    def sequence_reward(self, topic: int | str, words: str | Sequence[str]) -> float:
        """Sum of the true token rewards (pass the words without the final EOS)."""
        return float(sum(self.token_rewards(topic, words)))

    def reward_table(self) -> dict[str, dict[str, float]]:
        """{topic token: {response word: reward}} — handy for notebooks."""
        return {
            t: {w: float(self.reward[k, j]) for j, w in enumerate(self.vocabulary.response_words)}
            for k, t in enumerate(self.vocabulary.topics)
        }
