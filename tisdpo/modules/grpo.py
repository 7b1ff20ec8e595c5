"""GRPO (DeepSeekMath): an online LightningModule that samples from the policy it trains.

One step, on a batch of P prompts (``PromptCollator``: left-padded prompt ids):
1. sample G completions per prompt from the current policy (``generate``: temperature, top-k, top-p;
   each cut after its first EOS with the EOS kept, also when pad == EOS);
2. score each (prompt, completion) with the reward function ``(prompts, responses) -> rewards``;
3. advantages relative to each prompt's group (``losses.grpo.group_advantages``);
4. one forward of the N = P·G prompt+completion rows through the policy (with grad) and the
   reference (no grad), per-token log-probs from ``kernels.logprobs.token_logps``;
5. ``losses.grpo.grpo_loss`` with old log-probs = the policy's, detached (one update per sample:
   TRL's default num_iterations=1; the ratio is 1 but the gradient is the clipped objective's).

Metrics (``train/...``): reward mean/std (over completions) and the mean within-group std, KL (k3,
per token), clip fraction, completion length and share finished with EOS, loss.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch

from tisdpo.data.collate import pad_sequences, prompt_response_batch
from tisdpo.kernels.logprobs import token_logps
from tisdpo.losses.grpo import group_advantages
from tisdpo.losses.record import BoundLoss
from tisdpo.models.sharding import is_sharded
from tisdpo.modules.optim import last_checkpoint_note
from tisdpo.modules.policy import PolicyModule

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[float]]
# A completion cut off at max_new_tokens (no EOS): its reward replaced by unfinished_reward (penalize),
# left out of the loss (exclude: TRL's mask_truncated_completions), or scored as sampled (keep).
UNFINISHED_MODES = ("penalize", "exclude", "keep")


def completion_tokens(tokens: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """A sampled continuation as trained on and scored: cut after its first EOS with that EOS kept
    (the data's responses end with it), so it survives when pad == EOS; and whether an EOS ended it.
    Generate pads only after a row's EOS, so nothing before the cut is padding: a pad token there
    (pad != EOS) was sampled, and stays, as the eval stage scores it (an invalid token).
    An unfinished continuation (no EOS within max_new_tokens) is kept whole, without an EOS."""
    for i, t in enumerate(tokens):
        if int(t) in eos_ids:
            return [int(x) for x in tokens[: i + 1]], True
    return [int(x) for x in tokens], False


class PromptCollator:
    """Batch prompt-only examples ``{"prompt_input_ids", "prompt", "index"}`` -> ``prompt_input_ids``,
    ``prompt_attention_mask`` [P, L] LEFT-padded (for generate), ``index`` [P] and ``prompt``
    (the texts the reward function scores: a list, left alone by Lightning's device transfer)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("PromptCollator: empty batch")
        ids = [list(ex["prompt_input_ids"]) for ex in examples]
        width = max(map(len, ids))
        return {
            "prompt_input_ids": pad_sequences(ids, width, self.pad_token_id, left=True),
            "prompt_attention_mask": pad_sequences([[1] * len(i) for i in ids], width, 0, left=True),
            "index": torch.tensor([int(ex.get("index", -1)) for ex in examples], dtype=torch.long),
            "prompt": [str(ex["prompt"]) for ex in examples],
        }


class GRPOModule(PolicyModule):
    batch_items = "prompts"

    def __init__(
        self,
        policy,
        reference,
        loss: BoundLoss,
        optim_cfg: Any,
        tokenizer,
        reward_fn: RewardFn,
        *,
        group_size: int = 8,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        advantage_eps: float = 1e-4,
        unfinished: str = "keep",
        unfinished_reward: float = -3.0,
        skip_special_tokens: bool = True,
        total_steps: int | None = None,
        logits_chunk_size: int = 256,
        check_finite: bool = True,
    ):
        super().__init__(policy, reference, loss, optim_cfg, total_steps=total_steps,
                         logits_chunk_size=logits_chunk_size, check_finite=check_finite)
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.group_size = int(group_size)
        if self.group_size < 2:
            raise ValueError(f"group_size={group_size}: GRPO's advantages need at least 2 completions per prompt")
        self.generation: dict[str, Any] = dict(do_sample=True, temperature=float(temperature),
                                               top_k=int(top_k) if top_k else 0,  # 0: off (HF's default is 50)
                                               max_new_tokens=int(max_new_tokens))
        if top_p is not None:
            self.generation["top_p"] = float(top_p)
        self.advantage_eps = float(advantage_eps)
        if unfinished not in UNFINISHED_MODES:
            raise ValueError(f"unfinished={unfinished!r} is not one of {', '.join(UNFINISHED_MODES)}")
        self.unfinished = unfinished
        self.unfinished_reward = float(unfinished_reward)
        self.skip_special_tokens = bool(skip_special_tokens)
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    # -- sampling ----------------------------------------------------------------------
    def stop_ids(self) -> set[int]:
        """EOS ids a completion ends at: the tokenizer's and the generation config's."""
        ids = {int(self.tokenizer.eos_token_id)} if self.tokenizer.eos_token_id is not None else set()
        eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None)
        return ids

    @torch.no_grad()
    def sample(self, batch: Mapping[str, Any]) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """(prompt ids, completion ids, finished) for G completions of every prompt, prompt-major."""
        g = self.group_size
        prompt_ids = batch["prompt_input_ids"].repeat_interleave(g, dim=0)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(g, dim=0)
        stops = self.stop_ids()
        was_training = self.policy.training
        self.policy.eval()  # no dropout while sampling
        try:
            # Under FSDP every rank joins each forward of generate (parameters are shards): synced_gpus.
            out = self.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, pad_token_id=self.pad_token_id,
                                       eos_token_id=sorted(stops), synced_gpus=is_sharded(self.policy),
                                       **self.generation)
        finally:
            self.policy.train(was_training)
        if not torch.is_tensor(out):  # GenerateOutput
            out = out.sequences
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        cut = [completion_tokens(row, stops) for row in out[:, prompt_ids.shape[1]:].tolist()]
        return prompts, [c for c, _ in cut], [f for _, f in cut]

    def rewards(self, texts: Sequence[str], completions: list[list[int]], finished: list[bool]) -> torch.Tensor:
        """[N] rewards of the completions (EOS not shown to the reward), prompt-major."""
        stops = self.stop_ids()
        responses = [self.tokenizer.decode([t for t in c if t not in stops], skip_special_tokens=self.skip_special_tokens)
                     for c in completions]
        prompts = [p for p in texts for _ in range(self.group_size)]
        values = [float(r) for r in self.reward_fn(prompts, responses)]
        if len(values) != len(responses):
            raise ValueError(f"the reward function returned {len(values)} rewards for {len(responses)} completions")
        if self.unfinished == "penalize":  # a cut-off completion: scored as loss.unfinished_reward
            values = [v if done else self.unfinished_reward for v, done in zip(values, finished)]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    # -- one step ----------------------------------------------------------------------
    def sequence_logps(self, model, ids, attention, labels) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        return token_logps(logits, labels, chunk_size=self.chunk)

    def compute(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompts, completions, finished = self.sample(batch)
        rewards = self.rewards(batch["prompt"], completions, finished)
        grouped = rewards.view(-1, self.group_size)
        advantages = group_advantages(grouped, self.advantage_eps).reshape(-1)

        ids, attention, labels = prompt_response_batch(prompts, completions, self.pad_token_id, self.device)
        policy_logps, mask = self.sequence_logps(self.policy, ids, attention, labels)
        with torch.no_grad():
            reference_logps, _ = self.sequence_logps(self.reference, ids, attention, labels)
        mask = mask.to(policy_logps.dtype)
        done = torch.tensor(finished, dtype=mask.dtype, device=mask.device)
        if self.unfinished == "exclude":  # TRL's mask_truncated_completions: no loss from a cut-off completion
            mask = mask * done[:, None]
        old_logps = policy_logps.detach()  # one update per sample (num_iterations=1)
        losses, kl, clipped = self.loss.fn(policy_logps, old_logps, reference_logps, mask,
                                           advantages.to(policy_logps.dtype))
        loss = losses.mean()
        lengths = mask.sum(-1)
        metrics = {
            "reward/mean": rewards.mean(),
            "reward/std": rewards.std() if rewards.numel() > 1 else rewards.new_zeros(()),
            "reward/group_std": grouped.std(dim=1).mean(),
            "kl": kl.mean(),
            "clip_ratio": clipped.mean(),
            "completion/length": lengths.mean(),
            "completion/finished": done.mean(),
            "loss": loss.detach(),
        }
        return loss, metrics

    # -- Lightning hooks ---------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self._last_indices = batch["index"]
        loss, metrics = self.compute(batch)
        if self.check_finite and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at step {self.global_step} on prompts {batch['index'].tolist()}; "
                + last_checkpoint_note(self._trainer)
            )
        size = int(batch["index"].shape[0])
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, on_step=True, on_epoch=False, batch_size=size)
        self.log("reward", metrics["reward/mean"], prog_bar=True, logger=False, batch_size=size)
        return loss
