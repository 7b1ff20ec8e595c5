"""Estimator scoring throughput vs a bare no-grad forward of the same batches.

    python -m bench.scoring                      # tiny Llama, CPU (or CUDA when present)
    python -m bench.scoring --quick              # smoke run, seconds
    python -m bench.scoring --device cuda --model llama-1b     # the GPU figure (bf16-mixed)

`scoring` is `tisdpo.kernels.scoring.response_logps` (what the TIS-DPO estimators run over the
training set with pi+ and pi-): forward, per-token log-probs of the response labels, the ragged
per-example split, results on the CPU. `bare` is the least any scorer must do: a no-grad forward
of the same batches (chosen and rejected concatenated) with full logits, reduced to one number so
nothing is left queued. Both run under the same autocast. They alternate (order flipping each
repetition) so a burst of load on a shared machine hits both; the ratio printed is the median
of the per-repetition throughput ratios (> 1: scoring is faster than a bare forward, which it can
be: it runs the output head on response positions only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.common import add_model_args, autocast, describe, fmt, make_data, make_model, make_tokenizer, quiet, \
    resolve_model_args, timed

BATCH_SIZE = 64  # conf/estimator/*: score_batch_size


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--examples", type=int, default=None, help="examples scored per repetition (default 2 batches)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="examples per forward (the estimator's score_batch_size)")
    p.add_argument("--chunk", type=int, default=256, help="response_logps' chunk_size")
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 2)
        args.batch_size = min(args.batch_size, 16)
    resolve_model_args(args)
    args.examples = args.examples or 2 * args.batch_size
    return args


def scoring_throughput(args, model, examples, pad_token_id: int, *, batch_size: int, chunk: int,
                       reps: int) -> dict[str, float]:
    """{bare_forward_tokens_per_s, scoring_tokens_per_s, scoring/bare_throughput} for one frozen model."""
    from tisdpo.data.collate import PreferenceCollator, concat_pair
    from tisdpo.kernels.scoring import response_logps

    model.eval()
    tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
    collate = PreferenceCollator(pad_token_id)
    batches = [collate(examples[i: i + batch_size]) for i in range(0, len(examples), batch_size)]

    def bare():
        with torch.no_grad(), autocast(args):
            for b in batches:
                ids, attention = (concat_pair(b, key).to(args.device) for key in ("input_ids", "attention_mask"))
                model(input_ids=ids, attention_mask=attention, use_cache=False).logits.sum().item()

    def scoring():
        with autocast(args):
            response_logps(model, examples, pad_token_id, batch_size=batch_size, chunk_size=chunk)

    bare(), scoring()  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"bare_forward": [], "scoring": []}
    ratios = []
    for rep in range(reps):  # interleaved, order alternating: a busy moment hits both
        pair = (("bare_forward", bare), ("scoring", scoring))[:: 1 if rep % 2 == 0 else -1]
        got = {name: timed(args, fn) for name, fn in pair}
        for name, t in got.items():
            times[name].append(t)
        ratios.append(got["bare_forward"] / got["scoring"])
    out = {f"{name}_tokens_per_s": tokens / statistics.median(t) for name, t in times.items()}
    out["scoring/bare_throughput"] = statistics.median(ratios)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    quiet()
    tokenizer = make_tokenizer(args.vocab)
    n_batches = -(-args.examples // args.pairs)
    _, examples = make_data(args, n_batches)
    examples = examples[: args.examples]
    model = make_model(args)
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"scoring: {describe(args)} | {len(examples)} pairs x {args.length} tokens, batches of {args.batch_size} | "
          f"{args.precision} | {args.device}, {torch.get_num_threads()} threads | {args.reps} repetitions")
    result = scoring_throughput(args, model, examples, tokenizer.pad_token_id, batch_size=args.batch_size,
                                chunk=args.chunk, reps=args.reps)
    result.update(device=args.device, precision=args.precision, model=args.model)
    if args.device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"  bare no-grad forward {result['bare_forward_tokens_per_s']:10.0f} tokens/s")
    print(f"  estimator scoring    {result['scoring_tokens_per_s']:10.0f} tokens/s")
    print(f"scoring/bare={fmt(result['scoring/bare_throughput'])} (throughput ratio, median of per-repetition ratios)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
