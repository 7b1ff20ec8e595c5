"""TI-DPO vs DPO step time on the built-in task's tiny model (the TI-DPO paper reports about 2x).

    python -m bench.tidpo_step [--steps 30] [--batch-size 16] [--threads 1]

All contenders train the same tiny Llama on the same batches with the same optimiser, through
``PreferenceModule.compute`` + backward + AdamW (the Lightning loop adds the same overhead to
each). They run in rounds, in rotated order; every ratio is the median over rounds of the
per-round ratio of median step times, so a shared machine biases none of them.

  dpo               the DPO loss, reference forward each step
  tidpo_weights     weighted DPO with gradient-attribution weights (one extra forward/backward)
  tidpo             + the triplet term with anchors sampled from the policy every step
  tidpo_anchor4     the same with anchors resampled every 4 steps (loss.triplet.anchor_every=4)
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # conf/ lives here; run as `python -m bench.tidpo_step` from the repo root

import torch
from hydra import compose, initialize_config_dir

import tisdpo.resolvers  # noqa: F401
from tisdpo.data.collate import PreferenceCollator
from tisdpo.models.loading import build_model, frozen_copy
from tisdpo.modules.preference import PreferenceModule
from tisdpo.stages.loaders import tokenize_pairs
from tisdpo.losses.registry import bind_loss
from tisdpo.tasks.synthetic import SyntheticTask, SyntheticTaskConfig
from tisdpo.losses.tidpo_triplet import TripletTerm
from tisdpo.weights.gradient import GradientWeights


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def make_module(name: str, tokenizer, model_config: dict, triplet_tokens: int):
    loss = "dpo" if name == "dpo" else "tidpo"
    cfg = compose_cfg([f"loss={loss}"])
    policy = build_model(config=model_config, tokenizer=tokenizer, seed=0)
    kwargs = {}
    if name != "dpo":
        kwargs["online_weights"] = GradientWeights(lam=0.7)
    triplet = None
    if name in ("tidpo", "tidpo_anchor4"):
        triplet = TripletTerm(tokenizer, gamma=0.1, margin=0.1, max_new_tokens=triplet_tokens,
                              anchor_every=4 if name == "tidpo_anchor4" else 1)
    loss_spec = dataclasses.replace(bind_loss(cfg.loss, tokenizer), auxiliary=triplet)
    module = PreferenceModule(policy, frozen_copy(policy), loss_spec, cfg.optim,
                              pad_token_id=tokenizer.pad_token_id, **kwargs)
    module.optimizer = torch.optim.AdamW(module.policy.parameters(), lr=5e-5)
    return module


def time_steps(module, batches, steps: int) -> float:
    times = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        loss, _ = module.compute(batch)
        module.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        module.optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]) if len(times) > 5 else statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anchor-tokens", type=int, default=24, help="max new tokens per anchor (tiny task: 24)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = SyntheticTask(SyntheticTaskConfig(n_train_pairs=args.batch_size * 8))
    tokenizer = task.tokenizer()
    cfg = compose_cfg([])
    examples, _ = tokenize_pairs(task.preference_pairs("train"), tokenizer, cfg.dataset, "train")
    collate = PreferenceCollator(tokenizer.pad_token_id)
    batches = [collate(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    model_config = dict(cfg.model.config)
    names = ["dpo", "tidpo_weights", "tidpo", "tidpo_anchor4"]
    modules = {n: make_module(n, tokenizer, model_config, args.anchor_tokens) for n in names}
    ratios = {n: [] for n in names[1:]}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        times = {n: time_steps(modules[n], batches, args.steps) for n in order}
        for n in names[1:]:
            ratios[n].append(times[n] / times["dpo"])
        print(f"round {round_index}: " + "  ".join(f"{n}={times[n] * 1000:.1f}ms" for n in names), flush=True)
    print("  ".join(f"{n}/dpo={statistics.median(r):.2f}" for n, r in ratios.items()))


if __name__ == "__main__":
    main()
