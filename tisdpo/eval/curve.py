"""The reward-vs-KL curve of a policy during preference training, on the built-in task.

A comparison between methods is a verdict only at matched KL to the reference
(experiments/frontier.py reads this curve). At the steps of :func:`curve_steps`, at the start
(step 0: the SFT policy, KL 0) and at the end, :class:`EvalCurve` samples the policy on a fixed
prompt set at T=1 and records one point::

    {"step", "kl_ref", "true_reward", "safe_rate", "length", "finished_rate",
     "true_reward_per_token", "true_reward_lc", "win_rate", "n_counted", "seconds"}

with the same definitions as the final evaluation (tisdpo/eval/synthetic_metrics.py), on
``n_prompts`` test prompts (the first ones of the final evaluation's set) and the same rule for
unfinished samples; ``win_rate`` and ``true_reward_lc`` compare with the reference model's
samples of the same prompts, drawn once. ``seconds`` is what the point cost.

It must not change training: sampling runs under ``torch.random.fork_rng`` with the same seed at
every point (common random numbers: the points differ by the policy, not by sampling noise), and
the policy's train/eval mode is restored.

The schedule (``eval.curve_schedule``): ``dense_start`` (default) puts points at steps 1, 2, 4, 8,
... (powers of two) below ``every_n_steps`` and then every ``every_n_steps``: KL moves fastest in the
first steps (token-weighted runs about twice as fast as DPO), and a coarse grid plus linear
interpolation biases the faster run at low KL. ``uniform``: every ``every_n_steps`` only (the old
grid). A denser run of the same seed (``eval.every_n_steps=2``) evaluates a superset of the steps
with the same sampling seed, so its points at shared steps are identical and it measures what
interpolation between the default points misses (experiments/credit_check.py). The points live in the callback's checkpoint state, so
a resumed run keeps its curve. ``latest`` holds ``{"eval/curve": [points], "time/curve_s": total}``
for results.json; each point is also logged to the trainer's logger as ``curve/<key>``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from tisdpo.eval.synthetic_metrics import (UNFINISHED_REWARD, add_kl, eval_prompts, reward_standard_error,
                                           sample_and_score, summarize)
from tisdpo.eval.generation import sequence_logps
from tisdpo.eval.optimal_frontier import process_logprob
from tisdpo.models.sharding import gathered_root, is_sharded

log = logging.getLogger(__name__)

#: the metrics of each point, besides ``step`` and ``seconds`` (names as in synthetic_metrics, no prefix);
#: ``true_reward_se`` is the standard error of ``true_reward`` over the point's counted samples
CURVE_METRICS = ("kl_ref", "true_reward", "true_reward_se", "safe_rate", "length", "finished_rate",
                 "true_reward_per_token", "true_reward_lc", "win_rate", "n_counted")
_PREFIX = "curve"
SCHEDULES = ("dense_start", "uniform")


def curve_steps(step: int, every_n_steps: int, schedule: str = "dense_start") -> bool:
    """Is ``step`` (> 0) a curve point? ``dense_start``: a power of two below ``every_n_steps``, or a
    multiple of it; ``uniform``: a multiple of it. (Step 0 and the last step always are.)"""
    if schedule not in SCHEDULES:
        raise ValueError(f"eval.curve_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if step % every_n_steps == 0:
        return True
    return schedule == "dense_start" and 0 < step < every_n_steps and step & (step - 1) == 0


class EvalCurve(L.Callback):
    """Evaluate ``pl_module.policy`` against ``reference`` on the built-in ``task`` during training."""

    def __init__(self, task, tokenizer, reference, *, every_n_steps: int, n_prompts: int = 64, seed: int = 0,
                 max_new_tokens: int, batch_size: int = 64, unfinished: str = "exclude",
                 unfinished_reward: float = UNFINISHED_REWARD, temperature: float = 1.0,
                 schedule: str = "dense_start"):
        if every_n_steps < 1:
            raise ValueError(f"eval.every_n_steps={every_n_steps} must be >= 1 for a curve (0: no curve)")
        self.task, self.tokenizer, self.reference = task, tokenizer, reference
        self.every = int(every_n_steps)
        curve_steps(1, self.every, schedule)  # refuses an unknown schedule now, not at step 1
        self.schedule = schedule
        self.prompts, self.prompt_idx, self.sample_idx = eval_prompts(task, int(n_prompts))
        # A seed of its own, fixed for the run: not the final evaluation's samples, the same at every point.
        self.seed = int(seed) * 1000 + 997
        self.temperature = float(temperature)
        self.gen = dict(max_new_tokens=int(max_new_tokens), batch_size=int(batch_size))
        self.rules = dict(unfinished=unfinished, unfinished_reward=float(unfinished_reward))
        self.points: list[dict[str, Any]] = []
        self.latest: dict[str, Any] = {}
        self._reference_samples: list[dict] | None = None
        self.reference_process: dict[str, float] = {}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(p) for p in self.points]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(p) for p in state_dict.get("points", [])]
        self._publish()

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._point_at(trainer, pl_module)  # step 0 (or the step a resumed run starts from)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if curve_steps(trainer.global_step, self.every, self.schedule):
            self._point_at(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._point_at(trainer, pl_module)  # the final step, whatever every_n_steps

    # ------------------------------------------------------------------ measuring
    def _point_at(self, trainer, pl_module) -> None:
        step = int(trainer.global_step)
        # Under gradient accumulation the step repeats over micro-batches: one point per step.
        if any(p["step"] == step for p in self.points):
            return
        started = time.perf_counter()
        policy = getattr(pl_module, "policy", pl_module)
        # Under FSDP: the module's reference is sharded (train.reference_placement); the policy's root
        # parameters (embeddings, LM head) are gathered for the point, its layers gather in their forwards.
        reference = getattr(pl_module, "reference", None)
        with gathered_root(trainer.strategy.model if is_sharded(policy) else None):
            metrics = self.measure(policy, pl_module.device, reference if is_sharded(reference) else None)
        point = {"step": step, **metrics, "seconds": round(time.perf_counter() - started, 3)}
        self.points.append(point)
        self._publish()
        if trainer.logger:
            trainer.logger.log_metrics({f"{_PREFIX}/{k}": float(v) for k, v in point.items() if k != "step"}, step=step)
        log.info("eval curve step %d: kl_ref %.4f true_reward %.3f safe_rate %.3f (%.1fs)", step,
                 point["kl_ref"], point["true_reward"], point["safe_rate"], point["seconds"])

    def measure(self, policy, device: torch.device | None = None, reference=None) -> dict[str, float]:
        """One point's metrics (no step) for ``policy``, without touching the global RNG state.
        ``reference``: the training module's sharded reference, in place of the callback's own copy."""
        if reference is None:
            reference = self.reference
            if device is not None:
                reference.to(device)  # frozen, unused by training when the reference log-probs are cached
        cuda = [device] if device is not None and device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if self._reference_samples is None:  # the reference is frozen: its samples are drawn once
                self._reference_samples = self._sample(reference)
                self.reference_process = self._reference_vs_process(reference)
            scored = self._sample(policy)
            m = summarize(scored, self._reference_samples, prefix=_PREFIX, **self.rules)
            m[f"{_PREFIX}/true_reward_se"] = reward_standard_error(scored, **self.rules)
            m[f"{_PREFIX}/kl_ref"] = add_kl(scored, policy, reference, self.tokenizer, self.gen["batch_size"])
        return {k: float(m[f"{_PREFIX}/{k}"]) for k in CURVE_METRICS}

    def _reference_vs_process(self, reference) -> dict[str, float]:
        """How far the run's reference (the SFT model) is from the task's generating process p0, which
        ``eval/optimal_frontier`` is exact for: Monte-Carlo KL(reference‖p0) over the reference's finished
        samples inside p0's support, and the share of finished samples inside it."""
        samples = [s for s in self._reference_samples if s["finished"]]
        if not samples:
            return {}
        lp_ref = sequence_logps(reference, self.tokenizer, [s["prompt"] for s in samples],
                                [s["response_ids"] for s in samples], self.gen["batch_size"], append_eos=True)
        lp_p0 = [process_logprob(self.task, s["topic"], s["response"].split()) for s in samples]
        inside = [(a, b) for a, b in zip(lp_ref, lp_p0) if b > float("-inf")]
        return {"eval/reference_process_kl": float(np.mean([a - b for a, b in inside])) if inside else float("nan"),
                "eval/reference_process_support": len(inside) / len(samples)}

    def _sample(self, model) -> list[dict]:
        return sample_and_score(self.task, model, self.tokenizer, self.prompts, temperature=self.temperature,
                                seed=self.seed, prompt_idx=self.prompt_idx, sample_idx=self.sample_idx, **self.gen)

    def _publish(self) -> None:
        points = sorted(self.points, key=lambda p: p["step"])
        self.latest = {"eval/curve": points, "time/curve_s": round(sum(p.get("seconds", 0.0) for p in points), 2),
                       **self.reference_process}


__all__ = ["CURVE_METRICS", "SCHEDULES", "EvalCurve", "curve_steps"]
