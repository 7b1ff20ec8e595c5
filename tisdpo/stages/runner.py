"""The whole run: data -> SFT -> token weights -> preference training -> evaluation -> results.json.

Each expensive stage is a cached artifact (see ``cache.py``); the log and ``results.json``
say which stages were built and which reused.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from tisdpo.jsonio import write_json_atomic
from tisdpo.losses.registry import bind_loss
from tisdpo.models.lora import policy_and_reference
from tisdpo.runtime import run_cache
from tisdpo.runtime.cache import ArtifactCache
from tisdpo.runtime.loggers import build_logger, finish_logging
from tisdpo.runtime.run_dir import begin_run, check_resume_data, prepare_run_dir
from tisdpo.runtime.validate import validate_config
from tisdpo.stages.context import RunContext
from tisdpo.stages.data import prepare_data
from tisdpo.stages.evaluation import eval_max_new_tokens, eval_stage, training_evaluators
from tisdpo.stages.export import export_policy
from tisdpo.stages.grpo import grpo_stage
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.stages.pairs import generated_pairs_stage
from tisdpo.stages.reference_logps import reference_logps_stage, validation_reference_stage
from tisdpo.stages.sft import sft_stage
from tisdpo.stages.start_models import frozen_dtype, stage_device
from tisdpo.stages.train import models_for_eval, train_stage
from tisdpo.stages.weights import weights_stage

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one job; returns the flat results dict also written to <run dir>/results.json."""
    started = time.perf_counter()
    validate_config(cfg)
    output_dir = prepare_run_dir(cfg)  # resume=<run dir> continues that run in place
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    finished = begin_run(cfg, output_dir, config_dict)  # run_config.json; a resumed, finished run returns as is
    if finished is not None:
        return finished
    reused = run_cache.reuse(cfg, config_dict, output_dir)  # cache.reuse_runs: an identical run done before
    if reused is not None:
        return reused
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    cache = ArtifactCache(cfg.cache.dir, enabled=bool(cfg.cache.enabled))
    results: dict[str, Any] = {}  # the runner's alone: every stage returns what it reports
    timings: dict[str, float] = {}

    def timed(stage: str, t0: float) -> None:
        timings[f"time/{stage}_s"] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    data = prepare_data(cfg)
    check_resume_data(cfg, output_dir, data)  # a resume on different data is refused; a first start records it
    ctx = RunContext(cfg=cfg, output_dir=output_dir, cache=cache, data=data)
    timed("data", t0)

    # Every stage trains with the run's strategy (SFT and the estimator models sharded like the policy
    # under FSDP). Under DDP/FSDP Lightning starts the other ranks at the first multi-device fit and
    # they re-run this script: the cache has them join the builds that train and wait for the others
    # (rank 0 builds and seals every artifact; see cache.py).
    t0 = time.perf_counter()
    ctx.sft_dir = sft_stage(ctx)
    timed("sft", t0)
    # dataset.pairs=generated: the SFT model writes the pairs (RLCD); a cached artifact, like SFT
    ctx.data, generated = generated_pairs_stage(ctx)
    data = ctx.data
    results.update(generated)

    train_examples, train_drops = tokenize_pairs(data.train_rows, data.tokenizer, cfg.dataset, "train")
    val_examples, val_drops = tokenize_pairs(data.test_rows, data.tokenizer, cfg.dataset, "test")
    results.update({f"data/train/{k.removeprefix('data/')}": v for k, v in train_drops.items()})
    results.update({f"data/test/{k.removeprefix('data/')}": v for k, v in val_drops.items()})
    results.update({f"data/source/{k}": v for k, v in data.drops.items()})
    results["data/label_flipped"] = data.n_flipped

    t0 = time.perf_counter()
    weighting = weights_stage(ctx, train_examples)
    results.update(weighting.metrics)
    timed("weights", t0)

    policy = ctx.start_model()
    # Full fine-tuning: a frozen deep copy. LoRA (model.lora): the policy with its adapters disabled.
    policy, reference = policy_and_reference(policy, cfg.model.get("lora"), reference_dtype=frozen_dtype(cfg))
    logger = build_logger(cfg, config_dict)

    t0 = time.perf_counter()
    # Callbacks that measure during training (TI-DPO's weight quality, the eval curve) leave their
    # last values in `latest` for results.json.
    monitors = [*weighting.monitors, *training_evaluators(cfg, data, reference)]
    loss = bind_loss(cfg.loss, data.tokenizer, int(cfg.train.logits_chunk_size))
    if loss.record.pairwise:
        # the reference's per-token log-probs, once per (data, reference): a cached artifact of its own
        t1 = time.perf_counter()
        if cfg.train.get("validation") == "heldout":
            # the held-out pairs' reference log-probs (and hidden states: the KL) in an artifact of their own,
            # whatever the loss: one pass per dataset for a whole sweep, and step 0 needs no forward
            (train_examples,) = reference_logps_stage(ctx, loss, reference, train=weighting.train_examples)
            val_examples = validation_reference_stage(ctx, reference, val_examples)
        else:
            train_examples, val_examples = reference_logps_stage(ctx, loss, reference, train=weighting.train_examples,
                                                                 val=val_examples)
        timed("reference_logps", t1)
        module, val_metrics = train_stage(
            ctx, loss, policy=policy, reference=reference, train_examples=train_examples, val_examples=val_examples,
            logger=logger, online_weights=weighting.online_weights, callbacks=monitors,
        )
    else:  # online (GRPO): samples from the policy on the training prompts; no pairs, no validation pairs
        module, val_metrics = grpo_stage(ctx, loss, policy=policy, reference=reference, logger=logger, callbacks=monitors,
                                         max_new_tokens=eval_max_new_tokens(cfg, data))
    results.update(val_metrics)
    for monitor in monitors:
        results.update(getattr(monitor, "latest", {}))
    timed("train", t0)
    results["train/steps"] = int(module.global_step)
    cache.record("train", device=str(module.trainer.strategy.root_device), seconds=timings["time/train_s"])
    # Under FSDP every rank helps gather the policy's shards; rank 0 evaluates whole models.
    policy, reference = models_for_eval(ctx, module, reference)
    if policy is None:
        # Under DDP/FSDP every rank runs this script (Lightning re-launches it) and ends training with
        # the same weights; evaluating again and writing the same results.json would only race rank 0.
        log.info("rank %d: training done; evaluation and results.json are rank 0's", module.global_rank)
        return results

    t0 = time.perf_counter()
    # Lightning's teardown may have moved the module back to the CPU: evaluation runs on the accelerator.
    device = stage_device(cfg)
    policy, reference = policy.to(device), reference.to(device)
    # External benchmarks and vLLM read the exported directory, so it is written first for them; otherwise
    # after evaluation (merging LoRA adapters for the export unwraps the policy the reference views).
    reads_export = cfg.eval.name == "benchmarks" or (cfg.eval.get("generation") or {}).get("backend") == "vllm"
    exported = export_policy(policy, data.tokenizer, output_dir, cfg.get("export")) if reads_export else None
    results.update(eval_stage(cfg, data, policy, reference, output_dir))
    timed("eval", t0)
    cache.record("eval", device=str(device), seconds=timings["time/eval_s"])
    if exported is None:
        exported = export_policy(policy, data.tokenizer, output_dir, cfg.get("export"))
    if exported is not None:
        results["export/policy_dir"] = str(exported)

    timings["time/total_s"] = round(time.perf_counter() - started, 2)
    results.update(timings)
    results["stages"] = cache.events
    if logger:
        logger.log_metrics({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=int(module.global_step))
        finish_logging(logger, output_dir, results)
    results["config"] = config_dict
    write_json_atomic(output_dir / "results.json", results)
    run_cache.store(cfg, config_dict, output_dir)
    log.info("results: %s", {k: v for k, v in results.items() if k not in ("config", "stages")})
    log.info("wrote %s (%.1fs)", output_dir / "results.json", timings["time/total_s"])
    return results
