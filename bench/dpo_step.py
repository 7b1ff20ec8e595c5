"""One DPO optimiser step, side by side: ours vs TRL's DPOTrainer vs a bare torch loop.

    python -m bench.dpo_step                      # tiny Llama 4 x 256, vocab 2000, 8 pairs x 128 tokens
    python -m bench.dpo_step --quick              # a smaller model, fewer steps: a smoke run
    python -m bench.dpo_step --precision all      # 32-true, then bf16-mixed, one section each
    python -m bench.dpo_step --device cuda --model llama-1b      # the GPU figure: Llama-3.2-1B's shape, bf16-mixed
    pip install -e '.[bench]'                     # TRL (optional: without it the TRL columns are skipped)

Contenders, all on the same model init, the same batches, the same precision, optimiser
(fused AdamW, TRL's default), gradient clipping (max norm 1.0, TRL's default) and checkpointing:

  ours         PreferenceModule (DPO) under the Lightning Trainer with run.py's train defaults, as
               `python run.py` trains: shared-prefix packing on (one row per pair, the prompt once)
  ours_cached  the same with the reference log-probs precomputed (tisdpo.stages.reference_logps)
               and no reference model in memory
  ours_standard  (opt-in: --contenders ...,ours_standard) packing off: the plain [2B, T] forward
  trl          trl.DPOTrainer, precompute_ref_log_probs=False (reference forward every step)
  bare         a plain torch loop: reference forward (no_grad), policy forward/backward with
               log_softmax + gather, clip, AdamW, zero_grad
  bare_lean    the bare loop with our chunked log-prob kernel: ours/bare_lean = framework overhead

Clipping: Lightning clips with a fused optimiser under 32-true but refuses under bf16-mixed (its
mixed-precision plugin assumes a fused step unscales gradients itself). There `ours` clips in
`on_before_optimizer_step`, the point where Lightning would clip (bf16 has no gradient scaler, so
this is the same operation), and keeps the fused optimiser: every contender runs the same step.

Step time = start-to-start time of consecutive optimiser steps (data loading, logging, callbacks
included), median over the steps after warm-up. Contenders run in rounds, in a rotated order each
round; a contender's step time is that median in its quietest round (on a machine shared with
other jobs, bursts of load slow whole rounds several-fold), and the ratios are ratios of those.
The per-round table and the median of per-round ratios are printed too. Tokens/s counts
2 x pairs x length tokens per step for every contender; MFU = tokens/s x model FLOPs per token
(6N policy forward+backward, + 2N reference forward unless cached; N = parameters) / the device's
peak (--peak-tflops, 989 on CUDA). Peak memory: each contender again in a fresh subprocess (CUDA:
torch.cuda.max_memory_allocated; CPU: peak RSS; both above the process before its models were built).
Also: estimator scoring throughput vs a bare no-grad forward (bench.scoring), and the one-off cost
of the reference-cache pass. Each precision's section ends with a machine-readable line:

    ours/trl=<r> ours/bare=<r> cached/trl=<r> peak_mb_cached=<m> peak_mb_uncached=<m> precision=<p>
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from bench.common import ROOT, add_model_args, autocast, describe, fmt, make_data, make_model, make_tokenizer, \
    median_after_warmup, mfu, n_params, quiet, resolve_model_args, sync, train_flops_per_token
from bench.scoring import BATCH_SIZE, scoring_throughput

CONTENDERS = ("ours", "ours_cached", "trl", "bare", "bare_lean")
EXTRA_CONTENDERS = ("ours_standard",)  # --contenders ...,ours_standard: ours without shared-prefix packing
PRECISIONS = ("32-true", "bf16-mixed")  # what --precision all runs, in this order


# ----------------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing for every contender")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping (TRL's max_grad_norm default)")
    p.add_argument("--chunk", type=int, default=256, help="our logits_chunk_size")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--no-trl", action="store_true", help="skip TRL even if installed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-scoring", action="store_true", help="skip the estimator scoring throughput")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory of one contender
    p.add_argument("--probe-logps", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 4), min(args.warmup, 2), 1
    if args.precision == "all":
        args.precisions = list(PRECISIONS)
        args.precision = PRECISIONS[0]
    else:
        args.precisions = None
    resolve_model_args(args)
    if args.precisions is None:
        args.precisions = [args.precision]
    elif args.device == "cuda" and not torch.cuda.is_bf16_supported():
        args.precisions = ["32-true"]
    return args


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def fresh_policy(args, init_model):
    """A copy of the seeded initial model, in training mode (every contender starts from it)."""
    model = copy.deepcopy(init_model)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(args.device).train()


def frozen(model):
    from tisdpo.models.loading import frozen_copy

    reference = frozen_copy(model)
    if getattr(reference, "is_gradient_checkpointing", False):
        reference.gradient_checkpointing_disable()
    return reference


def adamw(params, args):
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)  # TRL's default optimiser


def lightning_clips_fused(precision: str) -> bool:
    """Whether Lightning's own gradient clipping accepts a fused optimiser under this precision:
    its mixed-precision plugin refuses one ("performs unscaling of gradients internally")."""
    return not precision.endswith("-mixed")


# ----------------------------------------------------------------------------- contenders
class StepTimer(Callback):
    """Start time of every training batch, and the end of the last: the step times of a fit."""

    def __init__(self, args):
        self.args, self.starts, self.end = args, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        sync(self.args)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        sync(self.args)
        self.end = time.perf_counter()

    def durations(self) -> list[float]:
        marks = self.starts + [self.end]
        return [b - a for a, b in zip(marks[:-1], marks[1:])]


class ClipGradNorm(Callback):
    """Clip the policy's gradient norm just before the optimiser step: where Lightning's
    `gradient_clip_val` would, for the precisions where Lightning refuses to clip a fused optimiser."""

    def __init__(self, max_norm: float):
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer, module, optimizer):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


def run_ours(args, init_model, examples, tokenizer, *, cached: bool, logps=None, n_steps: int,
             shared_prefix: bool | None = None) -> list[float]:
    """PreferenceModule (DPO) under the Lightning Trainer built from conf/trainer, like train_stage."""
    import lightning as L
    from omegaconf import OmegaConf

    from tisdpo.losses import dpo_loss
    from tisdpo.losses.record import BoundLoss
    from tisdpo.modules.preference import PreferenceModule
    from tisdpo.runtime.fit import build_trainer
    from tisdpo.stages.loaders import preference_loader
    from tisdpo.stages.reference_logps import attach_reference_logps

    policy = fresh_policy(args, init_model)
    reference = None if cached else frozen(policy)
    if cached:
        examples = attach_reference_logps(examples, logps)
    optim = OmegaConf.create({
        "lr": args.lr, "warmup_steps": 0, "schedule": "constant",
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": args.lr, "weight_decay": 0.0, "fused": True},
    })
    spec = BoundLoss("dpo", functools.partial(dpo_loss, beta=0.1))
    cfg = run_config(args)
    module = PreferenceModule(
        policy, reference, spec, optim, total_steps=n_steps, logits_chunk_size=args.chunk,
        check_finite=bool(cfg.train.check_finite), pad_token_id=tokenizer.pad_token_id,
        shared_prefix=bool(cfg.train.shared_prefix) if shared_prefix is None else shared_prefix,
    )
    loader = preference_loader(examples, tokenizer, args.pairs, shuffle=False, seed=0)
    timer = StepTimer(args)
    callbacks, clip = [timer], args.clip
    if not lightning_clips_fused(args.precision):
        callbacks, clip = [timer, ClipGradNorm(args.clip)], 0.0
    trainer = build_trainer(
        cfg.trainer, max_steps=n_steps, logger=False, callbacks=callbacks, enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, precision=args.precision,
        gradient_clip_val=clip, inference_mode=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    L.seed_everything(0, verbose=False)
    return timer.durations()


def run_config(args):
    """conf/config.yaml with trainer=cpu|gpu, as `python run.py` composes it (train defaults, trainer)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}", "logger=none"])


def run_trl(args, init_model, rows, tokenizer, *, n_steps: int, precompute: bool = False) -> list[float]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.starts, self.end = [], None

        def on_step_begin(self, a, state, control, **kw):
            sync(args)
            self.starts.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync(args)
            self.end = time.perf_counter()

    policy = fresh_policy(args, init_model)
    reference = None if precompute else frozen(policy)
    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs, max_steps=n_steps, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=args.clip,
            bf16=args.precision.startswith("bf16"), fp16=False, gradient_checkpointing=args.grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False} if args.grad_ckpt else None,
            max_length=args.length, precompute_ref_log_probs=precompute, beta=0.1, loss_type=["sigmoid"],
            report_to=[], save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=args.device == "cpu", seed=0, optim="adamw_torch_fused", remove_unused_columns=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=policy, ref_model=reference, args=config,
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer])
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # its end-of-run print only; no progress bar either side
            first = trainer.train_dataset[0]
            assert len(first["prompt_ids"]) == args.prompt_length and len(first["chosen_ids"]) == args.length - args.prompt_length, \
                "TRL tokenised the benchmark data differently from ours"
            trainer.train()
    marks = timer.starts + [timer.end]
    return [b - a for a, b in zip(marks[:-1], marks[1:])]


def naive_logps(logits, labels):
    mask = labels[:, 1:] != -100
    logp = logits[:, :-1].float().log_softmax(-1)
    return logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * mask, mask


def run_bare(args, init_model, examples, tokenizer, *, n_steps: int, lean: bool) -> list[float]:
    """The same work with no framework: what one would write by hand."""
    import torch.nn.functional as F

    from tisdpo.data.collate import PreferenceCollator
    from tisdpo.kernels.logprobs import token_logps

    policy = fresh_policy(args, init_model)
    reference = frozen(policy)
    optimizer = adamw(policy.parameters(), args)
    collate = PreferenceCollator(tokenizer.pad_token_id)
    logps_fn = (lambda lg, lb: token_logps(lg, lb, chunk_size=args.chunk)) if lean else naive_logps
    times = []
    for step in range(n_steps):
        sync(args)
        start = time.perf_counter()
        batch = collate(examples[step * args.pairs: (step + 1) * args.pairs])
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(args.device)
        attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]).to(args.device)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(args.device)
        with autocast(args):
            with torch.no_grad():
                ref_logps, mask = logps_fn(reference(input_ids=ids, attention_mask=attention, use_cache=False).logits, labels)
            pol_logps, _ = logps_fn(policy(input_ids=ids, attention_mask=attention, use_cache=False).logits, labels)
        ratio = ((pol_logps - ref_logps) * mask).sum(-1)
        loss = -F.logsigmoid(0.1 * (ratio[: args.pairs] - ratio[args.pairs:])).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args)
        times.append(time.perf_counter() - start)
    return times


def reference_pass(args, init_model, examples, tokenizer):
    """The reference-cache pass (what the pipeline stores once): (log-probs, seconds)."""
    from tisdpo.stages.reference_logps import compute_reference_logps

    reference = frozen(fresh_policy(args, init_model))
    sync(args)
    start = time.perf_counter()
    logps = compute_reference_logps(reference, examples, tokenizer.pad_token_id, batch_size=64, chunk_size=args.chunk,
                                    precision=args.precision, device=args.device)
    sync(args)
    return logps, time.perf_counter() - start


# ----------------------------------------------------------------------------- memory
class _PeakRSS:
    """Peak resident set size of this process, sampled every millisecond in a thread."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def probe_memory(args) -> dict[str, float]:
    """In a fresh process: build only what `args.probe` needs, run a few steps, report the peak."""
    tokenizer = make_tokenizer(args.vocab)
    n_steps = args.warmup + 2
    rows, examples = make_data(args, args.warmup + args.steps)  # the data (and cached log-probs) of the timed run
    init_model = make_model(args)
    logps = torch.load(args.probe_logps) if args.probe_logps else None
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with _PeakRSS() as rss:
        base = rss.now()
        run_contender(args.probe, args, init_model, rows, examples, tokenizer, logps, n_steps)
    out = {"peak_rss_mb": (rss.peak - base) / 2**20}
    if args.device == "cuda":
        out["peak_cuda_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    out["peak_mb"] = out.get("peak_cuda_mb", out["peak_rss_mb"])
    return out


def memory_in_subprocess(name: str, argv: list[str], logps_path: Path | None) -> dict[str, float] | None:
    cmd = [sys.executable, "-m", "bench.dpo_step", *argv, "--probe", name]
    if logps_path is not None:
        cmd += ["--probe-logps", str(logps_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    print(f"  memory probe {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None


def probe_argv(argv: list[str], precision: str) -> list[str]:
    """The run's own arguments for a memory probe, for one precision (the last --precision wins)."""
    return [a for a in argv if a not in ("--no-memory",)] + ["--precision", precision]


# ----------------------------------------------------------------------------- results
def run_contender(name, args, init_model, rows, examples, tokenizer, logps, n_steps) -> list[float]:
    if name == "ours":
        return run_ours(args, init_model, examples, tokenizer, cached=False, n_steps=n_steps)
    if name == "ours_cached":
        return run_ours(args, init_model, examples, tokenizer, cached=True, logps=logps, n_steps=n_steps)
    if name == "ours_standard":  # shared-prefix packing off: the [2B, T] forward
        return run_ours(args, init_model, examples, tokenizer, cached=False, n_steps=n_steps, shared_prefix=False)
    if name == "trl":
        return run_trl(args, init_model, rows, tokenizer, n_steps=n_steps)
    if name == "bare":
        return run_bare(args, init_model, examples, tokenizer, n_steps=n_steps, lean=False)
    if name == "bare_lean":
        return run_bare(args, init_model, examples, tokenizer, n_steps=n_steps, lean=True)
    raise ValueError(f"unknown contender {name!r}")


def best_round(results, name: str) -> float | None:
    """A contender's step time: its median step time in its quietest round (the smallest round median)."""
    times = [r[name] for r in results if name in r]
    return min(times) if times else None


def ratio(results, a: str, b: str) -> float | None:
    """Ratio of the two contenders' quietest-round median step times."""
    x, y = best_round(results, a), best_round(results, b)
    return x / y if x is not None and y is not None else None


def ratio_per_round(results, a: str, b: str) -> float | None:
    """Median over rounds of the per-round ratio (a cross-check; less robust to bursts of load)."""
    pairs = [r[a] / r[b] for r in results if a in r and b in r]
    return statistics.median(pairs) if pairs else None


RATIOS = {  # name: (contender a, contender b) -> step time of a / step time of b
    "ours/trl": ("ours", "trl"), "ours/bare": ("ours", "bare"), "ours/bare_lean": ("ours", "bare_lean"),
    "cached/trl": ("ours_cached", "trl"), "cached/ours": ("ours_cached", "ours"), "trl/bare": ("trl", "bare"),
    "standard/trl": ("ours_standard", "trl"), "ours/standard": ("ours", "ours_standard"),
    "bare_lean/bare": ("bare_lean", "bare"),
}


def timed_rounds(args, contenders, init_model, rows, examples, tokenizer, logps) -> list[dict[str, float]]:
    """Per round: each contender's median step time after warm-up, the order rotated each round."""
    n_steps = args.warmup + args.steps
    results = []
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        row = {}
        for name in order:
            times = run_contender(name, args, init_model, rows, examples, tokenizer, logps, n_steps)
            row[name] = median_after_warmup(times, args.warmup)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        print(f"  round {r + 1}: " + "  ".join(f"{k} {row[k]:.3f}s" for k in contenders), flush=True)
    return results


def throughput_table(args, contenders, results, params: int) -> dict:
    """Step time, tokens/s and MFU per contender (printed), and every ratio."""
    report = {}
    tokens_per_step = 2 * args.pairs * args.length
    print("  step time (median step of each contender's quietest round), tokens/s, MFU")
    for name in contenders:
        t = best_round(results, name)
        spread = max(r[name] for r in results) / t
        tokens_per_s = tokens_per_step / t
        flops = train_flops_per_token(params, reference=name != "ours_cached")
        util = mfu(tokens_per_s, flops, args.peak_tflops)
        report.update({f"step_s/{name}": t, f"tokens_per_s/{name}": tokens_per_s, f"mfu/{name}": util})
        print(f"    {name:13s} {t:8.3f} s/step {tokens_per_s:11.0f} tokens/s   MFU {fmt(util)}"
              + (f"   (rounds spread x{spread:.1f}: the machine was busy)" if spread > 1.3 else ""))
    per_round = {}
    for key, (a, b) in RATIOS.items():
        report[key] = ratio(results, a, b)
        per_round[key] = ratio_per_round(results, a, b)
        report[f"{key} (median of per-round ratios)"] = per_round[key]
    print("  ratios of step times (< 1 = first is faster); in brackets the median of per-round ratios")
    for key in RATIOS:
        if report[key] is not None:
            print(f"    {key:15s} {report[key]:.3f}   [{per_round[key]:.3f}]")
    if report["ours/trl"] is not None:
        print(f"  tokens/s ours vs TRL: x{1 / report['ours/trl']:.2f}"
              + (f"; cached vs TRL: x{1 / report['cached/trl']:.2f}" if report["cached/trl"] else ""))
    return report


def peak_memory(args, argv, contenders, logps) -> dict[str, float]:
    """Each contender's peak memory, from a fresh subprocess."""
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logps.pt"
        torch.save(logps, path)
        for name in contenders:
            probe = memory_in_subprocess(name, probe_argv(argv, args.precision), path if name == "ours_cached" else None)
            if probe:
                memory[name] = probe["peak_mb"]
    kind = ("GPU, torch.cuda.max_memory_allocated" if args.device == "cuda"
            else "peak RSS")
    print(f"  peak memory ({kind}, above the process before its models were built): "
          + "  ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))
    return memory


def run_precision(args, argv, contenders) -> dict:
    """Every number for one precision; ends with the machine-readable line."""
    print(f"\n== {args.precision} ==")
    tokenizer = make_tokenizer(args.vocab)
    rows, examples = make_data(args, args.warmup + args.steps)
    init_model = make_model(args)
    params = n_params(init_model)
    logps, ref_seconds = reference_pass(args, init_model, examples, tokenizer)
    report: dict = {"precision": args.precision, "params": params, "reference_cache_pass_s": ref_seconds}
    results = timed_rounds(args, contenders, init_model, rows, examples, tokenizer, logps)
    report["rounds"] = results
    report.update(throughput_table(args, contenders, results, params))
    saved = (report.get("step_s/ours") or 0) - (report.get("step_s/ours_cached") or 0)
    print(f"  reference cache: one pass over {len(examples)} pairs took {ref_seconds:.2f}s "
          f"({2 * len(examples) * args.length / ref_seconds:.0f} tokens/s)"
          + (f"; pays for itself after {ref_seconds / saved:.1f} steps" if saved > 0 else ""))
    if not args.no_scoring:
        frozen_model = frozen(fresh_policy(args, init_model))
        scoring = scoring_throughput(args, frozen_model, examples, tokenizer.pad_token_id,
                                     batch_size=min(BATCH_SIZE, len(examples)), chunk=args.chunk, reps=6 if not args.quick else 2)
        del frozen_model
        report.update(scoring)
        print(f"  estimator scoring: {scoring['scoring_tokens_per_s']:.0f} tokens/s vs bare forward "
              f"{scoring['bare_forward_tokens_per_s']:.0f} tokens/s (scoring/bare throughput "
              f"{scoring['scoring/bare_throughput']:.3f})")
    del init_model
    gc.collect()
    memory = {} if args.no_memory else peak_memory(args, argv, contenders, logps)
    report.update({f"peak_mb/{k}": v for k, v in memory.items()})
    print(f"ours/trl={fmt(report['ours/trl'])} ours/bare={fmt(report['ours/bare'])} cached/trl={fmt(report['cached/trl'])} "
          f"peak_mb_cached={fmt(memory.get('ours_cached'), 0)} peak_mb_uncached={fmt(memory.get('ours'), 0)} "
          f"precision={args.precision}", flush=True)
    return report


def main(argv=None) -> dict:
    """{"args": ..., "<precision>": {every number}} (also written to --json)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quiet()
    torch.set_float32_matmul_precision("high")  # as the pipeline sets it (TF32 on GPUs that have it)
    if args.probe:
        print("PROBE " + json.dumps(probe_memory(args)), flush=True)
        return {}
    contenders = [c for c in args.contenders.split(",") if c]
    if (args.no_trl or not have_trl()) and "trl" in contenders:
        print("TRL not installed (pip install -e '.[bench]') or --no-trl: skipping the TRL contender")
        contenders.remove("trl")
    print(f"model: {describe(args)} | {args.pairs} pairs x {args.length} tokens (prompt {args.prompt_length}) | "
          f"grad ckpt {'on' if args.grad_ckpt else 'off'} | {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} threads")
          + f" | torch {torch.__version__}" + (f", trl {__import__('trl').__version__}" if "trl" in contenders else ""))
    print(f"timing: {args.rounds} round(s) x {args.steps} steps after {args.warmup} warm-up, medians; order rotates "
          f"per round | precisions: {', '.join(args.precisions)}")
    report: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for precision in args.precisions:
        args.precision = precision
        report[precision] = run_precision(args, argv, contenders)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
