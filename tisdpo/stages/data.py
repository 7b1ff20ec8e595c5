"""Data stage: canonical rows for train/test/SFT and the tokenizer, from the `dataset` config."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from tisdpo.data.sources import load_preference_rows
from tisdpo.data.dedupe import drop_duplicate_pairs, drop_test_prompts, holdout_split, top_up_holdout
from tisdpo.data.errors import DropCounter
from tisdpo.data.noise import flip_labels
from tisdpo.models.loading import load_tokenizer
from tisdpo.runtime.validate import check_devices
from tisdpo.stages.start_models import materialise_model
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: Any
    train_rows: list[dict]
    test_rows: list[dict]
    sft_rows: list[dict]  # {"prompt", "response"}
    task: Any = None  # the SyntheticTask on the built-in task, else None
    drops: dict[str, Any] = field(default_factory=dict)
    n_flipped: int = 0

    @property
    def fingerprint(self) -> str:
        """Hash of the training data content (not its source): the cache key of anything trained on it."""
        return rows_fingerprint(self.train_rows)


def rows_fingerprint(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["prompt"], row.get("chosen"), row.get("rejected"), row.get("response")]).encode())
    return digest.hexdigest()[:16]


def _task_from_cfg(dataset_cfg: DictConfig) -> SyntheticTask:
    overrides = OmegaConf.to_container(dataset_cfg.get("task") or {}, resolve=True)
    known = set(SyntheticTaskConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"dataset.task has unknown option(s) {unknown}; valid: {sorted(known)}")
    return SyntheticTask(SyntheticTaskConfig(**overrides))


def resolve_prompt_format(cfg: DictConfig, tokenizer) -> None:
    """``dataset.chat_template=null`` (auto; the real datasets' default; ``auto`` too) -> true or false, once, for every
    stage: the tokenizer's chat template when it has one, at every scale; but a base model
    (``model.is_sft=false``) given ``dataset.prompt_template`` (the paper-scale configs: the released
    code's ``"\n\nHuman: {prompt}\n\nAssistant:"``) keeps that template. With the chat template the
    prompt template is dropped (a chat model never sees "Human:" inside its own template)."""
    ds = cfg.dataset
    setting = ds.get("chat_template", False)
    if setting in (True, False):
        return
    if setting not in (None, "auto"):
        raise ValueError(f"dataset.chat_template={setting!r} must be null (auto), auto, true or false")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    base_with_template = bool(ds.get("prompt_template")) and not cfg.model.get("is_sft", False)
    use = has_template and not base_with_template
    with open_dict(ds):
        ds.chat_template = use
        if use and ds.get("prompt_template"):
            ds.prompt_template = None
    log.info("data: prompt format: %s", "the tokenizer's chat template" if use else
             f"dataset.prompt_template {ds.get('prompt_template')!r}" if ds.get("prompt_template") else "the prompt as given")


def split_rows(ds: DictConfig, *, seed: int) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """A real dataset's (train rows, test rows, drop counts) from ``dataset`` (no tokenizer, no model):
    the files or hub splits read and adapted, exact duplicate pairs dropped, the held-out split made,
    ``dataset.limit`` applied to the training rows. Counts -> results.json ``data/source/...``."""
    common = {k: ds[k] for k in ("preference",) if k in ds}
    test_path = ds.get("test_path")
    one_file = bool(ds.get("path")) and not test_path
    # dataset.min_test_pairs (scale=small): at least this many held-out pairs; a test file with fewer
    # is topped up from the END of the training file, so the training file is read whole and
    # dataset.limit applies to what stays in training (its head), never to the held-out rows
    # dataset.disjoint_prompts (scale=small): no training pair shares a prompt with a held-out pair.
    # Either reads the training rows whole and applies dataset.limit last.
    min_test = int(ds.get("min_test_pairs") or 0)
    whole = one_file or bool(min_test) or bool(ds.get("disjoint_prompts"))
    train_rows, train_drops = load_preference_rows(
        ds.name, path=ds.get("path"), hub_id=ds.hub_id, hub_config=ds.get("hub_config"),
        split=ds.train_split, limit=None if whole else ds.get("limit"), seed=seed,
        option="dataset.path", **common,
    )
    if one_file:
        # One local file and no test file: drop duplicate pairs first (no copy of a training
        # pair is held out), then hold out the last rows of the WHOLE file for validation, and
        # only then apply dataset.limit to the training rows: a limited run keeps its full
        # test split (up to dataset.test_limit), never a tenth of the limited sample.
        train_rows, _, dedupe = drop_duplicate_pairs(train_rows, [], dataset=ds.name)
        train_rows, test_rows = holdout_split(train_rows, ds.get("test_limit"), dataset=ds.name,
                                              source=f"dataset.path {str(ds.path)!r}", minimum=min_test)
        test_drops = DropCounter()
    else:
        test_rows, test_drops = load_preference_rows(
            ds.name, path=test_path, hub_id=ds.hub_id, hub_config=ds.get("hub_config"),
            split=ds.test_split, limit=ds.get("test_limit"), seed=seed, option="dataset.test_path", **common,
        )
        train_rows, test_rows, dedupe = drop_duplicate_pairs(train_rows, test_rows, dataset=ds.name)
        if min_test:
            n_test_file = len(test_rows)
            train_rows, test_rows, moved = top_up_holdout(train_rows, test_rows, min_test)
            dedupe["test_from_train"] = moved
            if moved:
                log.info("data: the test split has %d usable pairs, below dataset.min_test_pairs=%d: the last %d "
                         "training rows are held out with it", n_test_file, min_test, moved)
    if ds.get("disjoint_prompts"):
        # no held-out prompt is trained on, with any responses (before the limit: it still gets its rows)
        train_rows, dedupe["train_prompt_in_test"] = drop_test_prompts(train_rows, test_rows)
        if dedupe["train_prompt_in_test"]:
            log.info("data: dropped %d training pairs whose prompt is a held-out prompt (dataset.disjoint_prompts)",
                     dedupe["train_prompt_in_test"])
    if whole and ds.get("limit") is not None:
        # the training rows of a split made on the whole file(s): the limit takes the head
        train_rows = train_rows[: int(ds.limit)]
    # -> results.json "data/source/train/dropped/<reason>", "data/source/train/kept", ...
    drops = {**train_drops.as_dict(prefix="train"), **test_drops.as_dict(prefix="test"),
             **{f"dedupe/{k}": v for k, v in dedupe.items()}}
    log.info("data: train %s", train_drops.summary())
    return train_rows, test_rows, drops


def prepare_data(cfg: DictConfig) -> PreparedData:
    ds = cfg.dataset
    check_devices(cfg)      # trainer=gpu / scale=paper without a GPU: one line, before any model or data loads
    materialise_model(cfg)  # a GGUF model: dequantised once into the cache, model.name_or_path names that dir
    if ds.name == "synthetic":
        task = _task_from_cfg(ds)
        tokenizer = task.tokenizer() if not cfg.model.get("tokenizer") else load_tokenizer(cfg.model.tokenizer)
        pairs = ds.get("pairs", "human")
        # generated: the same prompts, answered by the SFT model after the SFT stage (pipeline/pairs_stage.py)
        if pairs in ("human", "generated"):  # human: Bradley-Terry labels on two samples of the SFT distribution
            train_rows, test_rows = task.preference_pairs("train"), task.preference_pairs("test")
        elif pairs == "contrastive":
            train_rows, test_rows = task.contrastive_pairs("train"), task.contrastive_pairs("test")
        else:
            raise ValueError(f"dataset.pairs={pairs!r} is not one of human, contrastive, generated")
        sft_rows = task.sft_examples()
        drops: dict[str, Any] = {}
        resolve_prompt_format(cfg, tokenizer)
    else:
        task = None
        tokenizer_id = cfg.model.get("tokenizer") or cfg.model.get("name_or_path")
        if not tokenizer_id:
            raise ValueError(f"dataset={ds.name} needs a tokenizer: set model.tokenizer or model.name_or_path")
        tokenizer = load_tokenizer(tokenizer_id)
        resolve_prompt_format(cfg, tokenizer)
        train_rows, test_rows, drops = split_rows(ds, seed=int(cfg.seed))
        sft_rows = [{"prompt": r["prompt"], "response": r["chosen"]} for r in train_rows]
    n_flipped = 0
    if float(ds.get("label_noise") or 0.0) > 0:
        train_rows, n_flipped = flip_labels(train_rows, float(ds.label_noise), seed=cfg.seed)
        log.info("data: flipped %d of %d training labels (dataset.label_noise=%s)", n_flipped, len(train_rows), ds.label_noise)
    log.info("data: %d train pairs, %d test pairs, %d SFT examples", len(train_rows), len(test_rows), len(sft_rows))
    return PreparedData(tokenizer, train_rows, test_rows, sft_rows, task, drops, n_flipped)
