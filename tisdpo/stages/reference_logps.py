"""Reference per-token log-probs, computed once per (data, reference model, tokenisation) and cached.

The reference is frozen, so log π_ref(y_t | x, y_<t) of every training token is a constant of
the run: one batched no-grad pass computes it, an artifact stores it (keyed by the tokenised
examples, the reference model's identity and the precision of the pass), and every later
step, and every later job of a sweep, reads it instead of running the reference forward.

Valid only for losses that need nothing of the reference but those log-probs
(``BoundLoss.kl_direction is None``: DPO, cDPO, IPO, KTO, TIS-DPO without η, TI-DPO with
base=dpo). TDPO and TIS-DPO's η need the reference's full next-token distribution, so they keep
running the reference forward.

Layout on the examples: ``chosen_reference_logps`` / ``rejected_reference_logps``, a 1-D
float32 tensor of ``len(input_ids) - 1`` values shifted like the labels (value t is
log p(ids[t+1] | ids[:t+1]), 0.0 where ``labels[t+1] == -100``); the collator pads them with 0.0
into [B, T-1]. Tensors rather than lists of Python floats: 4 bytes a token instead of ~32.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tisdpo.constants import IGNORE_INDEX, SIDES
from tisdpo.kernels.scoring import output_head, score_pairs
from tisdpo.losses.record import BoundLoss
from tisdpo.stages.context import RunContext

log = logging.getLogger(__name__)
KEYS = tuple(f"{side}_reference_logps" for side in SIDES)
HIDDEN_KEYS = tuple(f"{side}_reference_hidden" for side in SIDES)


def cache_applies(loss_spec) -> bool:
    """True when the loss needs only the reference's per-token log-probs (no full distribution)."""
    return getattr(loss_spec, "kl_direction", None) is None


def examples_fingerprint(examples: list[dict]) -> str:
    """Hash of the tokenised examples (ids and labels, in order): data + tokenisation in one key."""
    digest = hashlib.sha256()
    for example in examples:
        for side in SIDES:
            digest.update(np.asarray(example[f"{side}_input_ids"], dtype=np.int64).tobytes())
            digest.update(np.asarray(example[f"{side}_labels"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def compute_reference_logps(
    model,
    examples: list[dict],
    pad_token_id: int,
    *,
    batch_size: int = 64,
    chunk_size: int = 256,
    precision: str | None = None,
    device: torch.device | str | None = None,
    shared_prefix: bool = True,
) -> dict[str, list[torch.Tensor]]:
    """{"chosen": [...], "rejected": [...]}: one float32 tensor [len(input_ids) - 1] per example, in order:
    the batched scorer (``kernels/scoring.score_pairs``) in the layout the preference module slices,
    with one packed row per pair where the model allows it (the prompt once)."""
    chosen, rejected = score_pairs(model, examples, pad_token_id, batch_size=batch_size, chunk_size=chunk_size,
                                   precision=precision, device=device, full_length=True, shared_prefix=shared_prefix,
                                   progress="reference log-probs")
    return {"chosen": chosen, "rejected": rejected}


def save_reference_logps(path: Path, logps: dict[str, list[torch.Tensor]]) -> None:
    """One flat tensor and the offsets per side (fast to save and load, no per-example objects)."""
    blob = {}
    for side in SIDES:
        lengths = torch.tensor([len(t) for t in logps[side]], dtype=torch.long)
        blob[f"{side}_values"] = torch.cat(logps[side]) if logps[side] else torch.zeros(0)
        blob[f"{side}_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    torch.save(blob, path)


def load_reference_logps(path: Path) -> dict[str, list[torch.Tensor]]:
    blob = torch.load(path)
    out = {}
    for side in SIDES:
        values, offsets = blob[f"{side}_values"], blob[f"{side}_offsets"].tolist()
        out[side] = [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    return out


def _attach_per_side(examples: list[dict], tensors: dict[str, list[torch.Tensor]], key: str, what: str,
                     expected: Callable[[dict, str], tuple[int, str]]) -> list[dict]:
    """Copies of the examples with ``{side}_{key}`` = ``tensors[side][i]``; checks the alignment: one
    tensor per example and side, each with the rows ``expected(example, side)`` gives (count, what they are)."""
    if any(len(tensors[side]) != len(examples) for side in SIDES):
        raise ValueError(f"{what} for {len(tensors['chosen'])} examples, got {len(examples)} examples")
    out = []
    for i, example in enumerate(examples):
        example = dict(example)
        for side in SIDES:
            rows, (want, unit) = len(tensors[side][i]), expected(example, side)
            if rows != want:
                raise ValueError(f"example {i}: {rows} cached {what} for {unit}")
            example[f"{side}_{key}"] = tensors[side][i]
        out.append(example)
    return out


def attach_reference_logps(examples: list[dict], logps: dict[str, list[torch.Tensor]]) -> list[dict]:
    """Copies of the examples with ``{chosen,rejected}_reference_logps``; checks the alignment."""
    def one_fewer(example: dict, side: str) -> tuple[int, str]:
        n = len(example[f"{side}_input_ids"])
        return n - 1, f"{n} {side} tokens (expected one fewer)"
    return _attach_per_side(examples, logps, "reference_logps", "reference log-probs", one_fewer)


def reference_logps_key(*, examples: list[dict] | dict[str, list[dict]], reference_id: Any,
                         precision: str | None, extra: dict | None = None) -> dict[str, Any]:
    """The cache key: the tokenised data of every split (ids + labels), the reference model, the
    precision of the pass. ``examples``: one list, or {split name: list} (one artifact for all)."""
    splits = examples if isinstance(examples, dict) else {"train": examples}
    return {
        "examples": {name: examples_fingerprint(split) for name, split in splits.items()},
        "n_examples": {name: len(split) for name, split in splits.items()},
        "reference": reference_id,
        "precision": str(precision or "32-true"),
        **(extra or {}),
    }


def with_reference_logps(
    examples: list[dict] | dict[str, list[dict]],
    *,
    reference,
    cache,
    key_fields: dict[str, Any],
    pad_token_id: int,
    batch_size: int = 64,
    chunk_size: int = 256,
    precision: str | None = None,
    device: torch.device | str | None = None,
) -> list[dict] | dict[str, list[dict]]:
    """The examples with cached reference log-probs attached, computing (and storing) them if absent.

    ``examples``: one list, or {split name: list}; the splits share one artifact (one pass, one
    stage event) and come back in the same form.
    """
    splits = examples if isinstance(examples, dict) else {"train": examples}

    def build(out: Path) -> None:
        for name, split in splits.items():
            if split:
                logps = compute_reference_logps(reference, split, pad_token_id, batch_size=batch_size,
                                                chunk_size=chunk_size, precision=precision, device=device)
                save_reference_logps(out / f"reference_logps_{name}.pt", logps)

    artifact = cache.get_or_build("reference_logps", key_fields, build, device=device)
    attached = {
        name: attach_reference_logps(split, load_reference_logps(artifact.path / f"reference_logps_{name}.pt"))
        if split else split
        for name, split in splits.items()
    }
    return attached if isinstance(examples, dict) else attached["train"]


def reference_logps_stage(ctx: RunContext, loss: BoundLoss, reference, **splits: list[dict]) -> tuple[list[dict], ...]:
    """The splits with the reference's per-token log-probs attached (a cached artifact, built on first
    use), or as they are when the run needs none: ``train.reference_cache=false``, a reference-free
    loss (SimPO, TPO), or a loss that needs the reference's full next-token distribution (TDPO,
    TIS-DPO's η: the reference runs every step)."""
    cfg = ctx.cfg
    if not cfg.train.get("reference_cache") or loss.reference_free:
        return tuple(splits.values())
    if not cache_applies(loss):
        log.info("reference cache: off for loss=%s (it needs the reference's full next-token distribution)", loss.name)
        return tuple(splits.values())
    precision = cfg.trainer.get("precision")
    identity = {**ctx.start_identity(), "dtype": cfg.model.get("dtype")}
    key_fields = reference_logps_key(examples=splits, reference_id=identity, precision=precision)
    out = with_reference_logps(
        splits, reference=reference, cache=ctx.cache, key_fields=key_fields, pad_token_id=ctx.tokenizer.pad_token_id,
        batch_size=int(cfg.train.eval_batch_size), chunk_size=int(cfg.train.logits_chunk_size),
        precision=precision, device=ctx.device,
    )
    log.info("reference cache: %s pairs carry their reference log-probs",
             ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    return tuple(out.values())


def attach_reference_hidden(examples: list[dict], hidden: dict[str, list[torch.Tensor]]) -> list[dict]:
    """The examples (copied) with ``{chosen,rejected}_reference_hidden`` [n_response_tokens, H]; checks
    that each has one row per response label."""
    def one_per_label(example: dict, side: str) -> tuple[int, str]:
        n_labels = sum(label != IGNORE_INDEX for label in list(example[f"{side}_labels"])[1:])
        return n_labels, f"{n_labels} {side} response tokens"
    return _attach_per_side(examples, hidden, "reference_hidden", "reference hidden states", one_per_label)


def validation_reference_stage(ctx: RunContext, reference, val_examples: list[dict]) -> list[dict]:
    """The validation pairs with the reference's per-token log-probs and, where the reference's logits are
    its output head of its last hidden states (Llama, Mistral, Qwen, GPT-2; not PEFT), those hidden states
    at the response positions: one cached artifact per (validation data, reference, precision), built
    whatever the loss (``train.validation=heldout``).

    With them a validation pass needs no reference forward: the reference's log-probs come with the
    batch, and its next-token distribution at each response position is ``head(hidden)`` (the KL to
    the reference, ``PreferenceModule.heldout_sums``); step 0, where the policy is the reference, needs no
    forward at all (``stages/train.reference_heldout_metrics``). A sweep over methods on one dataset
    shares the artifact: the reference and the held-out pairs are the same for every method."""
    cfg = ctx.cfg
    if not val_examples:
        return val_examples
    precision = cfg.trainer.get("precision")
    with_hidden = output_head(reference) is not None
    identity = {**ctx.start_identity(), "dtype": cfg.model.get("dtype")}
    key_fields = reference_logps_key(examples={"val": val_examples}, reference_id=identity, precision=precision,
                                     extra={"hidden": with_hidden})

    def build(out: Path) -> None:
        hidden: dict[str, list] | None = {} if with_hidden else None
        chosen, rejected = score_pairs(reference, val_examples, ctx.tokenizer.pad_token_id,
                                       batch_size=int(cfg.train.eval_batch_size),
                                       chunk_size=int(cfg.train.logits_chunk_size), precision=precision,
                                       device=ctx.device, full_length=True, shared_prefix=not with_hidden,
                                       progress="reference log-probs (validation)", hidden=hidden)
        save_reference_logps(out / "reference_logps_val.pt", {"chosen": chosen, "rejected": rejected})
        if hidden is not None:
            save_reference_logps(out / "reference_hidden_val.pt", hidden)

    artifact = ctx.cache.get_or_build("reference_logps", key_fields, build, device=ctx.device)
    out = attach_reference_logps(val_examples, load_reference_logps(artifact.path / "reference_logps_val.pt"))
    if with_hidden:
        out = attach_reference_hidden(out, load_reference_logps(artifact.path / "reference_hidden_val.pt"))
    log.info("validation: %d held-out pairs carry the reference's log-probs%s", len(out),
             " and hidden states (KL to the reference without its forward)" if with_hidden else
             " (no KL to the reference: its logits are not its output head of its hidden states)")
    return out
