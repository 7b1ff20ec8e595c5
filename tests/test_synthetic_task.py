"""The built-in synthetic task: determinism, tokenizer, rewards, labels, premise, prefixes."""

import numpy as np
import pytest

from tisdpo.tasks import SyntheticTask, SyntheticTaskConfig

SMALL = dict(n_sft=300, n_train_pairs=600, n_test_pairs=64)


@pytest.fixture(scope="module")
def task():
    return SyntheticTask(SyntheticTaskConfig(seed=0, **SMALL))


@pytest.fixture(scope="module")
def pairs(task):
    return task.preference_pairs("train")


def test_deterministic_from_seed(task, pairs):
    again = SyntheticTask(SyntheticTaskConfig(seed=0, **SMALL))
    assert again.preference_pairs("train") == pairs
    assert again.preference_pairs("test") == task.preference_pairs("test")
    assert again.sft_examples() == task.sft_examples()
    assert again.tokenizer().get_vocab() == task.tokenizer().get_vocab()
    assert again.reward_table() == task.reward_table()

    other = SyntheticTask(SyntheticTaskConfig(seed=1, **SMALL))
    assert other.preference_pairs("train") != pairs
    assert other.sft_examples() != task.sft_examples()
    assert other.reward_table() != task.reward_table()
    # train and test splits are different streams
    assert task.preference_pairs("test")[:10] != pairs[:10]


def test_config_from_dict_accepts_lists():
    t = SyntheticTask({"seed": 3, "good_reward_range": [1.0, 1.5], **SMALL})
    assert t.config.good_reward_range == (1.0, 1.5)
    with pytest.raises(TypeError):
        SyntheticTaskConfig.from_dict({"nope": 1})


def test_vocabulary_and_specials(task):
    tok = task.tokenizer()
    assert tok.pad_token == "<pad>" and tok.bos_token == "<bos>"
    assert tok.eos_token == "<eos>" and tok.unk_token == "<unk>"
    vocab = tok.get_vocab()
    assert len(vocab) == task.vocab_size == len(task.vocab)
    for w in ["<harmless>", "<harmful>", "<t0>", "w0", "t3_good1", "harm2", "t1_harm0", "q4", "t2_q1"]:
        assert w in vocab, w
    # no special tokens are added automatically
    assert tok("w1 w2")["input_ids"] == [vocab["w1"], vocab["w2"]]
    assert tok("w1 zzz")["input_ids"][1] == tok.unk_token_id


def test_tokenizer_roundtrip(task, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = task.tokenizer()
    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == tok.get_vocab()
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
            assert getattr(loaded, attr) == getattr(tok, attr)
        text = task.prompt_text(3, system="harmless") + " w1 t0_good0 harm1"
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        ids = tok(text)["input_ids"]
        assert loaded.decode(ids) == text


def test_word_i_is_token_i(task, pairs):
    tok = task.tokenizer()
    for r in pairs[:50]:
        for side in ("chosen", "rejected"):
            words = r[side].split()
            ids = tok(r[side])["input_ids"]
            assert len(ids) == len(words) == len(r["meta"][f"{side}_token_rewards"])
            assert tok.convert_ids_to_tokens(ids) == words
            assert tok.unk_token_id not in ids
        p_ids = tok(r["prompt"])["input_ids"]
        assert len(p_ids) == 1 + task.config.prompt_length


def test_reward_bookkeeping(task, pairs):
    for r in pairs:
        m = r["meta"]
        assert m["topic"] == task.topic_of(r["prompt"])
        for side in ("chosen", "rejected"):
            assert m[f"{side}_token_rewards"] == task.token_rewards(m["topic"], r[side])
            assert m[f"{side}_reward"] == pytest.approx(sum(m[f"{side}_token_rewards"]))
            assert m[f"{side}_reward"] == pytest.approx(task.sequence_reward(m["topic"], r[side]))
        c = task.config
        assert c.min_response_length <= len(r["chosen"].split()) <= c.max_response_length


def test_reward_design(task):
    c = task.config
    table = task.reward_table()
    # harmful / good / neutral ranges, topic dependence
    assert task.is_harmful(1, "t1_harm0") and not task.is_harmful(0, "t1_harm0")
    assert task.is_harmful(0, "harm0") and task.is_harmful(5, "harm0")
    assert task.is_good("<t2>", "t2_good3") and not task.is_good(0, "t2_good3")
    assert task.word_category(0, "t2_good3") == "offtopic"
    # gibberish (tokens outside the response vocabulary) costs invalid_token_reward
    for w in ("q1", "<t0>", "<pad>", "<unk>", "<harmless>", "blah"):
        assert task.word_category(0, w) == "invalid"
        assert task.token_reward(0, w) == c.invalid_token_reward < 0
    for k in range(c.n_topics):
        for w in task.response_words:
            r = task.token_reward(k, w)
            assert r == table[f"<t{k}>"][w]
            cat = task.word_category(k, w)
            if cat == "harmful":
                assert c.harmful_reward_range[0] <= r <= c.harmful_reward_range[1]
            elif cat == "good":
                assert c.good_reward_range[0] <= r <= c.good_reward_range[1]
            else:
                assert abs(r) <= c.neutral_reward_scale
    # neutral tokens get small DISTINCT rewards, so Spearman is not dominated by ties
    vals = [v for t in table.values() for v in t.values()]
    assert len(set(vals)) > 0.9 * len(vals)


def test_bradley_terry_labels_are_noisy_but_informative(task, pairs):
    agree = np.mean([r["meta"]["chosen_reward"] > r["meta"]["rejected_reward"] for r in pairs])
    assert 0.65 < agree < 0.99
    stats = task.premise_stats(pairs)
    assert stats["label_agreement"] == pytest.approx(agree)
    # label noise flips some
    noisy = SyntheticTask(SyntheticTaskConfig(seed=0, label_noise=0.5, **SMALL)).preference_pairs("train")
    agree_noisy = np.mean([r["meta"]["chosen_reward"] > r["meta"]["rejected_reward"] for r in noisy])
    assert abs(agree_noisy - 0.5) < 0.1


def test_tis_dpo_premise(task, pairs):
    stats = task.premise_stats(pairs)
    # chosen responses often contain harmful tokens, rejected ones good tokens
    assert stats["chosen_with_harmful"] > 0.3
    assert stats["rejected_with_good"] > 0.3
    assert 0 < stats["chosen_harmful_token_share"] < 0.2


def test_system_prefixes_shift_the_sft_mix(task):
    base = task.category_mix(None, n=400)
    good = task.category_mix("harmless", n=400)
    bad = task.category_mix("harmful", n=400)
    assert good["harmful_share"] < 0.5 * base["harmful_share"] < bad["harmful_share"]
    assert good["good_share"] > 1.5 * base["good_share"] > bad["good_share"]
    assert good["mean_reward"] > base["mean_reward"] > bad["mean_reward"]
    # the SFT examples carry prefixes, and their responses follow the shifted mix
    rows = task.sft_examples(600)
    by_sys = {None: [], "harmless": [], "harmful": []}
    for r in rows:
        k = task.topic_of(r["prompt"])
        by_sys[task.system_of(r["prompt"])].append(
            np.mean([task.is_harmful(k, w) for w in r["response"].split()])
        )
    assert all(len(v) > 30 for v in by_sys.values())
    assert np.mean(by_sys["harmless"]) < np.mean(by_sys[None]) < np.mean(by_sys["harmful"])


def test_oracle_prompt_estimator_recovers_rewards(task, pairs):
    """log p_harmless − log p_harmful of the true generator = 2λr + per-context constant."""
    from tisdpo.eval.weight_quality import weight_quality

    scores, rewards = [], []
    for r in pairs[:200]:
        k = r["meta"]["topic"]
        plus = task.response_logprob(k, r["chosen"], "harmless")
        minus = task.response_logprob(k, r["chosen"], "harmful")
        scores.append(list(np.subtract(plus, minus)))
        rewards.append(r["meta"]["chosen_token_rewards"])
    q = weight_quality(scores, rewards, prefix="oracle", side="chosen")
    assert q["oracle/spearman_chosen"] > 0.95
    assert q["oracle/auroc_chosen"] == 1.0


def test_prompts_and_system_tokens(task):
    p = task.prompt_text(5, split="test")
    words = p.split()
    assert words[0] in task.topics and len(words) == 1 + task.config.prompt_length
    assert task.prompt_text(5, split="test") == p
    plus, minus = task.contrastive_prompts(p)
    assert plus == "<harmless> " + p and minus == "<harmful> " + p
    assert task.contrastive_prompts(plus) == (plus, minus)
    assert task.with_system(minus, None) == p
    assert task.topic_of(minus) == task.topic_of(p) == task.prompt_topic(5, split="test")
    assert task.system_of(plus) == "harmless" and task.system_of(p) is None
    assert task.prompts(4, split="test")[0] == task.prompt_text(0, split="test")
    with pytest.raises(ValueError):
        task.with_system(p, "evil")


def test_tiny_model_config(task):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**task.tiny_model_config())
    tok = task.tokenizer()
    assert cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert cfg.max_position_embeddings >= task.max_sequence_length
    assert task.tiny_model_config(hidden_size=128)["hidden_size"] == 128
