"""One DPO optimiser step, side by side: ours vs TRL's DPOTrainer vs a bare torch loop.

    python -m bench.dpo_step            # anchors' shape: tiny Llama 4 x 256, vocab 2000, 8 pairs x 128 tokens
    python -m bench.dpo_step --quick    # a smaller model and fewer steps: a smoke run in about a minute
    pip install -e '.[bench]'           # TRL (optional: without it the TRL columns are skipped)

Contenders, all on the same model init, the same batches, the same precision, optimiser
(AdamW), gradient clipping and checkpointing setting:

  ours         PreferenceModule (DPO) under the Lightning Trainer with run.py's train defaults, as
               `python run.py` trains: shared-prefix packing on (one row per pair, the prompt once)
  ours_cached  the same with the reference log-probs precomputed (tisdpo.pipeline.reference_cache)
               and no reference model in memory
  ours_standard  (opt-in: --contenders ...,ours_standard) packing off: the plain [2B, T] forward
  trl          trl.DPOTrainer, precompute_ref_log_probs=False (reference forward every step)
  bare         a plain torch loop: reference forward (no_grad), policy forward/backward with
               log_softmax + gather, clip, AdamW, zero_grad
  bare_lean    the bare loop with our chunked log-prob kernel: ours/bare_lean = framework overhead

Step time = start-to-start time of consecutive optimiser steps (data loading, logging, callbacks
included), median over the steps after warm-up. Contenders run in rounds, in a rotated order each
round; a contender's step time is that median in its quietest round (on a machine shared with
other jobs, bursts of load slow whole rounds several-fold), and the ratios are ratios of those.
The per-round table and the median of per-round ratios are printed too. Peak memory: each contender again in a fresh subprocess (CUDA: peak
allocated; CPU: peak RSS above the process before its models were built, sampled every ms).
Also: estimator scoring throughput (tisdpo.weights.scoring.response_logps) vs a bare no-grad forward,
and the one-off cost of the reference-cache pass. The last line is machine-readable:

    ours/trl=<r> ours/bare=<r> cached/trl=<r> peak_mb_cached=<m> peak_mb_uncached=<m>
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CONTENDERS = ("ours", "ours_cached", "trl", "bare", "bare_lean")
EXTRA_CONTENDERS = ("ours_standard",)  # --contenders ...,ours_standard: ours without shared-prefix packing


# ----------------------------------------------------------------------------- setup
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per optimiser step")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence (prompt + response)")
    p.add_argument("--prompt-length", type=int, default=None, help="default length // 2")
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--precision", default="auto", help="auto (bf16-mixed where supported, else 32-true) | 32-true | bf16-mixed")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing for every contender")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping (TRL's max_grad_norm default)")
    p.add_argument("--chunk", type=int, default=256, help="our logits_chunk_size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--no-trl", action="store_true", help="skip TRL even if installed")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-scoring", action="store_true", help="skip the estimator scoring throughput")
    p.add_argument("--quick", action="store_true", help="2 x 128 model, 4 pairs x 64 tokens, 1 round")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this file")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory of one contender
    p.add_argument("--probe-logps", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.pairs, args.length = 2, 128, 4, 64
        args.steps, args.warmup, args.rounds = min(args.steps, 4), min(args.warmup, 2), 1
    args.intermediate = args.intermediate or 4 * args.hidden
    args.prompt_length = args.prompt_length or args.length // 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "bf16-mixed" if bf16_supported(args.device) else "32-true"
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def bf16_supported(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:  # oneDNN's native bf16 (avx512_bf16 / AMX); without it CPU bf16 is emulated and slower than fp32
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001
        return False


def have_trl() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def make_tokenizer(vocab: int):
    """A word-level tokenizer w4..w{vocab-1}; ids 0-3 are <pad>, <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab)}}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_data(args, n_batches: int):
    """Random pairs of exactly `length` tokens: (TRL text rows, our tokenised examples), the same ids."""
    g = torch.Generator().manual_seed(1234)
    n = args.pairs * n_batches
    response = args.length - args.prompt_length - 1  # + EOS
    rows, examples = [], []
    for i in range(n):
        ids = torch.randint(4, args.vocab, (args.prompt_length + 2 * response,), generator=g).tolist()
        prompt, chosen, rejected = ids[: args.prompt_length], ids[args.prompt_length:][:response], ids[-response:]
        text = lambda t: " ".join(f"w{x}" for x in t)  # noqa: E731
        rows.append({"prompt": text(prompt), "chosen": " " + text(chosen) + " </s>", "rejected": " " + text(rejected) + " </s>"})
        example = {"prompt_input_ids": prompt, "index": i}
        for side, resp in (("chosen", chosen), ("rejected", rejected)):
            example[f"{side}_input_ids"] = prompt + resp + [2]
            example[f"{side}_labels"] = [-100] * len(prompt) + resp + [2]
        examples.append(example)
    return rows, examples


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.length, 128), tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model


def fresh_policy(args, init_state):
    model = make_model(args)
    model.load_state_dict(init_state)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(args.device).train()


def frozen(model):
    from tisdpo.models.loading import frozen_copy

    reference = frozen_copy(model)
    if getattr(reference, "is_gradient_checkpointing", False):
        reference.gradient_checkpointing_disable()
    return reference


def autocast(args):
    enabled = args.precision.startswith("bf16")
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=enabled)


def adamw(params, args):
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=True)  # TRL's default optimiser


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def median_after_warmup(times: list[float], warmup: int) -> float:
    kept = times[warmup:] or times[-1:]
    return statistics.median(kept)


# ----------------------------------------------------------------------------- contenders
def run_ours(args, init_state, examples, tokenizer, *, cached: bool, logps=None, n_steps: int,
             shared_prefix: bool | None = None) -> list[float]:
    """PreferenceModule (DPO) under the Lightning Trainer built from conf/trainer, like train_stage."""
    import lightning as L
    from omegaconf import OmegaConf

    from tisdpo.losses import dpo_loss
    from tisdpo.modules.preference import LossSpec, PreferenceModule
    from tisdpo.pipeline.loaders import build_trainer, preference_loader
    from tisdpo.pipeline.reference_cache import attach_reference_logps

    policy = fresh_policy(args, init_state)
    reference = None if cached else frozen(policy)
    if cached:
        examples = attach_reference_logps(examples, logps)
    optim = OmegaConf.create({
        "lr": args.lr, "warmup_steps": 0, "schedule": "constant",
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": args.lr, "weight_decay": 0.0, "fused": True},
    })
    spec = LossSpec("dpo", functools.partial(dpo_loss, beta=0.1))
    cfg = run_config(args)
    module = PreferenceModule(
        policy, reference, spec, optim, total_steps=n_steps, logits_chunk_size=args.chunk,
        check_finite=bool(cfg.train.check_finite), pad_token_id=tokenizer.pad_token_id,
        shared_prefix=bool(cfg.train.shared_prefix) if shared_prefix is None else shared_prefix,
    )
    loader = preference_loader(examples, tokenizer, args.pairs, shuffle=False, seed=0)
    timer = _LightningTimer(args)
    trainer = build_trainer(
        cfg.trainer, max_steps=n_steps, logger=False, callbacks=[timer], enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, precision=args.precision,
        gradient_clip_val=args.clip, inference_mode=False, num_sanity_val_steps=0,
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


class _LightningTimer:
    def __new__(cls, args):
        from lightning.pytorch.callbacks import Callback

        class Timer(Callback):
            def __init__(self):
                self.starts, self.end = [], None

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                sync(args)
                self.starts.append(time.perf_counter())

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                sync(args)
                self.end = time.perf_counter()

            def durations(self):
                marks = self.starts + [self.end]
                return [b - a for a, b in zip(marks[:-1], marks[1:])]

        return Timer()


def run_trl(args, init_state, rows, tokenizer, *, n_steps: int, precompute: bool = False) -> list[float]:
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

    policy = fresh_policy(args, init_state)
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


def run_bare(args, init_state, examples, tokenizer, *, n_steps: int, lean: bool) -> list[float]:
    """The same work with no framework: what one would write by hand."""
    import torch.nn.functional as F

    from tisdpo.data.collate import PreferenceCollator
    from tisdpo.losses.logprobs import token_logps

    policy = fresh_policy(args, init_state)
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


def reference_pass(args, init_state, examples, tokenizer):
    """The reference-cache pass (what the pipeline stores once): (log-probs, seconds)."""
    from tisdpo.pipeline.reference_cache import compute_reference_logps

    reference = frozen(fresh_policy(args, init_state))
    sync(args)
    start = time.perf_counter()
    logps = compute_reference_logps(reference, examples, tokenizer.pad_token_id, batch_size=64, chunk_size=args.chunk,
                                    precision=args.precision, device=args.device)
    sync(args)
    return logps, time.perf_counter() - start


def scoring_throughput(args, init_state, examples, tokenizer, reps: int = 6) -> dict[str, float]:
    """Estimator scoring (response_logps: forward + log-probs + ragged split) vs a bare no-grad forward."""
    from tisdpo.data.collate import PreferenceCollator
    from tisdpo.weights.scoring import response_logps

    model = frozen(fresh_policy(args, init_state))
    tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
    batch_size = 64
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batches = [collate(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]

    def bare():
        with torch.no_grad(), autocast(args):
            for b in batches:
                ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]]).to(args.device)
                attention = torch.cat([b["chosen_attention_mask"], b["rejected_attention_mask"]]).to(args.device)
                model(input_ids=ids, attention_mask=attention, use_cache=False).logits.sum().item()

    def scoring():
        with autocast(args):
            response_logps(model, examples, tokenizer.pad_token_id, batch_size=batch_size, chunk_size=args.chunk)

    def timed(fn) -> float:
        sync(args)
        start = time.perf_counter()
        fn()
        sync(args)
        return time.perf_counter() - start

    bare(), scoring()  # warm-up
    times = {"bare_forward": [], "scoring": []}
    ratios = []
    for rep in range(reps):  # interleaved, order alternating: a busy moment hits both
        pair = (("bare_forward", bare), ("scoring", scoring))[:: 1 if rep % 2 == 0 else -1]
        got = {name: timed(fn) for name, fn in pair}
        for name, t in got.items():
            times[name].append(t)
        ratios.append(got["bare_forward"] / got["scoring"])
    out = {f"{name}_tokens_per_s": tokens / statistics.median(t) for name, t in times.items()}
    out["scoring/bare_throughput"] = statistics.median(ratios)
    return out


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
    init_state = make_model(args).state_dict()
    logps = torch.load(args.probe_logps) if args.probe_logps else None
    gc.collect()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    with _PeakRSS() as rss:
        base = rss.now()
        run_contender(args.probe, args, init_state, rows, examples, tokenizer, logps, n_steps)
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


# ----------------------------------------------------------------------------- main
def run_contender(name, args, init_state, rows, examples, tokenizer, logps, n_steps) -> list[float]:
    if name == "ours":
        return run_ours(args, init_state, examples, tokenizer, cached=False, n_steps=n_steps)
    if name == "ours_cached":
        return run_ours(args, init_state, examples, tokenizer, cached=True, logps=logps, n_steps=n_steps)
    if name == "ours_standard":  # shared-prefix packing off: the [2B, T] forward
        return run_ours(args, init_state, examples, tokenizer, cached=False, n_steps=n_steps, shared_prefix=False)
    if name == "trl":
        return run_trl(args, init_state, rows, tokenizer, n_steps=n_steps)
    if name == "bare":
        return run_bare(args, init_state, examples, tokenizer, n_steps=n_steps, lean=False)
    if name == "bare_lean":
        return run_bare(args, init_state, examples, tokenizer, n_steps=n_steps, lean=True)
    raise ValueError(f"unknown contender {name!r}")


def quiet():
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import lightning  # noqa: F401  (sets its loggers' levels on import: override them after)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.disable_caching()
    except ImportError:
        pass


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


def fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quiet()
    if args.probe:
        print("PROBE " + json.dumps(probe_memory(args)), flush=True)
        return {}

    contenders = [c for c in args.contenders.split(",") if c]
    if (args.no_trl or not have_trl()) and "trl" in contenders:
        print("TRL not installed (pip install -e '.[bench]') or --no-trl: skipping the TRL contender")
        contenders.remove("trl")
    tokenizer = make_tokenizer(args.vocab)
    n_steps = args.warmup + args.steps
    rows, examples = make_data(args, n_steps)
    init_state = copy.deepcopy(make_model(args).state_dict())
    n_params = sum(t.numel() for t in init_state.values())
    tokens_per_step = 2 * args.pairs * args.length
    print(f"model: Llama {args.layers} x {args.hidden} (ffn {args.intermediate}), vocab {args.vocab}, "
          f"{n_params / 1e6:.2f}M params | {args.pairs} pairs x {args.length} tokens (prompt {args.prompt_length}) | "
          f"{args.precision} | grad ckpt {'on' if args.grad_ckpt else 'off'} | {args.device}, {torch.get_num_threads()} threads | "
          f"torch {torch.__version__}" + (f", trl {__import__('trl').__version__}" if "trl" in contenders else ""))
    print(f"timing: {args.rounds} round(s) x {args.steps} steps after {args.warmup} warm-up, medians; order rotates per round")

    logps, ref_seconds = reference_pass(args, init_state, examples, tokenizer)
    report: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "reference_cache_pass_s": ref_seconds}

    results = []
    for r in range(args.rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        row = {}
        for name in order:
            times = run_contender(name, args, init_state, rows, examples, tokenizer, logps, n_steps)
            row[name] = median_after_warmup(times, args.warmup)
            gc.collect()
        results.append(row)
        print(f"round {r + 1}: " + "  ".join(f"{k} {row[k]:.3f}s" for k in contenders))
    report["rounds"] = results

    print("\nstep time (median step of each contender's quietest round) and throughput")
    for name in contenders:
        t = best_round(results, name)
        spread = max(r[name] for r in results) / t
        report[f"step_s/{name}"] = t
        print(f"  {name:13s} {t:8.3f} s/step   {tokens_per_step / t:9.0f} tokens/s"
              + (f"   (rounds spread x{spread:.1f}: the machine was busy)" if spread > 1.3 else ""))
    ratios = {
        "ours/trl": ratio(results, "ours", "trl"),
        "ours/bare": ratio(results, "ours", "bare"),
        "ours/bare_lean": ratio(results, "ours", "bare_lean"),
        "cached/trl": ratio(results, "ours_cached", "trl"),
        "cached/ours": ratio(results, "ours_cached", "ours"),
        "trl/bare": ratio(results, "trl", "bare"),
        "standard/trl": ratio(results, "ours_standard", "trl"),
        "ours/standard": ratio(results, "ours", "ours_standard"),
        "bare_lean/bare": ratio(results, "bare_lean", "bare"),
    }
    report.update(ratios)
    names = {"ours": "ours", "cached": "ours_cached", "trl": "trl", "bare": "bare", "bare_lean": "bare_lean",
             "standard": "ours_standard"}
    per_round = {k: ratio_per_round(results, *(names[x] for x in k.split("/"))) for k in ratios}
    report.update({f"{k} (median of per-round ratios)": v for k, v in per_round.items()})
    print("ratios of those step times (< 1 = first is faster); in brackets the median of per-round ratios")
    for k, v in ratios.items():
        if v is not None:
            print(f"  {k:15s} {v:.3f}   [{per_round[k]:.3f}]")
    saved = report.get("step_s/ours", 0) - report.get("step_s/ours_cached", 0)
    print(f"reference cache: one pass over {len(examples)} pairs took {ref_seconds:.2f}s "
          f"({2 * len(examples) * args.length / ref_seconds:.0f} tokens/s)"
          + (f"; pays for itself after {ref_seconds / saved:.1f} steps" if saved > 0 else ""))

    if not args.no_scoring:
        scoring = scoring_throughput(args, init_state, examples, tokenizer)
        report.update(scoring)
        print(f"estimator scoring: {scoring['scoring_tokens_per_s']:.0f} tokens/s vs bare forward "
              f"{scoring['bare_forward_tokens_per_s']:.0f} tokens/s (scoring/bare throughput "
              f"{scoring['scoring/bare_throughput']:.3f})")

    memory = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "logps.pt"
            torch.save(logps, path)
            base_argv = [a for a in argv if a not in ("--no-memory",)]
            for name in contenders:
                probe = memory_in_subprocess(name, base_argv, path if name == "ours_cached" else None)
                if probe:
                    memory[name] = probe["peak_mb"]
                    report[f"peak_mb/{name}"] = probe["peak_mb"]
        kind = "CUDA peak allocated" if args.device == "cuda" else "peak RSS above the process before models"
        print(f"peak memory ({kind}): " + "  ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))

    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"ours/trl={fmt(ratios['ours/trl'])} ours/bare={fmt(ratios['ours/bare'])} cached/trl={fmt(ratios['cached/trl'])} "
          f"peak_mb_cached={fmt(memory.get('ours_cached'), 0)} peak_mb_uncached={fmt(memory.get('ours'), 0)}")
    return report


if __name__ == "__main__":
    main()
