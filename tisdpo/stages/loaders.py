"""Rows -> tokenised examples -> seeded, resumable DataLoaders.

:class:`ResumableDataLoader` makes the position in the data survive a restart: it saves (through
Lightning's stateful dataloader protocol) the shuffling generator's state at the start of the
current epoch and the number of batches already consumed; on resume it restores the generator, so
the epoch's permutation is the same, and skips the consumed batches (indices only: nothing is
collated). With the RNG callback (``callbacks.py``) a resumed run ends where an uninterrupted one does.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from tisdpo.data.collate import LengthGroupedSampler, PreferenceCollator, SFTCollator
from tisdpo.data.tokenize import tokenize_dataset, tokenize_sft_example

log = logging.getLogger(__name__)


def format_prompt(prompt: str, dataset_cfg: DictConfig) -> str:
    """The prompt as the model sees it: ``dataset.prompt_template`` (e.g. the released code's
    ``"\n\nHuman: {prompt}\n\nAssistant:"``) applied, or as given when the template is null."""
    template = dataset_cfg.get("prompt_template")
    return template.format(prompt=prompt) if template else prompt


def _formatted(rows: list[dict], dataset_cfg: DictConfig) -> list[dict]:
    if not dataset_cfg.get("prompt_template"):
        return rows
    return [{**row, "prompt": format_prompt(row["prompt"], dataset_cfg)} for row in rows]


def tokenize_pairs(rows: list[dict], tokenizer, dataset_cfg: DictConfig, what: str) -> tuple[list[dict], dict]:
    examples, drops = tokenize_dataset(
        _formatted(rows, dataset_cfg), tokenizer,
        max_length=int(dataset_cfg.max_length),
        max_prompt_length=int(dataset_cfg.max_prompt_length),
        truncation_mode=str(dataset_cfg.truncation_mode),
        use_chat_template=bool(dataset_cfg.get("chat_template", False)),
    )
    log.info("tokenise %s: %s", what, drops.summary())
    return examples, drops.as_dict()


def tokenize_sft(rows: list[dict], tokenizer, dataset_cfg: DictConfig, max_length: int) -> list[dict]:
    examples = []
    for index, row in enumerate(_formatted(rows, dataset_cfg)):
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


def length_grouped(loader: "ResumableDataLoader", batch_size: int, seed: int) -> "ResumableDataLoader":
    """The same loader with a LengthGroupedSampler: batches of similar lengths, less padding."""
    examples = loader.dataset
    return ResumableDataLoader(
        examples, batch_size=batch_size, sampler=LengthGroupedSampler.for_pairs(examples, batch_size, seed=seed),
        collate_fn=loader.collate_fn, num_workers=loader.num_workers, drop_last=loader.drop_last,
    )


# ---------------------------------------------------------------------------------------
# a DataLoader whose position survives a restart
# ---------------------------------------------------------------------------------------
class _SkipFirst:
    """An index sampler whose first iteration that is actually advanced skips ``skip`` batches.

    Lazy on purpose: a multi-worker DataLoader iterator calls ``iter()`` twice before it reads one
    index; the skip (and the shuffling draw behind it) belongs to the iteration that is used.
    Persistent-worker iterators re-iterate this object every epoch: later iterations are whole."""

    def __init__(self, base, skip: int):
        self.base, self.skip = base, skip

    def __iter__(self) -> Iterator:
        iterator = iter(self.base)
        if self.skip:
            skip, self.skip = self.skip, 0
            for _ in range(skip):
                if next(iterator, _END) is _END:
                    return
        yield from iterator

    def __len__(self) -> int:
        return len(self.base)


_END = object()


class _Counting:
    def __init__(self, iterator, owner: "ResumableDataLoader"):
        self._iterator, self._owner = iterator, owner

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._iterator)
        self._owner._consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position inside an epoch survives a restart.

    Lightning saves ``state_dict()`` in every checkpoint of a fit and calls ``load_state_dict`` before
    it iterates the loader on resume (``FitLoop._load_combined_loader_states``). Sized loaders are
    not prefetched by Lightning, so the batches this loader has handed out are exactly the batches
    trained on. Works with the default shuffling (``generator``) and with any sampler that is
    deterministic given ``set_epoch`` (e.g. ``LengthGroupedSampler``).
    """

    _consumed = 0  # batches handed out in the current epoch
    _skip = 0  # batches to skip on the next iteration (set by load_state_dict)
    _pending_skip = 0  # the skip, while the iterator is being created
    _epoch_start_state: torch.Tensor | None = None  # the shuffling generator's state when the epoch began

    def __init__(self, dataset, *args: Any, shuffle: bool | None = None, sampler=None, generator=None, **kwargs: Any):
        if shuffle and sampler is None and not args:
            # The permutation draws from its own generator: DataLoader also draws a worker base seed
            # from `generator` each time it creates an iterator, and how often it does so differs
            # between a resumed and an uninterrupted run (persistent workers).
            own = torch.Generator()
            own.set_state(generator.get_state() if generator is not None else torch.Generator().manual_seed(0).get_state())
            sampler, shuffle = torch.utils.data.RandomSampler(dataset, generator=own), None
        super().__init__(dataset, *args, shuffle=shuffle, sampler=sampler, generator=generator, **kwargs)

    @property
    def _shuffle_generator(self) -> torch.Generator | None:
        return getattr(self.sampler, "generator", None)

    @property
    def _index_sampler(self):
        base = super()._index_sampler
        return _SkipFirst(base, self._pending_skip) if self._pending_skip else base

    def __iter__(self):
        generator = self._shuffle_generator
        self._epoch_start_state = generator.get_state() if generator is not None else None
        self._consumed, self._pending_skip, self._skip = self._skip, self._skip, 0
        try:
            return _Counting(super().__iter__(), self)
        finally:
            self._pending_skip = 0

    def state_dict(self) -> dict[str, Any]:
        length = len(self)
        if self._consumed >= length:  # the epoch is over: the next one starts from the current state
            generator = self._shuffle_generator
            return {"generator_state": generator.get_state() if generator is not None else None, "consumed": 0,
                    "length": length}
        return {"generator_state": self._epoch_start_state, "consumed": self._consumed, "length": length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("length") != len(self):
            log.warning("resume: the training data has %s batches per epoch, the checkpoint %s; restarting the "
                        "epoch from its first batch (data order not exact)", len(self), state.get("length"))
            return
        if state.get("generator_state") is not None and self._shuffle_generator is not None:
            self._shuffle_generator.set_state(state["generator_state"])
        self._skip = int(state.get("consumed", 0))
        if self._skip:
            log.info("resume: skipping the %d batches of this epoch already trained on", self._skip)
