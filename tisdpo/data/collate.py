"""Collators: lists of tokenised examples -> batches of tensors.

Preference batch (B examples, T = longest chosen/rejected sequence, P = longest prompt)::

    chosen_input_ids, rejected_input_ids            [B, T] long   right-padded with pad_token_id
    chosen_attention_mask, rejected_attention_mask  [B, T] long   1 on tokens, 0 on padding
    chosen_labels, rejected_labels                  [B, T] long   -100 on prompt and padding
    chosen_weights, rejected_weights                [B, T] float  only if every example has them;
                                                                  1.0 on prompt, 0.0 on padding
    chosen_reference_logps, rejected_reference_logps [B, T-1] float only if every example has them
                                                                  (cached reference log-probs, shifted
                                                                  like the labels); 0.0 on padding
    reference_hidden                                [R, H] float  only if every example has them (validation
                                                                  with train.validation=heldout): the cached
                                                                  reference's last hidden states at the R
                                                                  response positions, chosen rows then rejected
    prompt_input_ids, prompt_attention_mask         [B, P] long   LEFT-padded (for generation)
    index                                           [B]    long

Chosen and rejected share one T so a module can ``torch.cat`` them into one [2B, T]
forward pass. Weight padding is 0.0 so that an unmasked weighted sum still ignores
padding; prompt positions carry 1.0 (they are masked by the labels anyway).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tisdpo.constants import IGNORE_INDEX, SIDES

from .errors import DataError

__all__ = ["LengthGroupedSampler", "PreferenceCollator", "SFTCollator", "concat_pair", "pad_sequences",
           "prompt_response_batch"]

WEIGHT_PAD = 0.0


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


def pad_sequences(
    sequences: Sequence[Sequence[float]],
    length: int,
    value: float,
    *,
    left: bool = False,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """Stack variable-length lists into ``[len(sequences), length]``, padding with ``value``."""
    out = torch.full((len(sequences), length), value, dtype=dtype)
    for i, seq in enumerate(sequences):
        n = len(seq)
        if n > length:
            raise ValueError(f"pad_sequences: sequence {i} has {n} items, more than length {length}")
        if n:
            row = torch.as_tensor(list(seq), dtype=dtype)
            if left:
                out[i, length - n:] = row
            else:
                out[i, :n] = row
    return out


def concat_pair(batch: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """[B, ...] chosen and rejected tensors stacked into [2B, ...], chosen first: one forward for both."""
    return torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], dim=0)


def prompt_response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
                          device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) [N, T] of prompt_i + response_i, right-padded; labels are
    IGNORE_INDEX on the prompt and the padding (KTO's mismatched pairs, TI-DPO's anchors)."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    label_rows = [[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(map(len, sequences))
    ids = pad_sequences(sequences, width, pad_token_id).to(device)
    labels = pad_sequences(label_rows, width, IGNORE_INDEX).to(device)
    return ids, _mask(sequences, width).to(device), labels


def _mask(sequences: Sequence[Sequence[Any]], length: int, *, left: bool = False) -> torch.Tensor:
    return pad_sequences([[1] * len(s) for s in sequences], length, 0, left=left)


def _check_pad_id(pad_token_id: Any) -> int:
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(
            f"pad_token_id must be a non-negative integer, got {pad_token_id!r} "
            "(tokenizers without a pad token, like GPT-2, usually pad with eos_token_id)"
        )
    return pad_token_id


class PreferenceCollator:
    """Batch tokenised preference examples (see the module docstring for keys and shapes)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = _check_pad_id(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PreferenceCollator: empty batch")
        sides = SIDES
        length = _round_up(
            max(len(ex[f"{s}_input_ids"]) for ex in examples for s in sides), self.pad_to_multiple_of
        )
        batch: dict[str, torch.Tensor] = {}
        for side in sides:
            ids = [ex[f"{side}_input_ids"] for ex in examples]
            batch[f"{side}_input_ids"] = pad_sequences(ids, length, self.pad_token_id)
            batch[f"{side}_attention_mask"] = _mask(ids, length)
            batch[f"{side}_labels"] = pad_sequences([ex[f"{side}_labels"] for ex in examples], length, IGNORE_INDEX)

        if _weights_present(examples):
            for side in sides:
                batch[f"{side}_weights"] = pad_sequences(
                    [ex[f"{side}_weights"] for ex in examples], length, WEIGHT_PAD, dtype=torch.float32
                )

        if _present(examples, "reference_logps"):  # cached reference log-probs, shifted like the labels
            for side in sides:
                batch[f"{side}_reference_logps"] = _pad_floats(
                    [ex[f"{side}_reference_logps"] for ex in examples], length - 1)

        if _present(examples, "reference_hidden"):  # the reference's hidden states at the response positions
            # row-major over the [2B, T] pair batch (chosen rows, then rejected rows): the order of
            # ``hidden[:, :-1][labels[:, 1:] != -100]`` of ``concat_pair(batch, ...)``
            batch["reference_hidden"] = torch.cat([ex[f"{side}_reference_hidden"] for side in sides for ex in examples])

        prompts = [ex["prompt_input_ids"] for ex in examples]
        prompt_length = _round_up(max(len(p) for p in prompts), self.pad_to_multiple_of)
        batch["prompt_input_ids"] = pad_sequences(prompts, prompt_length, self.pad_token_id, left=True)
        batch["prompt_attention_mask"] = _mask(prompts, prompt_length, left=True)
        batch["index"] = torch.tensor([int(ex.get("index", -1)) for ex in examples], dtype=torch.long)
        return batch


def _pad_floats(rows: Sequence[Any], length: int) -> torch.Tensor:
    """Right-pad 1-D float tensors (or lists) with 0.0 into a float32 [len(rows), length]."""
    out = torch.zeros(len(rows), length, dtype=torch.float32)
    for i, row in enumerate(rows):
        row = torch.as_tensor(row, dtype=torch.float32)
        if len(row) > length:
            raise ValueError(f"_pad_floats: row {i} has {len(row)} values, more than length {length}")
        out[i, : len(row)] = row
    return out


def _present(examples: Sequence[Mapping[str, Any]], key: str) -> bool:
    """True if every example has ``chosen_<key>`` and ``rejected_<key>``, False if none; a mix is a bug."""
    has = [ex.get(f"chosen_{key}") is not None and ex.get(f"rejected_{key}") is not None for ex in examples]
    if all(has):
        return True
    if any(has):
        missing = next(ex.get("index", i) for i, ex in enumerate(examples) if not has[i])
        raise DataError("batch", missing, f"chosen_{key}", f"some examples in the batch have {key} and this one not")
    return False


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in an order whose consecutive ``batch_size`` runs have similar lengths (less padding).

    Each epoch: a seeded permutation, cut into mega-batches of ``batch_size * mega``; each
    mega-batch sorted by length (longest first), cut into batches; the batches shuffled, with
    the longest one first (an out-of-memory error shows on the first step, not hours in).
    Deterministic given (seed, epoch); Lightning calls ``set_epoch`` and, under DDP, wraps it
    so that each rank takes every world_size-th index (neighbours, so still similar lengths).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50):
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.seed, self.mega, self.epoch = seed, max(1, int(mega)), 0

    @classmethod
    def for_pairs(cls, examples: Sequence[Mapping[str, Any]], batch_size: int, seed: int = 0, mega: int = 50):
        lengths = [max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"])) for ex in examples]
        return cls(lengths, batch_size, seed, mega)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), size):
            block = sorted(order[start: start + size], key=lambda i: -self.lengths[i])
            batches += [block[i: i + self.batch_size] for i in range(0, len(block), self.batch_size)]
        if not batches:
            return iter([])
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
        batches[0], batches[longest] = batches[longest], batches[0]
        rest = torch.randperm(len(batches) - 1, generator=generator).tolist()
        batches = [batches[0]] + [batches[1 + j] for j in rest]
        return iter([i for batch in batches for i in batch])


def _weights_present(examples: Sequence[Mapping[str, Any]]) -> bool:
    """True if every example has weights, False if none; a mix is a bug upstream."""
    has = [ex.get("chosen_weights") is not None and ex.get("rejected_weights") is not None for ex in examples]
    if all(has):
        return True
    if any(has):
        missing = next(ex.get("index", i) for i, ex in enumerate(examples) if not has[i])
        raise DataError("batch", missing, "chosen_weights", "some examples in the batch have weights and this one not")
    return False


class SFTCollator:
    """Batch SFT examples ``{"input_ids", "labels"[, "index"]}``: right-padded
    ``input_ids``/``attention_mask``/``labels`` [B, T] and ``index`` [B]."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = _check_pad_id(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("SFTCollator: empty batch")
        ids = [ex["input_ids"] for ex in examples]
        length = _round_up(max(len(s) for s in ids), self.pad_to_multiple_of)
        return {
            "input_ids": pad_sequences(ids, length, self.pad_token_id),
            "attention_mask": _mask(ids, length),
            "labels": pad_sequences([ex["labels"] for ex in examples], length, IGNORE_INDEX),
            "index": torch.tensor([int(ex.get("index", -1)) for ex in examples], dtype=torch.long),
        }
