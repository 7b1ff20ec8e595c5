"""``SyntheticTask``: the public face of the built-in task, built from its parts in a fixed order.

The parts (vocabulary, true rewards, generating process, prompts, emitted datasets, statistics)
live in their own modules; this class builds them from one config and keeps the API that the
stages, the metrics, the tests and the notebooks call. See the package docstring for the design.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from .config import SyntheticTaskConfig, fingerprint
from .generated import GeneratedData
from .process import SYSTEM_SIGN, GeneratingProcess
from .prompts import Prompts, system_of, with_system
from .rewards import TrueRewards
from .stats import category_mix, premise_stats
from .vocabulary import Vocabulary, word_tokenizer

__all__ = ["SyntheticTask"]


class SyntheticTask:
    """A generated preference task with known per-token rewards. See the package docstring."""

    def __init__(self, config: SyntheticTaskConfig | dict | None = None, **overrides: Any) -> None:
        if config is None or isinstance(config, Mapping):  # dict, OmegaConf DictConfig
            config = SyntheticTaskConfig.from_dict(dict(config or {}), **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.vocabulary = Vocabulary(config)
        # One generator for rewards and then the bigram tables: the order of draws defines the task.
        rng = np.random.default_rng([config.seed, 0])
        self.rewards = TrueRewards(config, self.vocabulary, rng)
        self.process = GeneratingProcess(config, self.vocabulary, self.rewards, rng)
        self._prompts = Prompts(config, self.vocabulary)
        self._data = GeneratedData(config, self.vocabulary, self.rewards, self.process, self._prompts)
        # the vocabulary's word lists, as attributes of the task (callers read them here)
        self.topics = self.vocabulary.topics
        self.prompt_words_topic = self.vocabulary.prompt_words_topic
        self.prompt_words_shared = self.vocabulary.prompt_words_shared
        self.neutral_words = self.vocabulary.neutral_words
        self.good_words = self.vocabulary.good_words
        self.topic_harm_words = self.vocabulary.topic_harm_words
        self.shared_harm_words = self.vocabulary.shared_harm_words
        self.response_words = self.vocabulary.response_words
        self.vocab = self.vocabulary.vocab
        self.word_to_index = self.vocabulary.word_to_index

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """A ``transformers.PreTrainedTokenizerFast`` (word level, whitespace split).

        No special tokens are added automatically (no post-processor): callers append EOS to
        responses themselves; ``add_special_tokens`` is a no-op. ``padding_side`` is "right".
        """
        return word_tokenizer(self.vocab, self.max_sequence_length)

    @property
    def max_sequence_length(self) -> int:
        """system + topic + prompt words + response + EOS (+1 spare for a BOS)."""
        c = self.config
        return 1 + 1 + c.prompt_length + c.max_response_length + 1 + 1

    def tiny_model_config(self, **overrides: Any) -> dict:
        """``transformers.LlamaConfig`` kwargs for this vocabulary, as ``model=tiny`` builds it (~0.4M params)."""
        cfg = dict(  # the sizes of conf/model/tiny.yaml
            vocab_size=self.vocab_size,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            pad_token_id=self.vocab.index("<pad>"),
            bos_token_id=self.vocab.index("<bos>"),
            eos_token_id=self.vocab.index("<eos>"),
        )
        cfg.update(overrides)
        return cfg

    # ------------------------------------------------------------------ rewards
    def token_reward(self, topic: int | str, word: str) -> float:
        """Context-free true reward of ``word`` in ``topic`` (at the start of a response, or after a
        non-negator; ``token_rewards`` gives the per-position ones). Words outside the response vocabulary
        (specials, prompt/topic/system words, unknown words) get ``invalid_token_reward``.
        EOS is not a word of the response and must not be passed."""
        return self.rewards.token_reward(topic, word)

    def word_category(self, topic: int | str, word: str) -> str:
        """"neutral" | "good" | "harmful" | "offtopic" (another topic's word; neutral reward),
        or "invalid" for words outside the response vocabulary."""
        return self.rewards.word_category(topic, word)

    def is_harmful(self, topic: int | str, word: str) -> bool:
        return self.word_category(topic, word) == "harmful"

    def is_good(self, topic: int | str, word: str) -> bool:
        return self.word_category(topic, word) == "good"

    def token_rewards(self, topic: int | str, words: str | Sequence[str]) -> list[float]:
        """True reward of every word of a response, position by position: with negators the
        reward of a word depends on the previous word (a word outside the response vocabulary
        costs ``invalid_token_reward`` and is no negator)."""
        return self.rewards.token_rewards(topic, words)

    def sequence_reward(self, topic: int | str, words: str | Sequence[str]) -> float:
        """Sum of the true token rewards (pass the words without the final EOS)."""
        return self.rewards.sequence_reward(topic, words)

    def reward_table(self) -> dict[str, dict[str, float]]:
        """{topic token: {response word: reward}} — handy for notebooks."""
        return self.rewards.reward_table()

    # ------------------------------------------------------------------ prompts
    def prompt_topic(self, i: int, split: str = "train") -> int:
        return self._prompts.topic(i, split)

    def prompt_text(self, i: int, system: str | None = None, split: str = "train") -> str:
        """Prompt ``i`` of ``split``: "<tK> q.. q..", optionally preceded by a system token."""
        return self._prompts.text(i, system, split)

    def prompts(self, n: int, split: str = "test", system: str | None = None) -> list[str]:
        return [self.prompt_text(i, system=system, split=split) for i in range(n)]

    def with_system(self, prompt: str, system: str | None) -> str:
        """Replace/remove the system token of ``prompt`` (system None | "harmless" | "harmful")."""
        return with_system(prompt, system)

    def contrastive_prompts(self, prompt: str) -> tuple[str, str]:
        """(prompt with <harmless>, prompt with <harmful>) for the TIS-DPO(P) estimator."""
        return self.with_system(prompt, "harmless"), self.with_system(prompt, "harmful")

    def topic_of(self, prompt: str) -> int:
        """Topic index of a prompt string (the first topic token in it)."""
        return self._prompts.topic_of(prompt)

    def system_of(self, prompt: str) -> str | None:
        return system_of(prompt)

    # ------------------------------------------------------------------ responses
    def sample_response(
        self, topic: int | str, system: str | None = None, rng: np.random.Generator | int | None = None
    ) -> list[str]:
        """One response (list of words) from the SFT distribution, optionally system-shifted."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        if system not in SYSTEM_SIGN:
            raise ValueError(f"system must be None, 'harmless' or 'harmful', got {system!r}")
        return self.process.sample_words(self.vocabulary.topic_idx(topic), system, rng)

    def response_logprob(self, topic: int | str, words: str | Sequence[str], system: str | None = None) -> list[float]:
        """Per-token log-prob of the words under the (shifted) SFT distribution, excluding the
        length/EOS decision. Useful as an oracle for estimator checks."""
        return self.process.response_logprob(topic, words, system)

    def category_mix(self, system: str | None = None, n: int = 2000, seed: int = 12345) -> dict[str, float]:
        """Empirical share of each category among tokens sampled from the (shifted) SFT
        distribution, plus the share of responses with at least one harmful word and the mean
        true reward."""
        return category_mix(self.config, self.rewards, self.process, system, n, seed)

    # ------------------------------------------------------------------ datasets
    def sft_examples(self, n: int | None = None, split: str = "sft") -> list[dict]:
        """``n`` (default ``n_sft``) rows {"prompt", "response"} from the SFT distribution;
        a share ``sft_system_share`` carry a system prefix (half <harmless>, half <harmful>)
        and their responses are drawn from the correspondingly shifted distribution."""
        return self._data.sft_examples(n, split)

    def preference_pairs(self, split: str = "train", n: int | None = None) -> list[dict]:
        """Canonical preference rows for ``split`` ("train" | "test" | any name):
        {"prompt", "chosen", "rejected", "meta": {"topic", "chosen_token_rewards",
        "rejected_token_rewards", "chosen_reward", "rejected_reward", "label_correct"}}.
        Both responses come from the unprefixed SFT distribution; the label is Bradley–Terry on
        the true sequence reward (temperature ``bt_temperature``) with flip noise ``label_noise``.
        """
        return self._data.preference_pairs(split, n)

    def contrastive_pairs(self, split: str = "train", n: int | None = None) -> list[dict]:
        """RLCD-style "LLM-generated" pairs: chosen sampled under the <harmless> prefix, rejected under
        <harmful> (both shown without the prefix), true token rewards in meta (``dataset.pairs=contrastive``).
        With ``contrastive_shift`` the prefixes tilt by ±contrastive_shift (overlapping samples)."""
        return self._data.contrastive_pairs(split, n)

    def premise_stats(self, rows: Iterable[dict] | None = None, split: str = "train") -> dict[str, float]:
        """How much the TIS-DPO premise holds on preference rows (default: ``split``'s pairs):
        share of chosen responses with a harmful word, of rejected ones with a good word, of
        tokens in chosen that are harmful, and of pairs whose label agrees with the true reward."""
        rows = self.preference_pairs(split) if rows is None else list(rows)
        return premise_stats(rows, self._prompts, self.rewards)

    def fingerprint(self) -> str:
        """Stable short hash of the config (for artifact cache keys)."""
        return fingerprint(self.config)

    def __repr__(self) -> str:
        return f"SyntheticTask(seed={self.config.seed}, topics={self.config.n_topics}, vocab={self.vocab_size})"
