"""Hypothesis fuzzing: whatever a row or example holds, the data layer answers with a
canonical example, a counted drop, or a DataError -- never another exception."""
import functools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tisdpo.data import ADAPTERS, DataError, DropCounter, SkipRow, adapt_rows, tokenize_example

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

HUGE = "w1 " * 20_000  # 60k characters: exercises truncation, not the tokenizer's speed

huge = st.builds(lambda: HUGE)  # builds(): keeps the 60k string out of failure reports
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\n\nAssistant:", "w1 w2"]), huge)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True), texts,
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def maybe(strategy):
    """Mostly the right kind of value, sometimes junk, so the fuzzer reaches deep paths."""
    return st.one_of(strategy, strategy, strategy, junk)


@st.composite
def mutated(draw, valid):
    """A well-formed row with 0-2 fields deleted or replaced by junk (often none)."""
    row = dict(draw(valid))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        if not row:
            break
        key = draw(st.sampled_from(sorted(row)))
        if draw(st.booleans()):
            del row[key]
        else:
            row[key] = draw(junk)
    return row


label = st.sampled_from([0, 1])
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": maybe(texts)})
messages = st.lists(maybe(message), min_size=1, max_size=3).map(
    lambda ms: ms + [{"role": "assistant", "content": "w1"}] if len(ms) == 1 else ms
)
HH = "\n\nHuman: hi\n\nAssistant:"

VALID = {
    "pku_saferlhf": st.one_of(
        st.fixed_dictionaries({
            "prompt": texts, "response_0": texts, "response_1": texts,
            "safer_response_id": label, "better_response_id": label,
            "is_response_0_safe": st.booleans(), "is_response_1_safe": st.booleans(),
            "response_0_harm_category": st.dictionaries(st.text(max_size=5), st.booleans(), max_size=3),
            "response_1_severity_level": st.integers(0, 3),
        }),
        st.fixed_dictionaries({"prompt": texts, "response": st.lists(maybe(texts), min_size=1, max_size=3)}),
    ),
    "ultrafeedback": st.fixed_dictionaries(
        {"prompt": texts, "chosen": st.one_of(texts, messages), "rejected": st.one_of(texts, messages)},
        optional={"score_chosen": st.floats(), "metadata": junk},
    ),
    "tldr": st.fixed_dictionaries({
        "info": mutated(st.fixed_dictionaries(
            {k: texts for k in ("post", "title", "subreddit")}, optional={"article": st.none() | texts}
        )),
        "summaries": st.one_of(
            st.lists(st.fixed_dictionaries({"text": texts}, optional={"policy": texts}), min_size=2, max_size=2),
            st.lists(maybe(st.fixed_dictionaries({"text": maybe(texts)})), max_size=3),
        ),
        "choice": label,
    }),
    "hh": st.fixed_dictionaries({"chosen": texts.map(lambda t: HH + t), "rejected": maybe(texts.map(lambda t: HH + t))}),
}
ROWS = {name: mutated(valid) for name, valid in VALID.items()}


def check_canonical(example):
    assert {"prompt", "chosen", "rejected"} <= set(example)
    assert all(isinstance(example[k], str) for k in ("prompt", "chosen", "rejected"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_adapters_raise_only_data_errors(name):
    @FUZZ
    @given(row=st.one_of(ROWS[name], ROWS[name], ROWS[name], junk))
    def run(row):
        try:
            example = ADAPTERS[name](row, index=11)
        except SkipRow:
            return  # counted by adapt_rows
        except DataError as err:
            assert str(err).startswith(f"{name} row 11")
            return
        check_canonical(example)
        examples, counter = adapt_rows(name, [row])
        assert counter.total == 1 and len(examples) + counter.n_dropped == 1

    run()


weights = st.one_of(
    st.none(),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=8),
    st.lists(st.floats(0.0, 5.0), min_size=1, max_size=8),
    junk,
)
words = st.lists(st.sampled_from(["w1", "w2", "w3", "zz", "!"]), max_size=12).map(" ".join)


@functools.lru_cache(maxsize=1)
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(10)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


@st.composite
def preference_examples(draw):
    """Canonical examples, half with weights (often of the right length), then mutated."""
    text = st.one_of(words, words, texts)
    example = {"prompt": draw(text), "chosen": draw(text), "rejected": draw(text)}
    if draw(st.booleans()):
        for side in ("chosen", "rejected"):
            n = len(word_tokenizer()(example[side], add_special_tokens=False)["input_ids"]) + 1  # + EOS
            right = st.lists(st.floats(0.0, 5.0), min_size=n, max_size=n) if n <= 64 else st.builds(lambda n=n: [1.0] * n)
            example[f"{side}_weights"] = draw(st.one_of(right, right, right, weights))
    if draw(st.booleans()):
        example["meta"] = draw(st.one_of(junk, st.fixed_dictionaries({"dataset": texts, "row": st.integers()})))
    return draw(mutated(st.just(example)))


def test_tokenize_example_raises_only_data_errors():
    tok = word_tokenizer()

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ex=st.one_of(preference_examples(), preference_examples(), preference_examples(), junk),
           max_length=st.integers(1, 24), ratio=st.floats(0.0, 1.0), mode=st.sampled_from(["keep_end", "keep_start"]))
    def run(ex, max_length, ratio, mode):
        max_prompt_length = max(1, math.floor(ratio * max_length))
        counter = DropCounter("fuzz", total=1)
        try:
            out = tokenize_example(ex, tok, max_length=max_length, max_prompt_length=max_prompt_length,
                                   truncation_mode=mode, index=4, counter=counter)
        except DataError as err:
            assert "row 4" in str(err)
            return
        if out is None:
            assert counter.n_dropped == 1
            return
        n = len(out["prompt_input_ids"])
        for side in ("chosen", "rejected"):
            seq, labels = out[f"{side}_input_ids"], out[f"{side}_labels"]
            assert n < len(seq) <= max_length and len(labels) == len(seq)
            assert seq[:n] == out["prompt_input_ids"] and labels[:n] == [-100] * n
            if f"{side}_weights" in out:
                ws = out[f"{side}_weights"]
                assert len(ws) == len(seq) and all(math.isfinite(x) and x >= 0 for x in ws)

    run()
