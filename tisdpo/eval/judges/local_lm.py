"""A local causal LM used as a judge: greedy completion and log-probs of fixed continuations."""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import AutoModelForCausalLM

from .common import check_model_path, load_tokenizer, render_chat, resolve_device, resolve_dtype


class LocalCausalLM:
    """Lazily loaded ``AutoModelForCausalLM`` + tokenizer with the two operations judges need."""

    def __init__(self, model_name_or_path: str, device: str = "auto", dtype: str | None = None,
                 use_chat_template: bool | None = None, max_length: int = 4096,
                 option: str = "model_name_or_path"):
        self.model_name_or_path = model_name_or_path
        self.device = device
        self.dtype = dtype
        self.use_chat_template = use_chat_template
        self.max_length = int(max_length)
        self.option = option
        self._model = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        self.load()
        return self._tokenizer

    def load(self) -> "LocalCausalLM":
        if self._model is not None:
            return self
        path = check_model_path(self.model_name_or_path, self.option)
        # Left padding: generation continues every row from its own last token.
        self._tokenizer = load_tokenizer(path, self.option, padding_side="left")
        self._tokenizer.truncation_side = "left"
        kwargs = {}
        dtype = resolve_dtype(self.dtype, "dtype")
        if dtype is not None:
            kwargs["dtype"] = dtype
        self._device = resolve_device(self.device)
        self._model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(self._device).eval()
        return self

    def render(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """Prompt text for a conversation, ready for the assistant's turn."""
        self.load()
        return render_chat(self._tokenizer, messages, add_generation_prompt=True,
                           use_chat_template=self.use_chat_template)

    def generate(self, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 8,
                 add_special_tokens: bool = True) -> list[str]:
        """Greedy continuations of ``texts`` (new tokens only, special tokens dropped)."""
        self.load()
        tok = self._tokenizer
        outputs: list[str] = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length, add_special_tokens=add_special_tokens)
            enc = {k: v.to(self._device) for k, v in enc.items()}
            with torch.no_grad():
                out = self._model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tok.pad_token_id)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tok.batch_decode(new_tokens, skip_special_tokens=True))
        return outputs

    def continuation_logprobs(self, text: str, continuations: Sequence[str], *,
                              add_special_tokens: bool = True) -> list[float]:
        """Sum of log p(continuation tokens | text) for each continuation."""
        self.load()
        tok = self._tokenizer
        prefix = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        scores = []
        for continuation in continuations:
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
            ids = (prefix + cont)[-self.max_length:]
            n_cont = len(cont)
            input_ids = torch.tensor([ids], device=self._device)
            with torch.no_grad():
                logits = self._model(input_ids=input_ids).logits.float()
            logps = torch.log_softmax(logits[0, :-1], dim=-1)
            targets = input_ids[0, 1:]
            token_logps = logps.gather(-1, targets[:, None])[:, 0][-n_cont:]
            scores.append(float(token_logps.sum()))
        return scores


class LocalLMBackend:
    """Judge backend on a local causal LM.

    ``complete`` generates greedily (MT-Bench grading); ``option_logprobs`` scores fixed answers
    such as "A"/"B" (pairwise judging compares these instead of parsing free text). Without a
    chat template, the conversation is the messages joined by blank lines; option scoring then
    appends "Answer:" and scores " A"/" B" (with the space BPE tokenizers expect).
    """

    # One model in one process: threads would only queue on it.
    max_concurrency = 1

    def __init__(self, model_name_or_path: str, device: str = "auto", dtype: str | None = None,
                 max_new_tokens: int = 512, use_chat_template: bool | None = None,
                 max_length: int = 4096):
        self.model_name_or_path = model_name_or_path
        self.use_chat_template = use_chat_template
        self.lm = LocalCausalLM(model_name_or_path, device=device, dtype=dtype,
                                use_chat_template=use_chat_template, max_length=max_length)
        self.max_new_tokens = int(max_new_tokens)

    def identity(self) -> dict:
        """What decides this backend's answers (the judge cache's key)."""
        return {"backend": "local_lm", "model": str(self.model_name_or_path),
                "use_chat_template": self.use_chat_template, "max_length": self.lm.max_length}

    def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        text, templated = self.lm.render(messages)
        return self.lm.generate([text], max_new_tokens=max_tokens or self.max_new_tokens,
                                batch_size=1, add_special_tokens=not templated)[0]

    def option_logprobs(self, messages: list[dict[str, str]], options: Sequence[str]) -> list[float]:
        text, templated = self.lm.render(messages)
        if not templated:
            text += "\n\nAnswer:"
        continuations = list(options) if templated else [" " + o for o in options]
        return self.lm.continuation_logprobs(text, continuations, add_special_tokens=not templated)
