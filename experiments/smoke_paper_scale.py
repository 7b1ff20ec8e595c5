"""Run one job of a table's `scale=paper` config end to end, with tiny stand-ins for what the hub would give.

    python -m experiments.smoke_paper_scale tisdpo_pku_main --method tisdpo_d [--data ../shared/data]
        [--out outputs/smoke_paper_scale] [hydra overrides ...]

`scale=paper` is the papers' setting (7-8B models, the hub datasets, the GPU trainer, RMSprop, the
judges). Nothing can be fetched here, so this swaps in, and only these:
- the policy: a tiny Llama saved with `save_pretrained` (a base model, so the SFT stage runs, as in
  the papers), with the GPT-2 tokenizer from the data folder;
- the judges: a tiny reward model (Harm, Help) and a tiny causal LM (the Llama-Guard prompt);
- the dataset: the local sample of the table's dataset (`../shared/data`);
- step counts and lengths, so that every stage (SFT, weight estimator, preference training,
  validation, sampling, judging) runs a few steps.
Everything else is the paper config as a user would launch it: trainer (`gpu`, bf16-mixed), optimiser,
estimator, loss. Extra overrides go last (e.g. `trainer=cpu` where no GPU is). The run is a real
`python run.py` subprocess; its results.json is printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The local sample of each dataset the paper tables use: (train file, test file or None).
LOCAL_FILES = {
    "pku_saferlhf": ("pku_saferlhf_safer_pairs_5k.json", None),
    "ultrafeedback": ("ultrafeedback_binarized_train_1k.jsonl", "ultrafeedback_binarized_test_200.jsonl"),
    "hh": ("hh_rlhf_harmless_base_test.jsonl.gz", None),
}
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=512)


def compose(overrides: list[str]):
    """The composed config (to read which dataset and estimator the table's paper scale picks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def build_stand_in_models(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """A tiny base policy, a reward model and a guard LM, saved like hub checkpoints with their tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         num_labels=1, **TINY_LLAMA)
    torch.manual_seed(0)
    paths = {"policy": root / "policy", "reward_model": root / "reward_model", "guard": root / "guard"}
    LlamaForCausalLM(config).save_pretrained(paths["policy"])
    LlamaForSequenceClassification(config).save_pretrained(paths["reward_model"])
    LlamaForCausalLM(config).save_pretrained(paths["guard"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths


def local_files(cfg, data: Path) -> tuple[Path, Path | None]:
    """The local sample (train file, test file or None) of the dataset the table uses at paper scale."""
    name = cfg.dataset.name
    if name not in LOCAL_FILES:
        raise SystemExit(f"dataset '{name}': no local sample in {data}; the local samples are for "
                         f"{sorted(LOCAL_FILES)}")
    train_file, test_file = LOCAL_FILES[name]
    return data / train_file, (data / test_file if test_file else None)


def stand_in_overrides(cfg, files: tuple[Path, Path | None], models: dict[str, Path], out: Path) -> list[str]:
    train_file, test_file = files
    overrides = [
        f"model.name_or_path={models['policy']}",
        f"dataset.path={train_file}",
        "dataset.limit=64", "dataset.test_limit=16", "dataset.max_length=128", "dataset.max_prompt_length=64",
        "train.batch_size=4", "train.global_batch_size=8", "train.eval_batch_size=8", "train.max_steps=4",
        "train.val_every_n_steps=2", "checkpoint.every_n_steps=2", "sft.max_steps=4", "sft.batch_size=4",
        "eval.n_prompts=8", "eval.max_new_tokens=16", "eval.batch_size=8",
        f"eval.judges.harm.model_name_or_path={models['reward_model']}",
        f"eval.judges.help.model_name_or_path={models['reward_model']}",
        f"eval.judges.safety.model_name_or_path={models['guard']}", "eval.judges.safety.max_new_tokens=4",
        # the LLM judges (MT-Bench, win rate vs DPO) call an API and read hub question files
        "++eval.mt_bench=null", "++eval.pairwise=null",
        "logger=csv", "trainer.enable_progress_bar=false",
        f"cache.dir={out / 'cache'}", f"hydra.run.dir={out / 'run'}",
    ]
    if test_file:
        overrides.append(f"dataset.test_path={test_file}")
    if "max_steps" in cfg.estimator:  # trained estimators (TIS-DPO S/D): a few steps too
        overrides.append("estimator.max_steps=4")
    return overrides


def main(argv: list[str] | None = None) -> dict:
    """Returns (and prints) the run's scalar results with its wall time and trainer."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="a table's experiment config, e.g. tisdpo_pku_main")
    parser.add_argument("--method", required=True, help="a method config, e.g. tisdpo_d")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "smoke_paper_scale")
    args, extra = parser.parse_known_args(argv)
    out = args.out.resolve()
    data = args.data.resolve()
    if not (data / "gpt2_tokenizer").is_dir():
        raise SystemExit(f"--data {data}: no gpt2_tokenizer folder (the local data samples, ../shared/data)")

    paper = [f"experiment={args.experiment}", "scale=paper", f"method={args.method}"]
    cfg = compose([*paper, *extra])
    files = local_files(cfg, data)
    models = build_stand_in_models(out / "models", data / "gpt2_tokenizer")
    overrides = [*paper, *stand_in_overrides(cfg, files, models, out), *extra]
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "run.py"), *overrides], cwd=REPO, check=True)
    seconds = time.perf_counter() - start
    results = json.loads((out / "run" / "results.json").read_text())
    summary = {"experiment": args.experiment, "method": args.method, "seconds": round(seconds, 1),
               "trainer": f"{cfg.trainer.accelerator} {cfg.trainer.precision}",
               "results": {k: v for k, v in results.items() if isinstance(v, (int, float))}}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
