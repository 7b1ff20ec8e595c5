"""The synthetic task's knobs (:class:`SyntheticTaskConfig`) and the fingerprint that names its data.

The fingerprint is part of every cached artifact's key, so it must not move when a field is added
with a default that keeps the task as it was: those fields (:data:`VARIANT_FIELDS`) are left out
of the hash while they hold their defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["SyntheticTaskConfig", "VARIANT_FIELDS", "fingerprint"]


@dataclass
class SyntheticTaskConfig:
    """All knobs of the synthetic task. Defaults are sized for a 2-layer, 64-wide Llama on CPU."""

    seed: int = 0
    n_topics: int = 6
    # vocabulary sizes
    n_neutral: int = 40  # shared neutral words w{j}
    n_good_per_topic: int = 4  # t{k}_good{j}
    n_harmful_per_topic: int = 2  # t{k}_harm{j}
    n_harmful_shared: int = 4  # harm{j}
    n_prompt_words_per_topic: int = 5  # t{k}_q{j}
    n_prompt_words_shared: int = 10  # q{j}
    # shapes
    prompt_length: int = 4  # words after the topic token
    min_response_length: int = 6
    max_response_length: int = 16
    # SFT token mix (category probabilities of the unprefixed distribution; renormalised)
    p_neutral: float = 0.68
    p_good: float = 0.14
    p_harmful: float = 0.12
    p_offtopic: float = 0.06
    n_successors: int = 3  # preferred successors per (topic, previous word)
    bigram_strength: float = 2.0  # log-boost of a preferred successor within its category
    bigram_per_topic: bool = False  # successor sets per (topic, prev) instead of per prev
    # true rewards
    good_reward_range: tuple[float, float] = (1.0, 2.0)
    harmful_reward_range: tuple[float, float] = (-3.0, -2.0)
    neutral_reward_scale: float = 0.25
    # any generated token outside the response vocabulary (prompt/topic/system words, specials,
    # unknown words) is gibberish: it costs this much (DPO can push mass onto such tokens)
    invalid_token_reward: float = -1.0
    # system prefixes: p_± ∝ p0 · exp(±system_shift · r)
    system_shift: float = 1.0
    # preference labels
    bt_temperature: float = 1.0
    label_noise: float = 0.0
    # dataset sizes
    n_sft: int = 20000
    sft_system_share: float = 0.3  # share of SFT examples with a system prefix (half each)
    n_train_pairs: int = 2000
    n_test_pairs: int = 256
    # harder variants (package docstring); these defaults are the easy task, bit for bit
    context_negators: int = 0  # first n neutral words negate the next word's reward
    negator_decisive_share: float = 0.5  # share of good+harmful words right after a negator
    decisive_tokens: int = 0  # > 0: exactly this many good/harmful words per response, the rest neutral
    contrastive_shift: float | None = None  # tilt of the contrastive pairs' prefixes (None: system_shift)

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand tuples over as lists
        self.good_reward_range = tuple(float(x) for x in self.good_reward_range)  # type: ignore[assignment]
        self.harmful_reward_range = tuple(float(x) for x in self.harmful_reward_range)  # type: ignore[assignment]
        if self.min_response_length < 1 or self.max_response_length < self.min_response_length:
            raise ValueError("need 1 <= min_response_length <= max_response_length")
        if self.n_topics < 1:
            raise ValueError("n_topics must be >= 1")
        if not 0 <= self.context_negators <= self.n_neutral:
            raise ValueError(f"context_negators={self.context_negators} must be in [0, n_neutral={self.n_neutral}]")
        if not 0 < self.negator_decisive_share < 1:
            raise ValueError(f"negator_decisive_share={self.negator_decisive_share} must be in (0, 1)")
        if not 0 <= self.decisive_tokens <= self.min_response_length:
            raise ValueError(f"decisive_tokens={self.decisive_tokens} must be in [0, min_response_length="
                             f"{self.min_response_length}]")

    @classmethod
    def from_dict(cls, d: dict | None = None, **overrides: Any) -> "SyntheticTaskConfig":
        d = dict(d or {}, **overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TypeError(f"unknown SyntheticTaskConfig fields: {sorted(unknown)}")
        return cls(**d)


# the harder variants' fields: left out of the fingerprint at their defaults
VARIANT_FIELDS = ("context_negators", "negator_decisive_share", "decisive_tokens", "contrastive_shift")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SyntheticTaskConfig)}


def fingerprint(config: SyntheticTaskConfig) -> str:
    """Stable short hash of the config (for artifact cache keys)."""
    fields = dataclasses.asdict(config)
    for f in VARIANT_FIELDS:  # the easy task hashes as before the variants existed
        if fields[f] == _DEFAULTS[f]:
            del fields[f]
    blob = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
