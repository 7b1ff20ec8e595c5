"""SyntheticTask's outputs, pinned before the task was split into a package (tisdpo/tasks/synthetic/).

Every public method's output, for the default task and for each harder variant, is hashed; the
hashes were computed from the single-module implementation. Cached artifacts and committed results
are keyed by these outputs (the fingerprint names the cache entry, the pairs are the data), so a
refactor that changes one draw would silently invalidate them: this test fails instead.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

VARIANTS = {
    "default": {},
    "context": {"context_negators": 8, "negator_decisive_share": 0.8},
    "sparse": {"decisive_tokens": 2, "min_response_length": 8, "max_response_length": 20},
    "contrastive": {"contrastive_shift": 0.3, "label_noise": 0.2, "bigram_per_topic": True},
    "sizes": {"seed": 3, "n_topics": 3, "n_neutral": 12, "p_offtopic": 0.02},
}


def outputs(task) -> dict:
    """Every public method's output for one task (a few calls each, on fixed inputs)."""
    words = "w0 w1 t0_good0 harm0 w3 t1_harm1 q0 <pad> nope"
    tok = task.tokenizer()
    pairs = task.preference_pairs("train", n=40)
    return {
        "fingerprint": task.fingerprint(),
        "repr": repr(task),
        "vocab": task.vocab, "response_words": task.response_words, "topics": task.topics,
        "vocab_size": task.vocab_size, "max_sequence_length": task.max_sequence_length,
        "tiny_model_config": task.tiny_model_config(hidden_size=32),
        "pairs_train": pairs,
        "pairs_test": task.preference_pairs("test", n=20),
        "pairs_custom": task.preference_pairs("heldout", n=10),
        "sft": task.sft_examples(n=40),
        "contrastive": task.contrastive_pairs("train", n=20),
        "category_mix": [task.category_mix(s, n=100) for s in (None, "harmless", "harmful")],
        "premise": task.premise_stats(pairs),
        "reward_table": task.reward_table(),
        "token_rewards": [task.token_rewards(k, words) for k in range(task.config.n_topics)],
        "token_reward": [task.token_reward(f"<t{k}>", "w2") for k in range(task.config.n_topics)] + [task.token_reward("t0", "harm1")],
        "sequence_reward": task.sequence_reward(0, words.split()),
        "categories": [task.word_category(0, w) for w in words.split()],
        "is": [[task.is_harmful(0, w), task.is_good(0, w)] for w in words.split()],
        "logprob": [task.response_logprob(0, words, s) for s in (None, "harmless", "harmful")],
        "samples": [task.sample_response(1, s, rng=7) for s in (None, "harmless", "harmful")]
                   + [task.sample_response("<t0>", None, np.random.default_rng(3))],
        "prompts": task.prompts(5) + task.prompts(3, split="train", system="harmless"),
        "prompt_topic": [task.prompt_topic(i, "eval") for i in range(5)],
        "prompt_text": task.prompt_text(4, "harmful", "validation"),
        "contrastive_prompts": task.contrastive_prompts(task.prompt_text(0)),
        "topic_of": task.topic_of("<harmful> <t2> q1"), "system_of": task.system_of("<harmless> <t0> q1"),
        "with_system": task.with_system("<harmful> <t1> q0", None),
        "encode": tok(pairs[0]["prompt"] + " " + pairs[0]["chosen"]).input_ids,
        "tok": [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.padding_side, tok.model_max_length],
    }


# sha256[:16] of each output above, computed from the pre-split code (tisdpo/tasks/synthetic.py)
PINNED = {
    'context': {
        'categories': '33b16f3b935080de',
        'category_mix': 'e2979acdf5883629',
        'contrastive': '369cbe486368cb5a',
        'contrastive_prompts': 'b53ace121a843b66',
        'encode': 'c49d44715b0d6992',
        'fingerprint': '886bcdd118858e1a',
        'is': 'e7ca763f52b2edf3',
        'logprob': '446461e969ebaafe',
        'max_sequence_length': 'c2356069e9d1e79c',
        'pairs_custom': 'b77065f00b073965',
        'pairs_test': '759f14f045acb196',
        'pairs_train': 'd926d3e6a1ff95da',
        'premise': '39039248e9b2e6a5',
        'prompt_text': '7b6b97616c45e585',
        'prompt_topic': '5cf8af3a3ecc0f61',
        'prompts': 'ef5d010e39219609',
        'repr': '470ce677fffe2d67',
        'response_words': 'fa1232197de69428',
        'reward_table': '6dcfab07f95e1f7e',
        'samples': 'aed9e1b478c27074',
        'sequence_reward': '8efc0e7f51dcc85c',
        'sft': 'bf67b207a14c072d',
        'system_of': '492f3129461ba2fc',
        'tiny_model_config': '7f437ac8842c3227',
        'tok': 'ddb290961c0e9367',
        'token_reward': 'faa1fff91fd229c8',
        'token_rewards': 'bb20483cb6010367',
        'topic_of': 'd4735e3a265e16ee',
        'topics': 'fe7ffa34082571b6',
        'vocab': '6c491431b9cecc5e',
        'vocab_size': 'dbb1ded63bc70732',
        'with_system': '7ba0a0768c37c838',
    },
    'contrastive': {
        'categories': '33b16f3b935080de',
        'category_mix': '6c75887f44098b27',
        'contrastive': 'ac58f6292112d10d',
        'contrastive_prompts': 'b53ace121a843b66',
        'encode': '34c4be4b0363379e',
        'fingerprint': '198d52fd1709c401',
        'is': 'e7ca763f52b2edf3',
        'logprob': '2a5d6348fb6e4526',
        'max_sequence_length': 'c2356069e9d1e79c',
        'pairs_custom': '66e7f88d2608e74f',
        'pairs_test': 'eb3abfd139cbea56',
        'pairs_train': '0d90137684b02254',
        'premise': 'b8ab243394f35a60',
        'prompt_text': '7b6b97616c45e585',
        'prompt_topic': '5cf8af3a3ecc0f61',
        'prompts': 'ef5d010e39219609',
        'repr': '470ce677fffe2d67',
        'response_words': 'fa1232197de69428',
        'reward_table': '6dcfab07f95e1f7e',
        'samples': 'a7802e5e65066e83',
        'sequence_reward': '100b0d3e20012194',
        'sft': '06e14296acab25b7',
        'system_of': '492f3129461ba2fc',
        'tiny_model_config': '7f437ac8842c3227',
        'tok': 'ddb290961c0e9367',
        'token_reward': 'faa1fff91fd229c8',
        'token_rewards': '201bc247b40fdf8c',
        'topic_of': 'd4735e3a265e16ee',
        'topics': 'fe7ffa34082571b6',
        'vocab': '6c491431b9cecc5e',
        'vocab_size': 'dbb1ded63bc70732',
        'with_system': '7ba0a0768c37c838',
    },
    'default': {
        'categories': '33b16f3b935080de',
        'category_mix': '79fb2d6f12171af7',
        'contrastive': '4d65e7b95cafff4f',
        'contrastive_prompts': 'b53ace121a843b66',
        'encode': 'c49d44715b0d6992',
        'fingerprint': '81b5322ed460b726',
        'is': 'e7ca763f52b2edf3',
        'logprob': '2a5d6348fb6e4526',
        'max_sequence_length': 'c2356069e9d1e79c',
        'pairs_custom': '953fdcf4611ab009',
        'pairs_test': '98b7742ada7ba82f',
        'pairs_train': 'df1a20937133c986',
        'premise': '12f1cccc2102ea60',
        'prompt_text': '7b6b97616c45e585',
        'prompt_topic': '5cf8af3a3ecc0f61',
        'prompts': 'ef5d010e39219609',
        'repr': '470ce677fffe2d67',
        'response_words': 'fa1232197de69428',
        'reward_table': '6dcfab07f95e1f7e',
        'samples': 'e7391afd6b9b2782',
        'sequence_reward': '100b0d3e20012194',
        'sft': '98d546faca6f9ef9',
        'system_of': '492f3129461ba2fc',
        'tiny_model_config': '7f437ac8842c3227',
        'tok': 'ddb290961c0e9367',
        'token_reward': 'faa1fff91fd229c8',
        'token_rewards': '201bc247b40fdf8c',
        'topic_of': 'd4735e3a265e16ee',
        'topics': 'fe7ffa34082571b6',
        'vocab': '6c491431b9cecc5e',
        'vocab_size': 'dbb1ded63bc70732',
        'with_system': '7ba0a0768c37c838',
    },
    'sizes': {
        'categories': '33b16f3b935080de',
        'category_mix': '430e25b27896b8e3',
        'contrastive': '9e85ca2064b99c19',
        'contrastive_prompts': 'edae5eb86b031ea7',
        'encode': 'f5a6d7296f50ac93',
        'fingerprint': 'a154b1eda5270918',
        'is': 'e7ca763f52b2edf3',
        'logprob': '15c17117c3f4dfa6',
        'max_sequence_length': 'c2356069e9d1e79c',
        'pairs_custom': 'd28efd7ff0b4e14f',
        'pairs_test': 'e21ea6dfea297677',
        'pairs_train': '6740168e8ea91209',
        'premise': 'a71390c18e2a77a9',
        'prompt_text': 'ab9a855c68219d4f',
        'prompt_topic': '7630dd1541c4bae8',
        'prompts': '8956b79ef020e350',
        'repr': 'a92f43ad440b45f4',
        'response_words': 'b868b6efcd7254ed',
        'reward_table': '223257d5441b07f3',
        'samples': '883d51c9389a1d6a',
        'sequence_reward': '97ef2f8bb6b2c73a',
        'sft': '3c79c929377a974c',
        'system_of': '492f3129461ba2fc',
        'tiny_model_config': '80e241519479ef72',
        'tok': 'ddb290961c0e9367',
        'token_reward': '294ec0f8326bbb8e',
        'token_rewards': '4e09e604494dce39',
        'topic_of': 'd4735e3a265e16ee',
        'topics': '7f6762e446f3a3d2',
        'vocab': '8434e04e4b2ce2fb',
        'vocab_size': 'a21855da08cb102d',
        'with_system': '7ba0a0768c37c838',
    },
    'sparse': {
        'categories': '33b16f3b935080de',
        'category_mix': '22855d9898e2623b',
        'contrastive': '8628b121dfa63a84',
        'contrastive_prompts': 'b53ace121a843b66',
        'encode': '9de4451276745842',
        'fingerprint': 'e5fef1492931a5f9',
        'is': 'e7ca763f52b2edf3',
        'logprob': '2a5d6348fb6e4526',
        'max_sequence_length': '59e19706d51d39f6',
        'pairs_custom': '4b82c620598464b0',
        'pairs_test': 'e8120c377f81ece1',
        'pairs_train': 'b3ce6c17c4f384e7',
        'premise': 'bc193d51b3021523',
        'prompt_text': '7b6b97616c45e585',
        'prompt_topic': '5cf8af3a3ecc0f61',
        'prompts': 'ef5d010e39219609',
        'repr': '470ce677fffe2d67',
        'response_words': 'fa1232197de69428',
        'reward_table': '6dcfab07f95e1f7e',
        'samples': 'bc07a4fce6e84ac4',
        'sequence_reward': '100b0d3e20012194',
        'sft': '01e08880c7eb2ff5',
        'system_of': '492f3129461ba2fc',
        'tiny_model_config': '7f437ac8842c3227',
        'tok': '89b47aff955a763a',
        'token_reward': 'faa1fff91fd229c8',
        'token_rewards': '201bc247b40fdf8c',
        'topic_of': 'd4735e3a265e16ee',
        'topics': 'fe7ffa34082571b6',
        'vocab': '6c491431b9cecc5e',
        'vocab_size': 'dbb1ded63bc70732',
        'with_system': '7ba0a0768c37c838',
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_public_output_is_the_same_as_before_the_split(variant):
    task = SyntheticTask(SyntheticTaskConfig(**VARIANTS[variant]))
    got = {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16]
           for k, v in outputs(task).items()}
    changed = sorted(k for k in PINNED[variant] if got.get(k) != PINNED[variant][k])
    assert not changed, f"{variant}: these outputs changed: {changed}"
    assert set(got) == set(PINNED[variant])


def test_the_default_fingerprint_and_first_pair_read_as_before():
    """The same pin in plain values, so a failure shows what moved."""
    task = SyntheticTask()
    assert task.fingerprint() == "ae0edd83ede43f6c"
    assert SyntheticTask(context_negators=4).fingerprint() == "e372845b5c7b99ba"
    first, second = task.preference_pairs("train", n=2)
    assert (first["prompt"], first["chosen"], first["rejected"]) == (
        "<t3> q8 q9 q3 t3_q4", "w27 w38 w14 w30 w14 w11", "w4 w32 w27 t3_good1 w38 w14 w22")
    assert first["meta"]["chosen_reward"] == 0.06664949702874634 and first["meta"]["label_correct"] is False
    assert second["prompt"] == "<t4> q7 q7 t4_q3 q9" and second["meta"]["rejected_reward"] == -2.514377920808057
