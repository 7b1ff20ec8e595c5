"""Issue 23, scope 3 and 6: prompt and response are never glued, dataset.chat_template=auto takes the
tokenizer's chat template, data_preview.txt shows the rows as the model sees them, a GPU-less
machine refuses trainer=gpu in one line, TI-DPO anchors keep their EOS when pad == EOS."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tisdpo.checks import ConfigError
from tisdpo.data.tokenize import joined_response, tokenize_example
from tisdpo.losses.tidpo_triplet import anchor_tokens
from tisdpo.runtime import validate
from tisdpo.stages.data import resolve_prompt_format
from tisdpo.stages.train import validated_last_step, write_data_preview


class CharTokenizer:
    """One token per character; EOS 1, pad 0; an optional chat template."""

    bos_token_id = None
    eos_token_id = 1
    pad_token_id = 0

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join("<eos>" if i == 1 else chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return f"<user>{messages[0]['content']}</user>\n<assistant>\n"


def test_response_is_never_glued_to_the_prompt():
    assert joined_response("how to cook t-bone in the oven", "To cook") == " To cook"
    assert joined_response("\n\nHuman: hi\n\nAssistant:", " I'm sorry") == " I'm sorry"  # hh brings its space
    assert joined_response("<assistant>\n", "Sure") == "Sure"  # a chat template ends in a newline
    ex = tokenize_example({"prompt": "in the oven", "chosen": "To cook", "rejected": "No"}, CharTokenizer(),
                          max_length=64, max_prompt_length=32)
    n = len(ex["prompt_input_ids"])
    assert CharTokenizer().decode(ex["chosen_input_ids"][n:]) == " To cook<eos>"


def _cfg(chat_template, prompt_template=None, is_sft=True):
    return OmegaConf.create({"dataset": {"chat_template": chat_template, "prompt_template": prompt_template},
                             "model": {"is_sft": is_sft}})


def test_chat_template_auto_follows_the_tokenizer():
    cfg = _cfg("auto")
    resolve_prompt_format(cfg, CharTokenizer(chat_template="{{ x }}"))
    assert cfg.dataset.chat_template is True
    cfg = _cfg("auto")
    resolve_prompt_format(cfg, CharTokenizer())
    assert cfg.dataset.chat_template is False
    # a chat model at paper scale: its template, not "Human:" inside it
    cfg = _cfg("auto", "\n\nHuman: {prompt}\n\nAssistant:", is_sft=True)
    resolve_prompt_format(cfg, CharTokenizer(chat_template="{{ x }}"))
    assert cfg.dataset.chat_template is True and cfg.dataset.prompt_template is None
    # a base model at paper scale keeps the released code's template
    cfg = _cfg("auto", "\n\nHuman: {prompt}\n\nAssistant:", is_sft=False)
    resolve_prompt_format(cfg, CharTokenizer(chat_template="{{ x }}"))
    assert cfg.dataset.chat_template is False and cfg.dataset.prompt_template.startswith("\n\nHuman:")
    cfg = _cfg(False)
    resolve_prompt_format(cfg, CharTokenizer(chat_template="{{ x }}"))
    assert cfg.dataset.chat_template is False
    with pytest.raises(ValueError, match="dataset.chat_template"):
        resolve_prompt_format(_cfg("yes"), CharTokenizer())


def test_data_preview_marks_the_boundary(tmp_path):
    tok = CharTokenizer(chat_template="{{ x }}")
    examples = [tokenize_example({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}, tok, max_length=64,
                                 max_prompt_length=48, use_chat_template=True, index=i) for i in range(5)]
    write_data_preview(tmp_path / "data_preview.txt", examples, tok)
    text = (tmp_path / "data_preview.txt").read_text()
    assert text.count("=== training row") == 3
    assert "<user>q0</user>\n<assistant>\n\u27e6PROMPT|RESPONSE\u27e7good<eos>" in text


def test_final_validation_is_not_repeated():
    assert validated_last_step(50, 150) and validated_last_step(200, 6)
    assert not validated_last_step(40, 150) and not validated_last_step(0, 150)


def test_gpu_run_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(validate, "gpu_present", lambda: False)
    cfg = OmegaConf.create({"trainer": {"accelerator": "gpu"}, "scale": "paper"})
    with pytest.raises(ConfigError, match="no GPU: use trainer=cpu"):
        validate.check_devices(cfg)
    validate.check_devices(OmegaConf.create({"trainer": {"accelerator": "cpu"}}))
    monkeypatch.setattr(validate, "gpu_present", lambda: True)
    validate.check_devices(cfg)


def test_anchor_keeps_its_eos_when_pad_is_eos():
    eos = pad = 2
    assert anchor_tokens([5, 6, eos, eos, eos], eos, pad) == [5, 6, eos]
    assert anchor_tokens([5, 6, 7], eos, pad) == [5, 6, 7]
    assert anchor_tokens([eos, eos], eos, pad) == [eos]
