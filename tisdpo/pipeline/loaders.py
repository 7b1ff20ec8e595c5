"""Tokenised examples -> seeded DataLoaders, and Lightning Trainers from the `trainer` config."""
from __future__ import annotations

import logging
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tisdpo.data.collate import PreferenceCollator, SFTCollator
from tisdpo.data.tokenize import tokenize_dataset, tokenize_sft_example
from tisdpo.pipeline.resume import ResumableDataLoader

log = logging.getLogger(__name__)


def tokenize_pairs(rows: list[dict], tokenizer, dataset_cfg: DictConfig, what: str) -> tuple[list[dict], dict]:
    examples, drops = tokenize_dataset(
        rows, tokenizer,
        max_length=int(dataset_cfg.max_length),
        max_prompt_length=int(dataset_cfg.max_prompt_length),
        truncation_mode=str(dataset_cfg.truncation_mode),
        use_chat_template=bool(dataset_cfg.get("chat_template", False)),
    )
    log.info("tokenise %s: %s", what, drops.summary())
    return examples, drops.as_dict()


def tokenize_sft(rows: list[dict], tokenizer, dataset_cfg: DictConfig, max_length: int) -> list[dict]:
    examples = []
    for index, row in enumerate(rows):
        example = tokenize_sft_example(
            row["prompt"], row["response"], tokenizer, max_length=max_length,
            max_prompt_length=int(dataset_cfg.max_prompt_length),
            use_chat_template=bool(dataset_cfg.get("chat_template", False)),
        )
        if example is not None:
            example["index"] = index
            examples.append(example)
    return examples


def preference_loader(examples, tokenizer, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0,
                      pad_to_multiple_of: int | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    # Resumable: a checkpoint records the position in the epoch, so a resumed run sees the same batches.
    return ResumableDataLoader(
        examples, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
        collate_fn=PreferenceCollator(tokenizer.pad_token_id, pad_to_multiple_of=pad_to_multiple_of),
        drop_last=shuffle and len(examples) >= batch_size,
    )


def sft_loader(examples, tokenizer, batch_size: int, *, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return ResumableDataLoader(
        examples, batch_size=batch_size, shuffle=shuffle, generator=generator,
        collate_fn=SFTCollator(tokenizer.pad_token_id), drop_last=shuffle and len(examples) >= batch_size,
    )


def build_trainer(trainer_cfg: DictConfig, **overrides: Any):
    """A Lightning Trainer from the `trainer` group, with stage-specific overrides."""
    # Objects (loggers, callbacks) go in as call kwargs, not through the config tree.
    make_trainer = instantiate(trainer_cfg, _partial_=True, _convert_="all")
    return make_trainer(**overrides)
