"""TI-DPO's triplet term: anchors sampled from the current policy, pulled toward y_w and away from y_l.

Anchors y ~ pi_theta(.|x) (top-k/top-p sampling, resampled per example every ``anchor_every``
steps), per-token implicit rewards rho_t = log pi_theta - log pi_ref, and
``tisdpo.losses.triplet_loss`` on (y, y_w, y_l). The term is attached to the loss where the loss is
built (``tisdpo.stages.loss_config``), like KTO's mismatched-pair reference point.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from tisdpo.data.collate import prompt_response_batch
from tisdpo.losses import triplet_loss
from tisdpo.kernels.logprobs import token_logps
from tisdpo.models.sharding import is_sharded


class TripletTerm:
    """gamma * triplet loss on policy-sampled anchors; anchors resampled per example every `anchor_every` steps."""

    def __init__(self, tokenizer, *, gamma: float = 0.1, margin: float = 0.1, anchor_every: int = 1,
                 max_new_tokens: int = 64, top_k: int = 50, top_p: float = 0.95, temperature: float = 0.8,
                 chunk_size: int = 256):
        self.tokenizer = tokenizer
        self.gamma, self.margin, self.anchor_every = gamma, margin, max(1, int(anchor_every))
        self.generation = dict(do_sample=True, top_k=top_k, top_p=top_p, temperature=temperature,
                               max_new_tokens=max_new_tokens)
        self.chunk = chunk_size
        self.anchors: dict[int, tuple[list[int], int]] = {}  # example index -> (anchor ids, step sampled)

    @torch.no_grad()
    def _sample(self, module, batch, rows: list[int]) -> None:
        policy = module.policy
        was_training = policy.training
        policy.eval()
        prompt_ids = batch["prompt_input_ids"][rows]
        prompt_mask = batch["prompt_attention_mask"][rows]
        # Under FSDP every rank must join each forward of generate (their parameters are shards):
        # synced_gpus keeps ranks that finished early stepping until all have.
        out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, pad_token_id=self.tokenizer.pad_token_id,
                              eos_token_id=self.tokenizer.eos_token_id, synced_gpus=is_sharded(policy), **self.generation)
        policy.train(was_training)
        new = out[:, prompt_ids.shape[1]:].tolist()
        for row, tokens in zip(rows, new):
            if self.tokenizer.eos_token_id in tokens:  # keep EOS: chosen/rejected end with it too
                tokens = tokens[: tokens.index(self.tokenizer.eos_token_id) + 1]
            tokens = [t for t in tokens if t != self.tokenizer.pad_token_id] or [self.tokenizer.eos_token_id]
            self.anchors[int(batch["index"][row])] = (tokens, module.global_step)

    def anchor_batch(self, module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = module.global_step
        stale = [i for i, idx in enumerate(batch["index"].tolist())
                 if idx not in self.anchors or step - self.anchors[idx][1] >= self.anchor_every]
        if is_sharded(module.policy) and module.trainer.strategy.reduce_boolean_decision(bool(stale), all=False):
            # generate is collective under FSDP: when any rank samples, every rank does (its whole batch
            # if none of its anchors is stale: they are only refreshed early)
            stale = stale or list(range(len(batch["index"])))
        if stale:
            self._sample(module, batch, stale)
        prompts = [batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
                   for i in range(len(batch["index"]))]
        anchors = [self.anchors[idx][0] for idx in batch["index"].tolist()]
        return prompt_response_batch(prompts, anchors, self.tokenizer.pad_token_id, batch["chosen_input_ids"].device)

    def __call__(self, module, batch, policy_logps, reference_logps, mask) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.gamma == 0:
            return policy_logps.new_zeros(()), {}
        ids, attention, labels = self.anchor_batch(module, batch)
        anchor_policy, anchor_mask = token_logps(module.policy(input_ids=ids, attention_mask=attention, use_cache=False).logits,
                                                 labels, chunk_size=self.chunk)
        with torch.no_grad():
            anchor_reference, _ = token_logps(module.reference(input_ids=ids, attention_mask=attention, use_cache=False).logits,
                                              labels, chunk_size=self.chunk)
        half = batch["chosen_input_ids"].shape[0]
        loss = triplet_loss(
            anchor_policy, anchor_reference, anchor_mask.to(anchor_policy.dtype),
            policy_logps[:half], reference_logps[:half], mask[:half],
            policy_logps[half:], reference_logps[half:], mask[half:],
            margin=self.margin,
        )
        return self.gamma * loss, {"triplet/loss": loss.detach(), "triplet/anchor_length": anchor_mask.sum(-1).float().mean()}


def build_triplet(triplet_cfg: DictConfig, tokenizer, chunk_size: int = 256) -> TripletTerm:
    """The triplet term from the ``loss.triplet`` node (loss=tidpo)."""
    t = triplet_cfg
    return TripletTerm(
        tokenizer, gamma=float(t.gamma), margin=float(t.margin), anchor_every=int(t.anchor_every),
        max_new_tokens=int(t.max_new_tokens), top_k=int(t.top_k), top_p=float(t.top_p),
        temperature=float(t.temperature), chunk_size=chunk_size,
    )
