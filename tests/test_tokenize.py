"""Tokenisation and collation: exact ids with a tiny word-level tokenizer (never skips),
and the GPT-2 BPE tokenizer from ../shared/data (skips when absent)."""
import math
from pathlib import Path

import pytest
import torch

from tisdpo.data import (IGNORE_INDEX, DataError, DropCounter, PreferenceCollator, SFTCollator,
                         load_preference_rows, tokenize_dataset, tokenize_example, tokenize_sft_example)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
WORDS = [f"w{i}" for i in range(40)]
PAD, UNK, BOS, EOS = range(4)


def word_tokenizer(bos=True, eos=True, chat_template=None):
    """Word-level tokenizer: "w7" -> id 11 (4 specials first); adds <bos> by default if ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>" if eos else None,
                                  pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def ids(*words):
    return [4 + int(w[1:]) for w in words]


def w(*numbers):
    return " ".join(f"w{n}" for n in numbers)


def example(prompt, chosen, rejected, **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": {"dataset": "toy", "row": 0}, **extra}


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# --------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------
def test_prompt_masking_bos_and_eos_exact(tok):
    out = tokenize_example(example(w(1, 2, 3), w(4, 5), w(6)), tok, index=7)
    prompt = [BOS] + ids("w1", "w2", "w3")
    assert out["prompt_input_ids"] == prompt
    assert out["chosen_input_ids"] == prompt + ids("w4", "w5") + [EOS]
    assert out["chosen_labels"] == [IGNORE_INDEX] * 4 + ids("w4", "w5") + [EOS]
    assert out["rejected_input_ids"] == prompt + ids("w6") + [EOS]
    assert out["rejected_labels"] == [IGNORE_INDEX] * 4 + ids("w6") + [EOS]
    assert out["index"] == 7 and "chosen_weights" not in out


def test_no_bos_when_tokenizer_does_not_add_one():
    out = tokenize_example(example(w(1), w(2), w(3)), word_tokenizer(bos=False), add_eos=False)
    assert out["chosen_input_ids"] == ids("w1", "w2") and out["chosen_labels"] == [IGNORE_INDEX] + ids("w2")
    assert out["index"] == 0  # from meta["row"] when not given


def test_keep_end_truncation_exact(tok):
    # prompt = BOS + 10 words (11), chosen 3+EOS, rejected 1+EOS: 15 > 8 -> prompt to 4, responses to 4
    ex = example(w(*range(10)), w(20, 21, 22), w(30))
    out = tokenize_example(ex, tok, max_length=8, max_prompt_length=4, truncation_mode="keep_end")
    assert out["prompt_input_ids"] == [BOS] + ids("w7", "w8", "w9")
    assert out["chosen_input_ids"] == [BOS] + ids("w7", "w8", "w9", "w20", "w21", "w22") + [EOS]
    assert out["rejected_input_ids"] == [BOS] + ids("w7", "w8", "w9", "w30") + [EOS]
    short = tokenize_example(ex, tok, max_length=7, max_prompt_length=4)  # response budget 3: EOS lost
    assert short["chosen_labels"] == [IGNORE_INDEX] * 4 + ids("w20", "w21", "w22")


def test_keep_start_truncation_exact(tok):
    ex = example(w(*range(10)), w(20, 21, 22, 23, 24, 25), w(30))
    out = tokenize_example(ex, tok, max_length=8, max_prompt_length=5, truncation_mode="keep_start")
    assert out["prompt_input_ids"] == [BOS] + ids("w0", "w1", "w2", "w3")
    assert out["chosen_input_ids"] == [BOS] + ids("w0", "w1", "w2", "w3", "w20", "w21", "w22")
    assert out["rejected_input_ids"] == [BOS] + ids("w0", "w1", "w2", "w3", "w30") + [EOS]


def test_no_truncation_when_it_fits(tok):
    ex = example(w(*range(10)), w(20), w(30))
    out = tokenize_example(ex, tok, max_length=13, max_prompt_length=2)
    assert len(out["prompt_input_ids"]) == 11 and len(out["chosen_input_ids"]) == 13


def test_fully_truncated_response_is_dropped_and_counted(tok):
    counter = DropCounter("toy", total=1)
    ex = example(w(*range(10)), w(20), w(30))
    assert tokenize_example(ex, tok, max_length=6, max_prompt_length=6, counter=counter, index=3) is None
    assert counter.dropped == {"response_fully_truncated": 1} and counter.examples == {"response_fully_truncated": [3]}
    with pytest.raises(DataError, match="toy row 3, field 'chosen': response_fully_truncated"):
        tokenize_example(ex, tok, max_length=6, max_prompt_length=6, counter=DropCounter("toy", strict=True), index=3)


def test_empty_response_without_eos_is_dropped(tok):
    counter = DropCounter("toy", total=1)
    assert tokenize_example(example(w(1), "", w(2)), tok, add_eos=False, counter=counter) is None
    assert counter.dropped == {"empty_response": 1}
    # with EOS the empty response is a one-token response (the loader drops empty strings earlier)
    assert tokenize_example(example(w(1), "", w(2)), tok)["chosen_labels"][-1] == EOS


def test_option_and_tokenizer_errors(tok):
    ex = example(w(1), w(2), w(3))
    with pytest.raises(ValueError, match="dataset.truncation_mode"):
        tokenize_example(ex, tok, truncation_mode="middle")
    with pytest.raises(ValueError, match="dataset.max_prompt_length"):
        tokenize_example(ex, tok, max_length=4, max_prompt_length=5)
    with pytest.raises(ValueError, match="dataset.max_length"):
        tokenize_example(ex, tok, max_length=0)
    with pytest.raises(ValueError, match="dataset.add_eos"):
        tokenize_example(ex, word_tokenizer(eos=False))
    with pytest.raises(DataError, match="toy row 2, field 'chosen': expected a string, got None"):
        tokenize_example({**ex, "chosen": None}, tok, index=2)


def test_chat_template(tok):
    with pytest.raises(ValueError, match="dataset.chat_template"):
        tokenize_example(example(w(1), w(2), w(3)), tok, use_chat_template=True)
    template = "{% for m in messages %}w39 {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} w38{% endif %}"
    chat = word_tokenizer(chat_template=template)
    out = tokenize_example(example(w(1, 2), w(3), w(4)), chat, use_chat_template=True)
    assert out["prompt_input_ids"] == ids("w39", "w1", "w2", "w38")  # the template's text, no extra BOS
    assert out["chosen_labels"] == [IGNORE_INDEX] * 4 + ids("w3") + [EOS]


# --------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------
def test_weights_aligned_with_input_ids(tok):
    ex = example(w(1, 2), w(3, 4), w(5), chosen_weights=[0.5, 2.0, 1.5], rejected_weights=[0.25, 3.0])
    out = tokenize_example(ex, tok)
    assert out["chosen_weights"] == [1.0, 1.0, 1.0, 0.5, 2.0, 1.5]
    assert out["rejected_weights"] == [1.0, 1.0, 1.0, 0.25, 3.0]
    assert len(out["chosen_weights"]) == len(out["chosen_input_ids"])


def test_weights_before_or_after_truncation(tok):
    # prompt BOS+2, chosen 4+EOS=5, max_length 6 -> chosen keeps 3 tokens
    base = example(w(1, 2), w(3, 4, 5, 6), w(7), rejected_weights=[1.0, 1.0])
    before = tokenize_example({**base, "chosen_weights": [0.1, 0.2, 0.3, 0.4, 0.5]}, tok, max_length=6, max_prompt_length=3)
    after = tokenize_example({**base, "chosen_weights": [0.1, 0.2, 0.3]}, tok, max_length=6, max_prompt_length=3)
    assert before["chosen_weights"] == after["chosen_weights"] == [1.0, 1.0, 1.0, 0.1, 0.2, 0.3]
    with pytest.raises(DataError) as err:
        tokenize_example({**base, "chosen_weights": [0.1, 0.2]}, tok, max_length=6, max_prompt_length=3, index=5)
    assert str(err.value).startswith("toy row 5, field 'chosen_weights': got 2 weights")
    assert "3 (after truncation) or 5 (before)" in str(err.value)


@pytest.mark.parametrize("bad", [[math.nan, 1.0], [math.inf, 1.0], [-0.5, 1.0], ["1", 1.0], [None, 1.0], "11", 3])
def test_bad_weight_values_raise(tok, bad):
    ex = example(w(1), w(2), w(3), chosen_weights=[1.0, 1.0], rejected_weights=bad)
    with pytest.raises(DataError, match="toy row 8, field 'rejected_weights'"):
        tokenize_example(ex, tok, index=8)


def test_weights_on_one_side_only_raise(tok):
    with pytest.raises(DataError, match="field 'rejected_weights': missing while chosen_weights is given"):
        tokenize_example(example(w(1), w(2), w(3), chosen_weights=[1.0, 1.0]), tok)


# --------------------------------------------------------------------------------------
# datasets, collators
# --------------------------------------------------------------------------------------
def test_tokenize_dataset_counts_and_indexes(tok):
    rows = [example(w(1), w(2), w(3)), example(w(*range(30)), w(2), w(3)), example(w(4), w(5, 6), w(7))]
    out, counter = tokenize_dataset(rows, tok, max_length=10, max_prompt_length=10)
    assert [o["index"] for o in out] == [0, 2]
    assert counter.summary() == "dropped 1 of 3 rows: 1 response_fully_truncated"
    loaded = DropCounter("toy", total=5)
    loaded.drop("identical_responses")
    out, same = tokenize_dataset(rows, tok, counter=loaded, max_length=10, max_prompt_length=10)
    assert same is loaded and loaded.summary() == "dropped 2 of 5 rows: 1 identical_responses, 1 response_fully_truncated"
    with pytest.raises(DataError, match="no rows left after filtering"):
        tokenize_dataset(rows[1:2], tok, max_length=10, max_prompt_length=10)


def test_preference_collator_padding(tok):
    rows = [
        example(w(1), w(2, 3, 4, 5), w(6), chosen_weights=[2.0] * 5, rejected_weights=[3.0] * 2),
        example(w(1, 2, 3), w(4), w(5, 6), chosen_weights=[2.0] * 2, rejected_weights=[3.0] * 3),
    ]
    examples, _ = tokenize_dataset(rows, tok)
    batch = PreferenceCollator(pad_token_id=PAD)(examples)
    T = 7  # longest of all chosen/rejected: BOS w1 + 4 + EOS
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_input_ids"].shape == batch[f"{side}_labels"].shape == (2, T)
        assert batch[f"{side}_attention_mask"].shape == batch[f"{side}_weights"].shape == (2, T)
        assert batch[f"{side}_weights"].dtype == torch.float32
    # responses right-padded
    assert batch["rejected_input_ids"][0].tolist() == [BOS] + ids("w1", "w6") + [EOS, PAD, PAD, PAD]
    assert batch["rejected_attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch["rejected_labels"][0].tolist() == [-100, -100] + ids("w6") + [EOS, -100, -100, -100]
    assert batch["rejected_weights"][0].tolist() == [1.0, 1.0, 3.0, 3.0, 0.0, 0.0, 0.0]
    # prompts left-padded
    assert batch["prompt_input_ids"].tolist() == [[PAD, PAD, BOS] + ids("w1"), [BOS] + ids("w1", "w2", "w3")]
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["index"].tolist() == [0, 1] and batch["index"].dtype == torch.long
    # one T for both sides: the module can concatenate them
    assert torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).shape == (4, T)
    padded = PreferenceCollator(PAD, pad_to_multiple_of=8)(examples)
    assert padded["chosen_input_ids"].shape == (2, 8) and padded["prompt_input_ids"].shape == (2, 8)
    with pytest.raises(DataError, match="batch row 1, field 'chosen_weights'"):
        PreferenceCollator(PAD)([examples[0], {k: v for k, v in examples[1].items() if "weights" not in k}])
    no_weights = PreferenceCollator(PAD)([{k: v for k, v in e.items() if "weights" not in k} for e in examples])
    assert "chosen_weights" not in no_weights
    with pytest.raises(ValueError, match="pad_token_id"):
        PreferenceCollator(None)


def test_sft_example_and_collator(tok):
    a = tokenize_sft_example(w(1, 2), w(3), tok, max_length=16, index=0)
    b = tokenize_sft_example(w(1), w(4, 5, 6), tok, max_length=16, max_prompt_length=64, index=1)
    assert a["input_ids"] == [BOS] + ids("w1", "w2", "w3") + [EOS]
    assert a["labels"] == [IGNORE_INDEX] * 3 + ids("w3") + [EOS]
    batch = SFTCollator(PAD)([a, b])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 6)
    assert batch["labels"][0].tolist() == [-100, -100, -100] + ids("w3") + [EOS, -100]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0] and batch["index"].tolist() == [0, 1]
    truncated = tokenize_sft_example(w(*range(10)), w(20, 21), tok, max_length=6)  # prompt capped at 3
    assert truncated["input_ids"] == [BOS] + ids("w8", "w9", "w20", "w21") + [EOS]
    counter = DropCounter("sft", total=1)
    assert tokenize_sft_example(w(1), "", tok, add_eos=False, counter=counter) is None
    assert counter.dropped == {"empty_response": 1}


# --------------------------------------------------------------------------------------
# GPT-2 BPE
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2():
    path = SHARED / "gpt2_tokenizer"
    if not path.exists():
        pytest.skip(f"{path} not available")
    from transformers import GPT2TokenizerFast
    return GPT2TokenizerFast.from_pretrained(str(path))


def test_gpt2_exact(gpt2):
    out = tokenize_example(example("Hello world", " Hi", " Bye"), gpt2)
    assert out["prompt_input_ids"] == [15496, 995]  # GPT-2 adds no BOS
    assert out["chosen_input_ids"] == [15496, 995] + gpt2(" Hi")["input_ids"] + [50256]
    assert out["chosen_labels"][:2] == [-100, -100] and out["chosen_labels"][-1] == gpt2.eos_token_id
    long_prompt = " ".join(["one two three"] * 20)
    body = gpt2(long_prompt)["input_ids"]
    end = tokenize_example(example(long_prompt, " Hi", " Bye"), gpt2, max_length=16, max_prompt_length=8)
    start = tokenize_example(example(long_prompt, " Hi", " Bye"), gpt2, max_length=16, max_prompt_length=8,
                             truncation_mode="keep_start")
    assert end["prompt_input_ids"] == body[-8:] and start["prompt_input_ids"] == body[:8]


def test_gpt2_on_real_pku_rows(gpt2):
    path = SHARED / "pku_saferlhf_safer_pairs_5k.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    rows, report = load_preference_rows("pku_saferlhf", path=path, limit=64)
    examples, report = tokenize_dataset(rows, gpt2, counter=report, max_length=128, max_prompt_length=64)
    assert len(examples) == 64 and report.n_dropped == 0
    for ex in examples:
        n = len(ex["prompt_input_ids"])
        for side in ("chosen", "rejected"):
            assert len(ex[f"{side}_input_ids"]) <= 128 and n <= 128
            assert ex[f"{side}_input_ids"][:n] == ex["prompt_input_ids"]
            assert ex[f"{side}_labels"][:n] == [-100] * n and -100 not in ex[f"{side}_labels"][n:]
    batch = PreferenceCollator(gpt2.eos_token_id)(examples[:8])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_input_ids"].shape[1] <= 128
