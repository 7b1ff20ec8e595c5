"""The data-generating policy: p0(w | topic, prev), its tilts under the system prefixes, and sampling.

p0 mixes the word categories (``p_neutral`` ...) and, within a category, boosts ``n_successors``
preferred successors of each previous word by ``bigram_strength`` in log space: sequential
structure for a transformer to learn. A system prefix tilts p0 token by token by the true reward,
``p_± ∝ p0 · exp(±shift · r)``, which is what the ``prompt`` estimator can read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .config import SyntheticTaskConfig
from .rewards import CATEGORIES, TrueRewards
from .vocabulary import Vocabulary, as_words

__all__ = ["SYSTEM_SIGN", "GeneratingProcess"]

# the sign of the reward tilt of each system prefix (None: no prefix)
SYSTEM_SIGN = {None: 0.0, "harmless": 1.0, "harmful": -1.0}


class GeneratingProcess:
    """p0 and its tilted tables, ``[K, V + 1, V]`` (prev = V: the start of the response).

    Draws the bigram successor sets from ``rng`` right after :class:`TrueRewards` drew the rewards
    from the same generator: the order of draws defines the task.
    """

    def __init__(self, config: SyntheticTaskConfig, vocabulary: Vocabulary, rewards: TrueRewards,
                 rng: np.random.Generator) -> None:
        self.config = config
        self.vocabulary = vocabulary
        self.rewards = rewards
        c, K, V = config, config.n_topics, len(vocabulary.response_words)
        cat = rewards.category
        # prev index: 0..V-1 = previous response word, V = start of response
        probs = np.array([c.p_neutral, c.p_good, c.p_harmful, c.p_offtopic], dtype=np.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("category probabilities must be >= 0 and not all 0")
        probs = probs / probs.sum()
        self.category_probs = probs
        n_succ = min(c.n_successors, V)
        p0 = np.zeros((K, V + 1, V), dtype=np.float64)
        n_tables = K if c.bigram_per_topic else 1
        boosts = np.zeros((n_tables, V + 1, V))
        for b in range(n_tables):
            for prev in range(V + 1):
                boosts[b, prev, rng.choice(V, size=n_succ, replace=False)] = c.bigram_strength

        def mixed_row(k: int, prev: int, mix: np.ndarray) -> np.ndarray:
            boost = boosts[k if c.bigram_per_topic else 0, prev]
            row = np.zeros(V)
            for ci in range(len(CATEGORIES)):
                members = cat[k] == ci
                if not members.any():
                    continue
                e = np.exp(boost[members])
                row[members] = mix[ci] * e / e.sum()
            return row / row.sum()

        for k in range(K):
            for prev in range(V + 1):
                p0[k, prev] = mixed_row(k, prev, probs)
        # Context variant: the word after a negator is decisive more often (negations then matter);
        # its reward is negated in rewards.contextual.
        if c.context_negators:
            decisive = probs[1] + probs[2]
            mix = probs.copy()
            mix[1:3] *= c.negator_decisive_share / max(decisive, 1e-12)
            mix[[0, 3]] *= (1 - c.negator_decisive_share) / max(1 - decisive, 1e-12)
            for k in range(K):
                for prev in rewards.negators:
                    p0[k, prev] = mixed_row(k, int(prev), mix)
        self.p0 = p0
        # cumulative tables for the three systems (None / harmless / harmful)
        self.probs, self.cdf = self.tilted(c.system_shift)
        self._shifted_tables: dict[float, tuple[dict, dict]] = {}
        self._restricted_tables: dict = {}

    def tilted(self, shift: float) -> tuple[dict, dict]:
        """{system: p} and {system: cdf} for p_system ∝ p0 · exp(sign · shift · r) (r contextual when
        the task has negators)."""
        probs: dict[str | None, np.ndarray] = {}
        cdfs: dict[str | None, np.ndarray] = {}
        contextual = self.rewards.contextual
        for system, sign in SYSTEM_SIGN.items():
            if contextual is None:
                p = self.p0 * np.exp(sign * shift * self.rewards.reward)[:, None, :]
            else:
                p = self.p0 * np.exp(sign * shift * contextual)
            p = p / p.sum(-1, keepdims=True)
            probs[system] = p
            cdf = np.cumsum(p, -1)
            cdf[..., -1] = 1.0
            cdfs[system] = cdf
        return probs, cdfs

    def _restricted_cdfs(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cdf over good+harmful words only, cdf over the other words) of a [K, V+1, V] table:
        the sparse variant draws its decisive and its filler words from these."""
        decisive = np.isin(self.rewards.category, (CATEGORIES.index("good"), CATEGORIES.index("harmful")))[:, None, :]
        out = []
        for keep in (decisive, ~decisive):
            p = probs * keep
            cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
            cdf[..., -1] = 1.0
            out.append(cdf)
        return out[0], out[1]

    def _tables_for(self, shift: float) -> tuple[dict, dict]:
        if shift not in self._shifted_tables:
            self._shifted_tables[shift] = self.tilted(shift)
        return self._shifted_tables[shift]

    def _restricted(self, probs: dict, system: str | None, shift: float | None) -> tuple[np.ndarray, np.ndarray]:
        key = (system, shift)
        cache = self._restricted_tables
        if key not in cache:
            cache[key] = self._restricted_cdfs(probs[system])
        return cache[key]

    def sample_indices(self, topic: int, system: str | None, rng: np.random.Generator,
                       shift: float | None = None) -> list[int]:
        """Response-word indices of one response; ``shift``: prefixes tilted by ±shift instead of
        ±system_shift (the contrastive pairs of ``contrastive_shift``)."""
        c = self.config
        L = int(rng.integers(c.min_response_length, c.max_response_length + 1))
        probs, cdfs = (self.probs, self.cdf) if shift is None else self._tables_for(shift)
        V = len(self.vocabulary.response_words)
        if c.decisive_tokens:  # sparse: decisive words at d random positions, filler elsewhere
            decisive_cdf, filler_cdf = self._restricted(probs, system, shift)
            at = set(rng.choice(L, size=c.decisive_tokens, replace=False).tolist())
            rows = [decisive_cdf[topic] if t in at else filler_cdf[topic] for t in range(L)]
        else:
            rows = [cdfs[system][topic]] * L
        prev = V
        out = []
        for cdf, u in zip(rows, rng.random(L)):
            j = int(np.searchsorted(cdf[prev], u, side="right"))
            j = min(j, V - 1)
            out.append(j)
            prev = j
        return out

    def sample_words(self, topic: int, system: str | None, rng: np.random.Generator,
                     shift: float | None = None) -> list[str]:
        """One response as words (see :meth:`sample_indices`)."""
        return [self.vocabulary.response_words[j] for j in self.sample_indices(topic, system, rng, shift)]

    def response_logprob(self, topic: int | str, words: str | Sequence[str], system: str | None = None) -> list[float]:
        """Per-token log-prob of the words under the (shifted) SFT distribution, excluding the
        length/EOS decision. Useful as an oracle for estimator checks."""
        k = self.vocabulary.topic_idx(topic)
        p = self.probs[system][k]
        V = len(self.vocabulary.response_words)
        prev = V
        out = []
        for w in as_words(words):
            j = self.vocabulary.word_to_index.get(w)
            if j is None:
                out.append(float("-inf"))
                prev = V
                continue
            out.append(float(math.log(p[prev, j])))
            prev = j
        return out
