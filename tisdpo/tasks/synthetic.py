"""The built-in synthetic preference task: every token's TRUE reward is known.

Design (all of it deterministic from ``SyntheticTaskConfig.seed``):

Vocabulary (plain, readable words; one word = one token)::

    specials     <pad> <bos> <eos> <unk>
    system       <harmless> <harmful>
    topics       <t0> ... <t{K-1}>
    prompt words t{k}_q{j} (topic-specific) and q{j} (shared)
    responses    w{j}            shared neutral words
                 t{k}_good{j}    helpful words of topic k
                 t{k}_harm{j}    harmful words of topic k
                 harm{j}         harmful in every topic

True token reward ``r(topic, word)``:

* ``harm{j}`` and ``t{k}_harm{j}`` (in topic k): strongly negative, distinct values in
  ``harmful_reward_range`` (default -3 ... -2);
* ``t{k}_good{j}`` (in topic k): strongly positive, in ``good_reward_range`` (1 ... 2);
* tokens outside the response vocabulary (prompt/topic/system words, ``<pad>``/``<bos>``/``<unk>``,
  unknown words) are "invalid" (gibberish) and cost ``invalid_token_reward`` (default -1); they
  never occur in the data but an aligned policy can drift onto them;
* everything else (``w{j}``, and another topic's good/harm words, "off-topic"): neutral, a SMALL
  DISTINCT reward drawn uniformly from ``[-neutral_reward_scale, +neutral_reward_scale]`` per
  (topic, word). Rewards are therefore (almost surely) free of exact ties, so a pooled Spearman
  correlation between estimated weights and true rewards is meaningful; the neutral values are
  small but real (they enter the sequence reward, the preference labels and the system-prefix
  shift), so a good estimator can in principle recover them too.

SFT distribution (the "data-generating policy"): a response of length L ~ U{min..max} where each
word is drawn from ``p0(w | topic, prev)``: first a category (neutral / good / harmful / off-topic,
probabilities ``p_neutral`` ...), then a word of that category with a topic-dependent bigram
preference (each previous word — or each (topic, previous word) with ``bigram_per_topic`` — has
``n_successors`` preferred successors boosted by ``bigram_strength`` in log space; as categories
are topic-specific the resulting bigram p0(w | topic, prev) depends on the topic either way).
This gives a transformer sequential structure to learn (the first word uses a "start" row).

System prefixes tilt the SFT distribution by the true reward, token by token::

    p_harmless(w | ctx) ∝ p0(w | ctx) · exp(+λ · r(topic, w))
    p_harmful (w | ctx) ∝ p0(w | ctx) · exp(-λ · r(topic, w))       λ = system_shift

so the ideal TIS-DPO(P) score log p_harmless(y_t|ctx) − log p_harmful(y_t|ctx) equals
2λ·r(topic, y_t) up to a per-context constant: the ``prompt`` estimator has something real to read.

Preference pairs: two responses from p0 (no prefix), label by Bradley–Terry on the true sequence
reward, P(a ≻ b) = σ((R(a) − R(b)) / bt_temperature), then flipped with prob ``label_noise``.
Because responses mix good and harmful words, chosen responses often contain harmful words and
rejected ones good words (the premise of TIS-DPO; see :meth:`SyntheticTask.premise_stats`).

Tokenizer: word level, whitespace split, NO automatically added special tokens (no post
processor), so ``tokenizer(response).input_ids[i]`` is the id of word ``i`` of the response.

Harder variants (options; at their defaults the task and every generated row are unchanged). The
default task is "easy" for token weighting: rewards are additive and context-free, so the sequence
label already tells DPO which words to move, and contrastive pairs are perfectly separable.

* ``context_negators = n``: the first n neutral words ``w0..w{n-1}`` are negators: the word after a
  negator has the OPPOSITE reward, r(topic, prev=negator, w) = −r(topic, w) ("not harmful" is
  good). Rewards are computed per position (``token_rewards``, the ``meta`` token rewards, the
  preference labels and the policy metrics all use them), the system prefixes tilt by the
  contextual reward, and after a negator a share ``negator_decisive_share`` of the next words are
  good/harmful (so negations matter often). A context-free estimate of a word's value is wrong
  after a negator.
* ``decisive_tokens = d``: sparse credit: every response is neutral/off-topic except exactly d
  good-or-harmful words at random positions (with long responses, e.g. 32..64 words, one decisive
  word decides the label among dozens of neutral ones).
* ``contrastive_shift = s``: contrastive (RLCD-style) pairs are sampled under prefixes tilted by
  ±s instead of ±system_shift: a small s makes <harmless> and <harmful> samples overlap, so the
  contrastive pairs are no longer perfectly separable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
SYSTEM_TOKENS = {"harmless": "<harmless>", "harmful": "<harmful>"}
_SYSTEM_SIGN = {None: 0.0, "harmless": 1.0, "harmful": -1.0}
CATEGORIES = ("neutral", "good", "harmful", "offtopic")
_SPLIT_CODES = {"train": 1, "test": 2, "sft": 3, "eval": 4, "validation": 5}


def _split_code(split: str) -> int:
    if split in _SPLIT_CODES:
        return _SPLIT_CODES[split]
    # any other split name gets its own stable stream
    return 100 + zlib.crc32(split.encode()) % 100_000


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
    # harder variants (module docstring); these defaults are the easy task, bit for bit
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


_VARIANT_FIELDS = ("context_negators", "negator_decisive_share", "decisive_tokens", "contrastive_shift")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SyntheticTaskConfig)}


class SyntheticTask:
    """A generated preference task with known per-token rewards. See the module docstring."""

    def __init__(self, config: SyntheticTaskConfig | dict | None = None, **overrides: Any) -> None:
        if config is None or isinstance(config, Mapping):  # dict, OmegaConf DictConfig
            config = SyntheticTaskConfig.from_dict(dict(config or {}), **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._build_vocabulary()
        # One generator for rewards and then the bigram tables: the order of draws defines the task.
        rng = np.random.default_rng([config.seed, 0])
        self._build_rewards(rng)
        self._build_sft_distribution(rng)

    def _build_vocabulary(self) -> None:
        """Topic markers, prompt words and the response vocabulary (neutral, good, harmful)."""
        c, K = self.config, self.config.n_topics
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
        self._topic_index = {t: k for k, t in enumerate(self.topics)}

    def _build_rewards(self, rng: np.random.Generator) -> None:
        """The category (neutral/good/harmful/off-topic) and TRUE reward of every response word per topic."""
        c, K, V = self.config, self.config.n_topics, len(self.response_words)
        cat = np.zeros((K, V), dtype=np.int64)  # index into CATEGORIES
        reward = np.zeros((K, V), dtype=np.float64)
        idx = self.word_to_index
        for k in range(K):
            cat[k, :] = CATEGORIES.index("offtopic")
            for w in self.neutral_words:
                cat[k, idx[w]] = 0
            for w in self.good_words[k]:
                cat[k, idx[w]] = 1
            for w in self.topic_harm_words[k] + self.shared_harm_words:
                cat[k, idx[w]] = 2
        # neutral/off-topic: small distinct values per (topic, word)
        s = c.neutral_reward_scale
        reward[:] = rng.uniform(-s, s, size=(K, V))
        # shared harmful words: one value per word, same in all topics
        lo, hi = c.harmful_reward_range
        shared_h = rng.uniform(lo, hi, size=len(self.shared_harm_words))
        for j, w in enumerate(self.shared_harm_words):
            reward[:, idx[w]] = shared_h[j]
        for k in range(K):
            for w in self.topic_harm_words[k]:
                reward[k, idx[w]] = rng.uniform(lo, hi)
            glo, ghi = c.good_reward_range
            for w in self.good_words[k]:
                reward[k, idx[w]] = rng.uniform(glo, ghi)
        self._cat = cat
        self._reward = reward

    def _build_sft_distribution(self, rng: np.random.Generator) -> None:
        """p0(w | topic, prev), a category mix with bigram boosts, and its shifts under the system prefixes."""
        c, K, V = self.config, self.config.n_topics, len(self.response_words)
        cat, reward = self._cat, self._reward
        # prev index: 0..V-1 = previous response word, V = start of response
        probs = np.array([c.p_neutral, c.p_good, c.p_harmful, c.p_offtopic], dtype=np.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise ValueError("category probabilities must be >= 0 and not all 0")
        probs = probs / probs.sum()
        self._category_probs = probs
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
        # Context variant: the word after a negator is decisive more often (negations then matter),
        # and its reward is negated: R[k, prev, w] is the reward of w after prev (prev = V: start).
        self._negators = np.arange(c.context_negators)  # neutral words come first in response_words
        self._ctx_reward = None
        if c.context_negators:
            decisive = probs[1] + probs[2]
            mix = probs.copy()
            mix[1:3] *= c.negator_decisive_share / max(decisive, 1e-12)
            mix[[0, 3]] *= (1 - c.negator_decisive_share) / max(1 - decisive, 1e-12)
            for k in range(K):
                for prev in self._negators:
                    p0[k, prev] = mixed_row(k, int(prev), mix)
            ctx = np.repeat(reward[:, None, :], V + 1, axis=1)
            ctx[:, self._negators, :] *= -1.0
            self._ctx_reward = ctx
        self._p0 = p0
        # cumulative tables for the three systems (None / harmless / harmful)
        self._probs, self._cdf = self._tilted(c.system_shift)
        self._shifted_tables: dict[float, tuple[dict, dict]] = {}
        self._restricted_tables: dict = {}

    def _tilted(self, shift: float) -> tuple[dict, dict]:
        """{system: p} and {system: cdf} for p_system ∝ p0 · exp(sign · shift · r) (r contextual when
        the task has negators)."""
        probs: dict[str | None, np.ndarray] = {}
        cdfs: dict[str | None, np.ndarray] = {}
        for system, sign in _SYSTEM_SIGN.items():
            if self._ctx_reward is None:
                p = self._p0 * np.exp(sign * shift * self._reward)[:, None, :]
            else:
                p = self._p0 * np.exp(sign * shift * self._ctx_reward)
            p = p / p.sum(-1, keepdims=True)
            probs[system] = p
            cdf = np.cumsum(p, -1)
            cdf[..., -1] = 1.0
            cdfs[system] = cdf
        return probs, cdfs

    def _restricted_cdfs(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cdf over good+harmful words only, cdf over the other words) of a [K, V+1, V] table:
        the sparse variant draws its decisive and its filler words from these."""
        decisive = np.isin(self._cat, (CATEGORIES.index("good"), CATEGORIES.index("harmful")))[:, None, :]
        out = []
        for keep in (decisive, ~decisive):
            p = probs * keep
            cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
            cdf[..., -1] = 1.0
            out.append(cdf)
        return out[0], out[1]

    def _path_rewards(self, topic: int, idx: Sequence[int]) -> np.ndarray:
        """True rewards of a response given as response-word indices, position by position."""
        if self._ctx_reward is None:
            return self._reward[topic, idx]
        idx = np.asarray(idx, dtype=np.int64)
        prev = np.concatenate([[len(self.response_words)], idx[:-1]]).astype(np.int64)
        return self._ctx_reward[topic, prev, idx]

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenizer(self):
        """A ``transformers.PreTrainedTokenizerFast`` (word level, whitespace split).

        No special tokens are added automatically (no post-processor): callers append EOS to
        responses themselves; ``add_special_tokens`` is a no-op. ``padding_side`` is "right".
        """
        vocab = {w: i for i, w in enumerate(self.vocab)}
        tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=tk,
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            additional_special_tokens=list(SYSTEM_TOKENS.values()),
            model_max_length=self.max_sequence_length,
        )
        return tok

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
    def _topic_idx(self, topic: int | str) -> int:
        if isinstance(topic, (int, np.integer)):
            if not 0 <= int(topic) < self.config.n_topics:
                raise ValueError(f"topic {topic} out of range")
            return int(topic)
        if topic in self._topic_index:
            return self._topic_index[topic]
        if isinstance(topic, str) and topic.startswith("t") and topic[1:].isdigit():
            return self._topic_idx(int(topic[1:]))
        raise ValueError(f"unknown topic {topic!r}")

    def token_reward(self, topic: int | str, word: str) -> float:
        """Context-free true reward of ``word`` in ``topic`` (at the start of a response, or after a
        non-negator; ``token_rewards`` gives the per-position ones). Words outside the response vocabulary
        (specials, prompt/topic/system words, unknown words) get ``invalid_token_reward``.
        EOS is not a word of the response and must not be passed."""
        j = self.word_to_index.get(word)
        if j is None:
            return float(self.config.invalid_token_reward)
        return float(self._reward[self._topic_idx(topic), j])

    def word_category(self, topic: int | str, word: str) -> str:
        """"neutral" | "good" | "harmful" | "offtopic" (another topic's word; neutral reward),
        or "invalid" for words outside the response vocabulary."""
        j = self.word_to_index.get(word)
        if j is None:
            return "invalid"
        return CATEGORIES[self._cat[self._topic_idx(topic), j]]

    def is_harmful(self, topic: int | str, word: str) -> bool:
        return self.word_category(topic, word) == "harmful"

    def is_good(self, topic: int | str, word: str) -> bool:
        return self.word_category(topic, word) == "good"

    @staticmethod
    def _words(words: str | Sequence[str]) -> list[str]:
        return words.split() if isinstance(words, str) else list(words)

    def token_rewards(self, topic: int | str, words: str | Sequence[str]) -> list[float]:
        """True reward of every word of a response, position by position: with negators the
        reward of a word depends on the previous word (a word outside the response vocabulary
        costs ``invalid_token_reward`` and is no negator)."""
        words = self._words(words)
        if self._ctx_reward is None:
            return [self.token_reward(topic, w) for w in words]
        k, V = self._topic_idx(topic), len(self.response_words)
        out, prev = [], V
        for w in words:
            j = self.word_to_index.get(w)
            if j is None:
                out.append(float(self.config.invalid_token_reward))
                prev = V
                continue
            out.append(float(self._ctx_reward[k, prev, j]))
            prev = j
        return out

    def sequence_reward(self, topic: int | str, words: str | Sequence[str]) -> float:
        """Sum of the true token rewards (pass the words without the final EOS)."""
        return float(sum(self.token_rewards(topic, words)))

    def reward_table(self) -> dict[str, dict[str, float]]:
        """{topic token: {response word: reward}} — handy for notebooks."""
        return {
            t: {w: float(self._reward[k, j]) for j, w in enumerate(self.response_words)}
            for k, t in enumerate(self.topics)
        }

    # ------------------------------------------------------------------ prompts
    def _prompt_rng(self, split: str, i: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, _split_code(split), int(i), 0])

    def prompt_topic(self, i: int, split: str = "train") -> int:
        return int(self._prompt_rng(split, i).integers(self.config.n_topics))

    def prompt_text(self, i: int, system: str | None = None, split: str = "train") -> str:
        """Prompt ``i`` of ``split``: "<tK> q.. q..", optionally preceded by a system token."""
        rng = self._prompt_rng(split, i)
        k = int(rng.integers(self.config.n_topics))
        pool = self.prompt_words_topic[k] + self.prompt_words_shared
        words = [pool[j] for j in rng.integers(len(pool), size=self.config.prompt_length)]
        return self.with_system(" ".join([self.topics[k]] + words), system)

    def prompts(self, n: int, split: str = "test", system: str | None = None) -> list[str]:
        return [self.prompt_text(i, system=system, split=split) for i in range(n)]

    def with_system(self, prompt: str, system: str | None) -> str:
        """Replace/remove the system token of ``prompt`` (system None | "harmless" | "harmful")."""
        words = prompt.split()
        if words and words[0] in SYSTEM_TOKENS.values():
            words = words[1:]
        if system is not None:
            if system not in SYSTEM_TOKENS:
                raise ValueError(f"system must be None, 'harmless' or 'harmful', got {system!r}")
            words = [SYSTEM_TOKENS[system]] + words
        return " ".join(words)

    def contrastive_prompts(self, prompt: str) -> tuple[str, str]:
        """(prompt with <harmless>, prompt with <harmful>) for the TIS-DPO(P) estimator."""
        return self.with_system(prompt, "harmless"), self.with_system(prompt, "harmful")

    def topic_of(self, prompt: str) -> int:
        """Topic index of a prompt string (the first topic token in it)."""
        for w in prompt.split():
            if w in self._topic_index:
                return self._topic_index[w]
        raise ValueError(f"no topic token in prompt {prompt!r}")

    def system_of(self, prompt: str) -> str | None:
        inv = {v: k for k, v in SYSTEM_TOKENS.items()}
        words = prompt.split()
        return inv.get(words[0]) if words else None

    # ------------------------------------------------------------------ responses
    def _sample_indices(self, topic: int, system: str | None, rng: np.random.Generator,
                        shift: float | None = None) -> list[int]:
        """Response-word indices of one response; ``shift``: prefixes tilted by ±shift instead of
        ±system_shift (the contrastive pairs of ``contrastive_shift``)."""
        c = self.config
        L = int(rng.integers(c.min_response_length, c.max_response_length + 1))
        probs, cdfs = (self._probs, self._cdf) if shift is None else self._tables_for(shift)
        V = len(self.response_words)
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

    def _tables_for(self, shift: float) -> tuple[dict, dict]:
        if shift not in self._shifted_tables:
            self._shifted_tables[shift] = self._tilted(shift)
        return self._shifted_tables[shift]

    def _restricted(self, probs: dict, system: str | None, shift: float | None) -> tuple[np.ndarray, np.ndarray]:
        key = (system, shift)
        cache = self._restricted_tables
        if key not in cache:
            cache[key] = self._restricted_cdfs(probs[system])
        return cache[key]

    def sample_response(
        self, topic: int | str, system: str | None = None, rng: np.random.Generator | int | None = None
    ) -> list[str]:
        """One response (list of words) from the SFT distribution, optionally system-shifted."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        if system not in _SYSTEM_SIGN:
            raise ValueError(f"system must be None, 'harmless' or 'harmful', got {system!r}")
        idx = self._sample_indices(self._topic_idx(topic), system, rng)
        return [self.response_words[j] for j in idx]

    def response_logprob(self, topic: int | str, words: str | Sequence[str], system: str | None = None) -> list[float]:
        """Per-token log-prob of the words under the (shifted) SFT distribution, excluding the
        length/EOS decision. Useful as an oracle for estimator checks."""
        k = self._topic_idx(topic)
        p = self._probs[system][k]
        prev = len(self.response_words)
        out = []
        for w in self._words(words):
            j = self.word_to_index.get(w)
            if j is None:
                out.append(float("-inf"))
                prev = len(self.response_words)
                continue
            out.append(float(math.log(p[prev, j])))
            prev = j
        return out

    def category_mix(self, system: str | None = None, n: int = 2000, seed: int = 12345) -> dict[str, float]:
        """Empirical share of each category among tokens sampled from the (shifted) SFT
        distribution, plus the share of responses with at least one harmful word and the mean
        true reward."""
        rng = np.random.default_rng([self.config.seed, seed])
        counts = np.zeros(len(CATEGORIES))
        n_unsafe = 0
        total_r = 0.0
        for i in range(n):
            k = int(rng.integers(self.config.n_topics))
            idx = self._sample_indices(k, system, rng)
            cats = self._cat[k, idx]
            counts += np.bincount(cats, minlength=len(CATEGORIES))
            n_unsafe += int((cats == 2).any())
            total_r += float(self._path_rewards(k, idx).sum())
        shares = counts / counts.sum()
        out = {f"{c}_share": float(s) for c, s in zip(CATEGORIES, shares)}
        out["unsafe_rate"] = n_unsafe / n
        out["mean_reward"] = total_r / n
        return out

    # ------------------------------------------------------------------ datasets
    def sft_examples(self, n: int | None = None, split: str = "sft") -> list[dict]:
        """``n`` (default ``n_sft``) rows {"prompt", "response"} from the SFT distribution;
        a share ``sft_system_share`` carry a system prefix (half <harmless>, half <harmful>)
        and their responses are drawn from the correspondingly shifted distribution."""
        c = self.config
        n = c.n_sft if n is None else int(n)
        rows = []
        for i in range(n):
            rng = np.random.default_rng([c.seed, _split_code(split), i, 1])
            u = rng.random()
            if u < c.sft_system_share / 2:
                system = "harmless"
            elif u < c.sft_system_share:
                system = "harmful"
            else:
                system = None
            prompt = self.prompt_text(i, system=system, split=split)
            k = self.topic_of(prompt)
            words = self.sample_response(k, system, rng)
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
        n = self._pair_count(split, n)
        rows = []
        for i in range(int(n)):
            prompt = self.prompt_text(i, split=split)
            k = self.topic_of(prompt)
            rng = np.random.default_rng([c.seed, _split_code(split), i, 2])
            a = self._sample_indices(k, None, rng)
            b = self._sample_indices(k, None, rng)
            ra = self._path_rewards(k, a)
            rb = self._path_rewards(k, b)
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
                    "chosen": " ".join(self.response_words[j] for j in cw),
                    "rejected": " ".join(self.response_words[j] for j in lw),
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

    def _pair_count(self, split: str, n: int | None) -> int:
        """``n``, or the configured number of pairs of ``split`` (test / any other name: train)."""
        if n is None:
            return self.config.n_test_pairs if split == "test" else self.config.n_train_pairs
        return int(n)

    def contrastive_pairs(self, split: str = "train", n: int | None = None) -> list[dict]:
        """RLCD-style "LLM-generated" pairs: chosen sampled under the <harmless> prefix, rejected under
        <harmful> (both shown without the prefix), true token rewards in meta (``dataset.pairs=contrastive``).
        With ``contrastive_shift`` the prefixes tilt by ±contrastive_shift (overlapping samples)."""
        c = self.config
        n = self._pair_count(split, n)
        rows = []
        for i in range(int(n)):
            prompt = self.prompt_text(i, split=split)
            topic = self.topic_of(prompt)
            rng = np.random.default_rng([c.seed, 7, i])
            if c.contrastive_shift is None:
                chosen, rejected = self.sample_response(topic, "harmless", rng), self.sample_response(topic, "harmful", rng)
            else:  # weaker prefixes: the two samples overlap, a pair is not always separable
                chosen, rejected = ([self.response_words[j] for j in self._sample_indices(topic, system, rng, c.contrastive_shift)]
                                    for system in ("harmless", "harmful"))
            chosen_r, rejected_r = self.token_rewards(topic, chosen), self.token_rewards(topic, rejected)
            rows.append({"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected),
                         "meta": {"topic": topic, "chosen_token_rewards": chosen_r, "rejected_token_rewards": rejected_r,
                                  "chosen_reward": sum(chosen_r), "rejected_reward": sum(rejected_r)}})
        return rows

    def premise_stats(self, rows: Iterable[dict] | None = None, split: str = "train") -> dict[str, float]:
        """How much the TIS-DPO premise holds on preference rows (default: ``split``'s pairs):
        share of chosen responses with a harmful word, of rejected ones with a good word, of
        tokens in chosen that are harmful, and of pairs whose label agrees with the true reward."""
        rows = self.preference_pairs(split) if rows is None else list(rows)
        n = len(rows)
        if n == 0:
            return {}
        ch_h = rj_g = ch_g = rj_h = agree = 0
        ch_tok_h = ch_tok = 0
        for r in rows:
            k = self.topic_of(r["prompt"])
            cw, rw = r["chosen"].split(), r["rejected"].split()
            ch_cats = [self.word_category(k, w) for w in cw]
            rj_cats = [self.word_category(k, w) for w in rw]
            ch_h += "harmful" in ch_cats
            ch_g += "good" in ch_cats
            rj_g += "good" in rj_cats
            rj_h += "harmful" in rj_cats
            ch_tok_h += ch_cats.count("harmful")
            ch_tok += len(ch_cats)
            agree += self.sequence_reward(k, cw) > self.sequence_reward(k, rw)
        return {
            "chosen_with_harmful": ch_h / n,
            "rejected_with_good": rj_g / n,
            "chosen_with_good": ch_g / n,
            "rejected_with_harmful": rj_h / n,
            "chosen_harmful_token_share": ch_tok_h / max(ch_tok, 1),
            "label_agreement": agree / n,
        }

    def fingerprint(self) -> str:
        """Stable short hash of the config (for artifact cache keys)."""
        fields = dataclasses.asdict(self.config)
        for f in _VARIANT_FIELDS:  # the easy task hashes as before the variants existed
            if fields[f] == _DEFAULTS[f]:
                del fields[f]
        blob = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SyntheticTask(seed={self.config.seed}, topics={self.config.n_topics}, vocab={self.vocab_size})"


__all__ = ["SyntheticTask", "SyntheticTaskConfig", "SPECIAL_TOKENS", "SYSTEM_TOKENS", "CATEGORIES"]
