"""The synthetic task's words, and the word-level tokenizer that gives each of them one id.

One word is one token, so ``tokenizer(response).input_ids[i]`` is the id of word ``i``: the
true reward of token ``i`` is the reward of word ``i``, with no alignment step in between.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .config import SyntheticTaskConfig

__all__ = ["SPECIAL_TOKENS", "SYSTEM_TOKENS", "Vocabulary", "as_words", "word_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
SYSTEM_TOKENS = {"harmless": "<harmless>", "harmful": "<harmful>"}


def as_words(words: str | Sequence[str]) -> list[str]:
    """A response given as text or as a list of words -> its words."""
    return words.split() if isinstance(words, str) else list(words)


class Vocabulary:
    """Topic markers, prompt words and the response vocabulary (neutral, good, harmful), in a fixed order.

    The order of ``response_words`` indexes every reward and probability table of the task, and the
    order of ``vocab`` is the tokenizer's ids: neither may change without changing the task.
    """

    def __init__(self, config: SyntheticTaskConfig) -> None:
        c, K = config, config.n_topics
        self.topics = [f"<t{k}>" for k in range(K)]
        self.prompt_words_topic = [
            [f"t{k}_q{j}" for j in range(c.n_prompt_words_per_topic)] for k in range(K)
        ]
        self.prompt_words_shared = [f"q{j}" for j in range(c.n_prompt_words_shared)]
        self.neutral_words = [f"w{j}" for j in range(c.n_neutral)]
        self.good_words = [[f"t{k}_good{j}" for j in range(c.n_good_per_topic)] for k in range(K)]
        self.topic_harm_words = [
            [f"t{k}_harm{j}" for j in range(c.n_harmful_per_topic)] for k in range(K)
        ]
        self.shared_harm_words = [f"harm{j}" for j in range(c.n_harmful_shared)]
        # response vocabulary (fixed order)
        self.response_words: list[str] = (
            list(self.neutral_words)
            + [w for ws in self.good_words for w in ws]
            + [w for ws in self.topic_harm_words for w in ws]
            + list(self.shared_harm_words)
        )
        self.vocab: list[str] = (
            list(SPECIAL_TOKENS)
            + list(SYSTEM_TOKENS.values())
            + self.topics
            + [w for ws in self.prompt_words_topic for w in ws]
            + self.prompt_words_shared
            + self.response_words
        )
        assert len(set(self.vocab)) == len(self.vocab)
        self.word_to_index = {w: i for i, w in enumerate(self.response_words)}
        self.topic_index = {t: k for k, t in enumerate(self.topics)}

    def topic_idx(self, topic: int | str) -> int:
        """A topic as its index: an int, a topic token ``"<t3>"`` or ``"t3"``."""
        if isinstance(topic, (int, np.integer)):
            if not 0 <= int(topic) < len(self.topics):
                raise ValueError(f"topic {topic} out of range")
            return int(topic)
        if topic in self.topic_index:
            return self.topic_index[topic]
        if isinstance(topic, str) and topic.startswith("t") and topic[1:].isdigit():
            return self.topic_idx(int(topic[1:]))
        raise ValueError(f"unknown topic {topic!r}")


def word_tokenizer(vocab: Sequence[str], max_length: int) -> PreTrainedTokenizerFast:
    """A ``transformers.PreTrainedTokenizerFast`` (word level, whitespace split).

    No special tokens are added automatically (no post-processor): callers append EOS to
    responses themselves; ``add_special_tokens`` is a no-op. ``padding_side`` is "right".
    """
    ids = {w: i for i, w in enumerate(vocab)}
    tk = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(SYSTEM_TOKENS.values()),
        model_max_length=max_length,
    )
