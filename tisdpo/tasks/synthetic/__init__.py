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

The credit-assignment task (``conf/dataset/synthetic_credit.yaml``, the default ``dataset`` since issue
#22) sets plain fields rather than a variant option. It has 300 pairs, 16-24-word responses with rare
good/harmful words (about 1.1 per response) and soft, noisy labels (``bt_temperature`` 3,
``label_noise`` 0.2). Sequence labels then starve DPO's credit assignment, so perfect token weights
win, while the process stays Markov. Its exact optimal reward-vs-KL frontier is
``tisdpo/eval/optimal_frontier.py``.

Parts, one job each (this package's modules)::

    config.py      SyntheticTaskConfig (the knobs) and the fingerprint that names the task's data
    vocabulary.py  the words (topics, prompt and response words) and the word-level tokenizer
    rewards.py     the TRUE reward and category of every response word per topic (and per context)
    process.py     the data-generating policy p0, its system-prefix tilts, sampling and log-probs
    prompts.py     prompt i of a split, system tokens, the topic of a prompt
    generated.py   the datasets it emits: SFT examples, preference pairs, contrastive pairs
    stats.py       the sampled category mix and the TIS-DPO premise statistics
    task.py        SyntheticTask: builds the parts from one config, in the order that defines the task
"""

from tisdpo.tasks.synthetic.config import SyntheticTaskConfig
from tisdpo.tasks.synthetic.rewards import CATEGORIES
from tisdpo.tasks.synthetic.task import SyntheticTask
from tisdpo.tasks.synthetic.vocabulary import SPECIAL_TOKENS, SYSTEM_TOKENS

__all__ = ["SyntheticTask", "SyntheticTaskConfig", "SPECIAL_TOKENS", "SYSTEM_TOKENS", "CATEGORIES"]
