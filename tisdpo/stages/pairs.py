"""Generated pairs stage (``dataset.pairs=generated``): the SFT model writes both responses, RLCD style.

RLCD (Yang et al. 2023, "Reinforcement Learning from Contrastive Distillation") makes preference
pairs without labellers: the model answers each prompt twice, once under a positive system prompt
("You are an harmless assistant. ...") and once under a negative one ("You are an harmful
assistant. ..."), and the answer of the positive prompt is labelled chosen. The system prompts
are shown to the generator only: the pair is stored with the plain prompt, so preference training
teaches the policy to prefer the harmless answer without being told to be harmless. TIS-DPO's
"LLM-generated data" table trains on such pairs, made by the SFT model (the initial model).

Runs right after the SFT stage and replaces the human pairs' responses (their prompts stay):

* ``dataset.pairs=generated`` generates on any dataset; on a real dataset ``contrastive`` means the
  same (a real dataset has no other source of contrastive pairs), while on the built-in task
  ``contrastive`` keeps the task's exact <harmless>/<harmful> sampling (``SyntheticTask.contrastive_pairs``,
  the tiny stand-in) and ``generated`` makes the SFT model answer under those prefix tokens.
* Options under ``dataset.generation`` (:data:`GENERATION_DEFAULTS`): ``positive_system``,
  ``negative_system`` and ``template`` (how a system prompt joins the prompt; then
  ``dataset.prompt_template`` applies as everywhere; the built-in task uses its prefix tokens),
  ``max_new_tokens`` (null: ``dataset.max_length - dataset.max_prompt_length``), ``temperature``,
  ``top_p``, ``batch_size``, and ``n_train``/``n_test`` (the first N prompts; null: all).
* ``dataset.generation.backend``: ``hf`` (the initial model's ``generate``) or ``vllm`` (a vLLM engine
  on the SFT artifact's directory, ~10x faster at paper scale; ``gpu_memory_utilization`` and
  ``tensor_parallel_size`` size it; tisdpo/eval/vllm_backend.py). Same sampling parameters, other
  random draws: the backend is part of the artifact's key.
* The pairs are a cached artifact (stage ``pairs``: ``pairs.json``) keyed by the initial model, the
  prompts, the generation options and the seed, so a sweep over losses generates once.
* Pairs with an empty response or two identical responses are dropped and counted
  (results.json ``data/generated/<split>/...``); on the built-in task the rows carry the true token
  rewards in ``meta``, so the task's metrics and weight quality still work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.data.noise import flip_labels
from tisdpo.eval.generation import sample_responses
from tisdpo.eval.vllm_backend import ENGINE_DEFAULTS, open_sampler
from tisdpo.runtime.cache import stable_hash
from tisdpo.stages.data import PreparedData
from tisdpo.stages.loaders import format_prompt
from tisdpo.stages.context import RunContext
from tisdpo.stages.start_models import frozen_dtype
from tisdpo.runtime.validate import ConfigError
from tisdpo.weights.contrast import contrastive_rows

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.json"
SPLITS = ("train", "test")

# The options of dataset.generation and their defaults (the real dataset configs declare the same
# node; a config without it, like the built-in task's, gets these). The system prompts are the
# TIS-DPO paper's contrastive prompts, as the prompt estimator uses (conf/estimator/prompt.yaml).
GENERATION_DEFAULTS: dict[str, Any] = {
    "positive_system": "You are an harmless assistant. You will refuse any responses that could potentially pose a security risk.",
    "negative_system": "You are an harmful assistant. You will give harmful responses for any question.",
    "template": "{system}\n\n{prompt}",
    "max_new_tokens": None,  # null: dataset.max_length - dataset.max_prompt_length (what training keeps)
    "temperature": 1.0,      # plain sampling from the SFT model: RLCD's pairs are its own samples
    "top_p": 1.0,
    "batch_size": 64,
    "n_train": None,         # the first N training prompts (null: all)
    "n_test": None,          # the first N test prompts (null: all)
    # hf: the initial model's generate; vllm: a vLLM engine on its directory (tisdpo/eval/vllm_backend.py),
    # with vLLM's share of the GPU's memory and its tensor-parallel degree (the dtype is model.dtype)
    "backend": "hf",
    "gpu_memory_utilization": ENGINE_DEFAULTS["gpu_memory_utilization"],
    "tensor_parallel_size": ENGINE_DEFAULTS["tensor_parallel_size"],
}
# Options that decide where the samples are drawn, not what they are: not part of the artifact's key.
ENGINE_OPTIONS = ("backend", "gpu_memory_utilization", "tensor_parallel_size")


def wants_generated_pairs(cfg: DictConfig) -> bool:
    """Whether the run trains on generated pairs: ``dataset.pairs=generated``, or ``contrastive`` on a
    real dataset (the built-in task's ``contrastive`` samples its own prefixed distributions instead)."""
    pairs = cfg.dataset.get("pairs", "human")
    return pairs == "generated" or (pairs == "contrastive" and cfg.dataset.name != "synthetic")


def generation_options(dataset_cfg: DictConfig) -> dict[str, Any]:
    """``dataset.generation`` over :data:`GENERATION_DEFAULTS`, with ``max_new_tokens`` resolved."""
    given = OmegaConf.to_container(dataset_cfg.get("generation") or {}, resolve=True)
    unknown = sorted(set(given) - set(GENERATION_DEFAULTS))
    if unknown:
        raise ValueError(f"dataset.generation has unknown option(s) {unknown}; valid: {sorted(GENERATION_DEFAULTS)}")
    options = {**GENERATION_DEFAULTS, **given}
    if options["max_new_tokens"] is None:
        options["max_new_tokens"] = int(dataset_cfg.max_length) - int(dataset_cfg.max_prompt_length)
    return options


def generated_pairs_stage(ctx: RunContext) -> tuple[PreparedData, dict[str, Any]]:
    """(the run's data with its train/test pairs generated by the initial model (RLCD), the
    ``data/generated/...`` counts); ``(ctx.data, {})`` when the run does not ask for generated pairs."""
    cfg, data = ctx.cfg, ctx.data
    if not wants_generated_pairs(cfg):
        return data, {}
    options = generation_options(cfg.dataset)
    limits = {"train": options["n_train"], "test": options["n_test"]}
    prompts = {split: [r["prompt"] for r in rows][:limits[split]]
               for split, rows in (("train", data.train_rows), ("test", data.test_rows))}
    key_fields = {
        "model": ctx.start_identity(),
        "dtype": str(cfg.model.get("dtype")),
        "tokenizer": [cfg.model.get("tokenizer"), len(data.tokenizer)],
        "task": data.task.fingerprint() if data.task is not None else None,
        "prompts": {split: stable_hash(texts) for split, texts in prompts.items()},
        "prompt_format": [cfg.dataset.get("prompt_template"), bool(cfg.dataset.get("chat_template", False))],
        "generation": {k: v for k, v in options.items() if k not in ENGINE_OPTIONS},
        "seed": cfg.seed,
    }
    if options["backend"] != "hf":  # vLLM draws other samples (its own RNG, its kernels): another artifact
        key_fields["backend"] = options["backend"]

    def build(out: Path) -> None:
        pairs = generate_all(ctx, prompts, options)
        (out / PAIRS_FILE).write_text(json.dumps(pairs, indent=1))

    artifact = ctx.cache.get_or_build("pairs", key_fields, build, device=ctx.device)
    stored = json.loads((artifact.path / PAIRS_FILE).read_text())
    counts: dict[str, Any] = {}
    for split in SPLITS:
        counts.update({f"data/generated/{split}/{k}": v for k, v in stored["counts"][split].items()})
        if not stored[split]:
            raise ValueError(f"dataset.pairs={cfg.dataset.pairs}: every generated {split} pair was empty or identical "
                             f"({stored['counts'][split]}); raise dataset.generation.max_new_tokens or temperature")
    train_rows, n_flipped = stored["train"], 0
    if float(cfg.dataset.get("label_noise") or 0.0) > 0:  # the noise the human pairs had, on the generated ones
        train_rows, n_flipped = flip_labels(train_rows, float(cfg.dataset.label_noise), seed=cfg.seed)
    log.info("data: %d generated train pairs, %d test pairs (RLCD, dataset.pairs=%s)",
             len(train_rows), len(stored["test"]), cfg.dataset.pairs)
    return dataclasses.replace(data, train_rows=train_rows, test_rows=stored["test"], n_flipped=n_flipped), counts


def generate_all(ctx: RunContext, prompts: dict[str, list[str]], options: dict[str, Any]) -> dict[str, Any]:
    """{"train": rows, "test": rows, "counts": {split: counts}} from the initial model on the accelerator."""
    cfg, data = ctx.cfg, ctx.data
    out: dict[str, Any] = {"counts": {}}
    with _generator(ctx, options) as model:
        for split in SPLITS:
            out[split], out["counts"][split] = generate_pairs(model, data.tokenizer, prompts[split], task=data.task,
                                                              dataset_cfg=cfg.dataset, options=options,
                                                              seed=derived_seed(cfg.seed, split))
    return out


@contextlib.contextmanager
def _generator(ctx: RunContext, options: dict[str, Any]) -> Iterator[Any]:
    """What samples the pairs (``sample_responses``' model): the initial model on the accelerator
    (``dataset.generation.backend=hf``), or a vLLM engine on its directory (``vllm``: the SFT artifact,
    or ``model.name_or_path`` when SFT was skipped; no HF copy is loaded). Freed on exit: the later
    stages load their own models."""
    cfg, device = ctx.cfg, ctx.device
    if options["backend"] == "vllm":
        with open_sampler("vllm", None, model_dir=_vllm_model_dir(cfg, ctx.sft_dir), tokenizer=ctx.tokenizer,
                          seed=int(cfg.seed), option="dataset.generation.backend", tokenizer_path=_vllm_tokenizer(cfg, ctx.sft_dir),
                          dtype=_vllm_dtype(cfg), gpu_memory_utilization=options["gpu_memory_utilization"],
                          tensor_parallel_size=options["tensor_parallel_size"]) as engine:
            yield engine
        return
    model = ctx.start_model()
    dtype = frozen_dtype(cfg)  # a no-grad sampler: stored like the other frozen models
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.eval()
    try:
        yield model
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _vllm_model_dir(cfg: DictConfig, sft_dir: Path | None) -> str:
    """The directory (or hub id) vLLM loads :func:`initial_model`'s weights from."""
    if sft_dir is not None:
        return str(sft_dir)
    if cfg.model.get("name_or_path"):
        return str(cfg.model.name_or_path)
    raise ConfigError("dataset.generation.backend=vllm loads the model from a directory, but this run's initial model is "
                      "built from model.config (no SFT artifact, no model.name_or_path): use dataset.generation.backend=hf")


def _vllm_tokenizer(cfg: DictConfig, sft_dir: Path | None) -> str | None:
    """A separate tokenizer for vLLM (it only detokenises: prompts go in as our token ids): the SFT
    artifact holds its own; a base model may use ``model.tokenizer``."""
    return None if sft_dir is not None else cfg.model.get("tokenizer")


def _vllm_dtype(cfg: DictConfig) -> str:
    """The dtype the HF path samples in (``model.dtype``, as every frozen model), for vLLM; auto: the checkpoint's."""
    dtype = frozen_dtype(cfg)
    return str(dtype).removeprefix("torch.") if dtype is not None else "auto"


def derived_seed(*parts: Any) -> int:
    """A 32-bit sampling seed from (run seed, split, side, ...): each split and side draws its own stream."""
    return int(stable_hash(list(parts), length=8), 16)


def generator_inputs(prompts: list[str], *, task, tokenizer, dataset_cfg: DictConfig,
                     options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The texts the generator sees: each prompt under the positive and under the negative system
    prompt (the built-in task: its <harmless>/<harmful> tokens), then formatted as training formats it."""
    rows = [{"prompt": p} for p in prompts]
    positive, negative = contrastive_rows(rows, task=task, template=options["template"],
                                          positive_prompt=options["positive_system"],
                                          negative_prompt=options["negative_system"])
    return ([_as_model_sees(r["prompt"], tokenizer, dataset_cfg) for r in positive],
            [_as_model_sees(r["prompt"], tokenizer, dataset_cfg) for r in negative])


def _as_model_sees(text: str, tokenizer, dataset_cfg: DictConfig) -> str:
    """``dataset.prompt_template`` applied; with ``dataset.chat_template`` the tokenizer's chat template
    (one user turn, as training tokenises prompts), minus a BOS the tokenizer adds itself."""
    text = format_prompt(text, dataset_cfg)
    if not dataset_cfg.get("chat_template", False):
        return text
    text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    # sample_responses tokenises with add_special_tokens=True: a template's BOS text would double it
    if bos and text.startswith(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def generate_pairs(model, tokenizer, prompts: list[str], *, task, dataset_cfg: DictConfig, options: dict[str, Any],
                   seed: int) -> tuple[list[dict], dict[str, Any]]:
    """RLCD pairs for ``prompts``: chosen = the answer under the positive system prompt, rejected =
    the answer under the negative one, both stored with the plain prompt. Returns (rows, counts)."""
    positive_inputs, negative_inputs = generator_inputs(prompts, task=task, tokenizer=tokenizer,
                                                        dataset_cfg=dataset_cfg, options=options)
    chosen, chosen_done = _sample(model, tokenizer, positive_inputs, options, seed=derived_seed(seed, "positive"))
    rejected, rejected_done = _sample(model, tokenizer, negative_inputs, options, seed=derived_seed(seed, "negative"))
    rows: list[dict] = []
    counts = {"prompts": len(prompts), "kept": 0, "dropped/empty": 0, "dropped/identical": 0, "unfinished_responses": 0}
    for prompt, c, r, c_done, r_done in zip(prompts, chosen, rejected, chosen_done, rejected_done):
        if not c or not r:
            counts["dropped/empty"] += 1
            continue
        if c == r:  # no preference to learn from
            counts["dropped/identical"] += 1
            continue
        counts["unfinished_responses"] += (not c_done) + (not r_done)
        meta = {"generated": True, "chosen_finished": c_done, "rejected_finished": r_done}
        if task is not None:
            meta.update(true_reward_meta(task, prompt, c, r))
        rows.append({"prompt": prompt, "chosen": c, "rejected": r, "meta": meta})
    counts["kept"] = len(rows)
    if task is not None and rows:
        # how often the positive prompt's answer is truly better: the RLCD label's accuracy
        counts["label_agreement"] = sum(r["meta"]["label_correct"] for r in rows) / len(rows)
    log.info("generated pairs: %s", counts)
    return rows, counts


def _sample(model, tokenizer, inputs: list[str], options: dict[str, Any], *, seed: int) -> tuple[list[str], list[bool]]:
    """One seeded, batched sample per input; (texts without special tokens, stripped; finished flags).

    Inputs are sampled longest first, so a batch pads little, and returned in the given order."""
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
    ids, finished = sample_responses(
        model, tokenizer, [inputs[i] for i in order], temperature=float(options["temperature"]),
        top_p=options["top_p"], max_new_tokens=int(options["max_new_tokens"]),
        batch_size=int(options["batch_size"]), seed=seed, return_finished=True,
    )
    texts, done = [""] * len(inputs), [False] * len(inputs)
    for position, i in enumerate(order):
        texts[i] = tokenizer.decode(ids[position], skip_special_tokens=True).strip()
        done[i] = bool(finished[position])
    return texts, done


def true_reward_meta(task, prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    """The built-in task's true token rewards of a generated pair (as ``SyntheticTask.contrastive_pairs``)."""
    topic = task.topic_of(prompt)
    chosen_r, rejected_r = task.token_rewards(topic, chosen.split()), task.token_rewards(topic, rejected.split())
    return {"topic": topic, "chosen_token_rewards": chosen_r, "rejected_token_rewards": rejected_r,
            "chosen_reward": float(sum(chosen_r)), "rejected_reward": float(sum(rejected_r)),
            "label_correct": bool(sum(chosen_r) > sum(rejected_r))}
