"""Score (prompt, response) pairs with a reward or cost model -> ``eval/<name>``."""
from __future__ import annotations

from typing import Sequence

import torch

from .common import (JudgeResult, check_model_path, check_same_length, load_tokenizer, mean_or_nan,
                     render_chat, resolve_device, resolve_dtype, sanitize_name, std_or_nan)
from .score_model import load_score_model, num_outputs


class RewardModelJudge:
    """A reward or cost model as a judge; reports ``eval/<name>`` (mean), ``_std`` and ``_n``.

    Two checkpoint formats (``score_model.load_score_model``): safe-rlhf score models such as
    PKU's ``beaver-7b-v1.0-cost``/``-reward`` (the TIS-DPO paper's Harm and Help), and any
    ``AutoModelForSequenceClassification``. ``higher_is_better`` only documents the direction
    (false for a cost model); scores are reported as the model gives them.

    The text scored: ``template`` when given (placeholders ``{prompt}``, ``{response}``; PKU's
    models were trained on ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}``),
    else the tokenizer's chat template applied to [user: prompt, assistant: response] when it has
    one (``use_chat_template``: None = auto), else ``prompt + response``. ``append_eos`` adds the
    EOS token at the end (safe-rlhf trains its score models on texts ending with EOS, so the score
    is read there). Texts longer than ``max_length`` lose their start (``truncation_side='left'``)
    because the score is read at the last token. A model with several outputs needs ``label_index``.
    Batches are sorted by length and run on ``device``.
    """

    def __init__(self, model_name_or_path: str, batch_size: int = 8, max_length: int = 1024,
                 device: str = "auto", name: str = "help", dtype: str | None = None,
                 label_index: int | None = None, use_chat_template: bool | None = None,
                 truncation_side: str = "left", template: str | None = None, append_eos: bool = False,
                 higher_is_better: bool = True):
        if template is not None and ("{prompt}" not in template or "{response}" not in template):
            raise ValueError(f"template={template!r} must contain {{prompt}} and {{response}}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.model_name_or_path = model_name_or_path
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device
        self.name = sanitize_name(name, "name")
        self.dtype = dtype
        self.label_index = label_index
        self.use_chat_template = use_chat_template
        self.truncation_side = truncation_side
        self.template = template
        self.append_eos = bool(append_eos)
        self.higher_is_better = bool(higher_is_better)
        self._model = None
        self._tokenizer = None

    @property
    def metric_key(self) -> str:
        return f"eval/{self.name}"

    def load(self) -> "RewardModelJudge":
        if self._model is not None:
            return self
        path = check_model_path(self.model_name_or_path, "model_name_or_path")
        # Right padding: the score is read at the last real token.
        tokenizer = load_tokenizer(path, "model_name_or_path", padding_side="right")
        tokenizer.truncation_side = self.truncation_side
        model = load_score_model(path, resolve_dtype(self.dtype, "dtype"), tokenizer.pad_token_id)
        num_labels = num_outputs(model)
        if num_labels > 1 and self.label_index is None:
            raise ValueError(f"model_name_or_path={self.model_name_or_path!r} has {num_labels} outputs: "
                             "set label_index to the one that is the reward")
        if self.label_index is not None and not 0 <= self.label_index < num_labels:
            raise ValueError(f"label_index={self.label_index} is out of range for {num_labels} outputs")
        self._device = resolve_device(self.device)
        self._model = model.to(self._device).eval()
        self._tokenizer = tokenizer
        return self

    def format(self, prompt: str, response: str) -> tuple[str, bool]:
        """(text to score, whether it holds its special tokens already, as a chat template does)."""
        eos = (self._tokenizer.eos_token or "") if self.append_eos else ""
        if self.template is not None:
            return self.template.format(prompt=prompt, response=response) + eos, False
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text, templated = render_chat(self._tokenizer, messages, add_generation_prompt=False,
                                      use_chat_template=self.use_chat_template)
        if not templated:
            text = prompt + response
        return text + eos, templated

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One reward per pair, in input order (batches are formed by length, then restored)."""
        n = check_same_length("RewardModelJudge.score", prompts=prompts, responses=responses)
        self.load()
        texts = [self.format(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(n), key=lambda i: len(texts[i][0]))
        scores: list[float] = [0.0] * n
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self._tokenizer([texts[i][0] for i in idx], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt",
                                    # a chat template already holds its special tokens
                                    add_special_tokens=not texts[idx[0]][1])
            batch = {k: v.to(self._device) for k, v in batch.items()}
            with torch.no_grad():
                logits = self._model(batch["input_ids"], batch["attention_mask"])
            column = logits[:, self.label_index or 0]
            for i, value in zip(idx, column.tolist()):
                scores[i] = float(value)
        return scores

    def evaluate(self, prompts: Sequence[str], responses: Sequence[str]) -> JudgeResult:
        scores = self.score(prompts, responses)
        metrics = {self.metric_key: mean_or_nan(scores), f"{self.metric_key}_std": std_or_nan(scores),
                   f"{self.metric_key}_n": float(len(scores))}
        samples = [{"prompt": p, "response": r, self.name: s} for p, r, s in zip(prompts, responses, scores)]
        return JudgeResult(metrics, samples)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        return self.evaluate(prompts, responses).metrics
