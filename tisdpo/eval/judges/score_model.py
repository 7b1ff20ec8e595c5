"""Load a reward/cost model: safe-rlhf score models or any ``AutoModelForSequenceClassification``.

The TIS-DPO paper reads Harm and Help on PKU-SafeRLHF from PKU's own score models,
``PKU-Alignment/beaver-7b-v1.0-cost`` (a cost: lower is safer) and ``-reward`` (higher is more
helpful). Those checkpoints are in the safe-rlhf format (``safe_rlhf/models/score_model``):

- ``config.json``: a Llama config with ``architectures: ["LlamaForScore"]`` and the head's fields
  ``score_dim`` (outputs), ``bias`` (whether the head has one), ``score_type`` (reward/cost/critic),
  ``do_normalize`` (+ ``normalizer_type``, ``mean``, ``var``);
- weights: the backbone under ``model.*`` (as in ``LlamaForCausalLM``) plus ``score_head.weight``
  (and ``score_head.bias``), optionally ``normalizer.mean``/``normalizer.var``/``normalizer.count``;
- the score of a sequence is the head applied to the last hidden state at the last attended token.

Transformers has no ``LlamaForScore`` class, and running the repository's code would need
``trust_remote_code``; instead the backbone is the plain ``AutoModel`` of the config (the
``model.`` prefix is the base-model prefix Transformers strips when loading a base model from a
checkpoint with a head) and the head is a ``torch.nn.Linear`` filled from the checkpoint's tensors.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.utils import cached_file

# safe-rlhf names its classes <Backbone>ForScore (LlamaForScore, GPT2ForScore, ...).
_SCORE_SUFFIX = "ForScore"
_HEAD_PREFIXES = ("score_head.", "normalizer.")
_SAFETENSORS = ("model.safetensors.index.json", "model.safetensors")
_TORCH_BIN = ("pytorch_model.bin.index.json", "pytorch_model.bin")
# How safe-rlhf normalises each score type when do_normalize is on (Normalizer.normalize).
_NORMALIZE_FUNCTION = {"reward": "affine", "cost": "scale", "critic": "identity"}


def is_safe_rlhf_score_config(config) -> bool:
    """True for a safe-rlhf score model (``*ForScore`` architecture, or the head's ``score_dim``)."""
    architectures = getattr(config, "architectures", None) or []
    return any(str(a).endswith(_SCORE_SUFFIX) for a in architectures) or hasattr(config, "score_dim")


def _resolve(path: str, filename: str) -> str | None:
    """A checkpoint file from a local dir or the hub cache; None when the checkpoint has none."""
    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def read_head_tensors(path: str, option: str = "model_name_or_path") -> dict[str, torch.Tensor]:
    """The ``score_head.*`` and ``normalizer.*`` tensors of a checkpoint (safetensors or .bin,
    one file or sharded), read without loading the backbone's weights a second time."""
    for names, is_safetensors in ((_SAFETENSORS, True), (_TORCH_BIN, False)):
        index_name, single_name = names
        index = _resolve(path, index_name)
        if index:
            weight_map = json.loads(open(index, encoding="utf-8").read())["weight_map"]
            shards = sorted({f for k, f in weight_map.items() if k.startswith(_HEAD_PREFIXES)})
            files = [_resolve(path, shard) for shard in shards]
        else:
            single = _resolve(path, single_name)
            files = [single] if single else []
        if not files and not index:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            if file is None:
                raise FileNotFoundError(f"{option}={path!r}: a shard named in {index_name} is missing")
            if is_safetensors:
                with safe_open(file, framework="pt") as handle:
                    for key in handle.keys():
                        if key.startswith(_HEAD_PREFIXES):
                            tensors[key] = handle.get_tensor(key)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
                tensors.update({k: v for k, v in state.items() if k.startswith(_HEAD_PREFIXES)})
        return tensors
    raise FileNotFoundError(f"{option}={path!r}: no model.safetensors or pytorch_model.bin (sharded or not)")


class SafeRLHFScoreModel(torch.nn.Module):
    """A safe-rlhf score model: backbone + linear ``score_head``, read at the last attended token.

    ``forward`` returns the end scores, shape [batch, score_dim], in float32 (normalised as
    safe-rlhf does when the checkpoint's ``do_normalize`` is on).
    """

    def __init__(self, backbone, score_head: torch.nn.Linear, normalize: str = "identity",
                 mean: torch.Tensor | None = None, var: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.score_head = score_head
        self.normalize = normalize
        self.register_buffer("mean", mean if mean is not None else torch.zeros(score_head.out_features))
        self.register_buffer("var", var if var is not None else torch.ones(score_head.out_features))

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # The last position whose mask is set: the last real token with right padding, the
        # final position with left padding (safe-rlhf: attention_mask.nonzero()[-1]).
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        end = (attention_mask.bool() * positions).argmax(dim=1)
        end_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), end]
        scores = self.score_head(end_hidden.to(self.score_head.weight.dtype)).float()
        eps = 1e-8  # safe-rlhf's Normalizer epsilon
        if self.normalize == "affine":
            scores = (scores - self.mean.float()) / (self.var.float().sqrt() + eps)
        elif self.normalize == "scale":
            scores = scores / (self.var.float().sqrt() + eps)
        elif self.normalize == "translate":
            scores = scores - self.mean.float()
        return scores


def load_safe_rlhf_score_model(path: str, config, dtype: torch.dtype | None = None,
                               option: str = "model_name_or_path") -> SafeRLHFScoreModel:
    """Backbone by ``AutoModel`` (weights under ``model.*``), head and normaliser from the checkpoint."""
    kwargs: dict[str, Any] = {"config": config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    backbone = AutoModel.from_pretrained(path, **kwargs)
    head_tensors = read_head_tensors(path, option)
    if "score_head.weight" not in head_tensors:
        raise ValueError(f"{option}={path!r}: a safe-rlhf score model needs 'score_head.weight' in its "
                         f"weights; found {sorted(head_tensors) or 'no head tensors'}")
    weight = head_tensors["score_head.weight"]
    score_dim = int(getattr(config, "score_dim", weight.shape[0]))
    has_bias = "score_head.bias" in head_tensors
    if bool(getattr(config, "bias", has_bias)) != has_bias:
        raise ValueError(f"{option}={path!r}: config says bias={getattr(config, 'bias')} but the weights "
                         f"{'have' if has_bias else 'lack'} score_head.bias")
    if tuple(weight.shape) != (score_dim, config.hidden_size):
        raise ValueError(f"{option}={path!r}: score_head.weight has shape {tuple(weight.shape)}, expected "
                         f"({score_dim}, {config.hidden_size}) from score_dim and hidden_size")
    head = torch.nn.Linear(config.hidden_size, score_dim, bias=has_bias, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if has_bias:
            head.bias.copy_(head_tensors["score_head.bias"])
    normalize, mean, var = "identity", None, None
    if getattr(config, "do_normalize", False):
        score_type = getattr(config, "score_type", "reward")
        normalize = _NORMALIZE_FUNCTION.get(score_type, "identity")
        mean = head_tensors.get("normalizer.mean")
        var = head_tensors.get("normalizer.var")
        if mean is None and getattr(config, "mean", None) is not None:
            mean = torch.tensor(config.mean, dtype=torch.float32).reshape(score_dim)
        if var is None and getattr(config, "var", None) is not None:
            var = torch.tensor(config.var, dtype=torch.float32).reshape(score_dim)
        if normalize != "identity" and var is None:
            raise ValueError(f"{option}={path!r}: do_normalize is on but neither normalizer.var nor config.var is set")
    model = SafeRLHFScoreModel(backbone, head, normalize, mean, var)
    if dtype is not None:
        model.score_head.to(dtype)
    return model


class SequenceClassifierScores(torch.nn.Module):
    """An ``AutoModelForSequenceClassification`` seen as a score model: [batch, num_labels] floats."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def load_score_model(path: str, dtype: torch.dtype | None = None, pad_token_id: int | None = None,
                     option: str = "model_name_or_path") -> torch.nn.Module:
    """A module mapping (input_ids, attention_mask) to [batch, outputs] float scores, for either format."""
    config = AutoConfig.from_pretrained(path)
    if is_safe_rlhf_score_config(config):
        return load_safe_rlhf_score_model(path, config, dtype, option)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    if model.config.pad_token_id is None and pad_token_id is not None:
        # Sequence classifiers read the last non-pad token; they must know the pad id.
        model.config.pad_token_id = pad_token_id
    return SequenceClassifierScores(model)


def num_outputs(model: torch.nn.Module) -> int:
    if isinstance(model, SafeRLHFScoreModel):
        return int(model.score_head.out_features)
    return int(model.config.num_labels)
