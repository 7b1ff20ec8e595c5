"""Preference data: a file or hub split (sources, formats) -> canonical examples (schemas) -> token ids -> batches.

    rows, report = load_preference_rows("pku_saferlhf", path="pairs.json")
    rows, n = flip_labels(rows, 0.2, seed=0)                       # optional label noise
    examples, report = tokenize_dataset(rows, tokenizer, counter=report, max_length=512)
    batch = PreferenceCollator(pad_token_id)(examples[:8])
    print(report.summary())                                        # dropped X of N rows: ...
"""

from .collate import PreferenceCollator, SFTCollator, pad_sequences
from .dedupe import drop_duplicate_pairs, holdout_split
from .errors import DataError, DropCounter, SkipRow
from .noise import flip_labels
from .schemas import ADAPTERS, adapt_rows, content_problem, hh, pku_saferlhf, tldr, ultrafeedback
from .sources import HUB_DEFAULTS, HubSource, load_preference_rows, read_raw_rows
from .tokenize import IGNORE_INDEX, TRUNCATION_MODES, tokenize_dataset, tokenize_example, tokenize_sft_example

__all__ = [
    "ADAPTERS",
    "HUB_DEFAULTS",
    "IGNORE_INDEX",
    "TRUNCATION_MODES",
    "DataError",
    "DropCounter",
    "HubSource",
    "PreferenceCollator",
    "SFTCollator",
    "SkipRow",
    "adapt_rows",
    "content_problem",
    "drop_duplicate_pairs",
    "flip_labels",
    "hh",
    "holdout_split",
    "load_preference_rows",
    "pad_sequences",
    "pku_saferlhf",
    "read_raw_rows",
    "tldr",
    "tokenize_dataset",
    "tokenize_example",
    "tokenize_sft_example",
    "ultrafeedback",
]
