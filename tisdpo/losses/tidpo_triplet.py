"""TI-DPO's triplet term: anchors sampled from the current policy, pulled toward y_w and away from y_l.

Anchors y ~ pi_theta(.|x) (top-k/top-p sampling, resampled per example every ``anchor_every``
steps), per-token implicit rewards rho_t = log pi_theta - log pi_ref, and
``tisdpo.losses.triplet_loss`` on (y, y_w, y_l). The term is attached to the loss where the loss is
bound (``RECORD.auxiliary`` of ``tisdpo/losses/tidpo.py``), like KTO's mismatched-pair reference point.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tisdpo.data.collate import prompt_response_batch
from tisdpo.kernels.logprobs import head_token_logps, token_logps
from tisdpo.kernels.scoring import chunked_head, last_hidden
from tisdpo.losses._common import check_same_shape
from tisdpo.losses.record import StepContext
from tisdpo.models.sharding import is_sharded


def _left_align(x: torch.Tensor, mask: torch.Tensor):
    """Move each row's valid entries to the front (order kept), zeros after; also return counts.

    Makes "response position t" well defined whatever the padding layout of the caller.
    """
    m = mask.bool()
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
    return (x * m).gather(1, order), m.sum(1)


def _distance(rho_a, n_a, rho_b, n_b):
    """d(a, b) = Σ_{t < min(n_a, n_b)} (ρ_t(a) − ρ_t(b))²  -> [B]."""
    length = min(rho_a.shape[1], rho_b.shape[1])
    t = torch.arange(length, device=rho_a.device)
    common = t[None, :] < torch.minimum(n_a, n_b)[:, None]
    diff = rho_a[:, :length] - rho_b[:, :length]
    return (diff.square() * common).sum(-1)


def triplet_loss(anchor_policy_logps, anchor_reference_logps, anchor_mask,
                 chosen_policy_logps, chosen_reference_logps, chosen_mask,
                 rejected_policy_logps, rejected_reference_logps, rejected_mask, *,
                 margin: float = 0.1, reduction: str = "mean"):
    """TI-DPO triplet term.

        ρ_t(y)   = log π_θ(y_t|x,y_<t) − log π_ref(y_t|x,y_<t)          (per-token implicit reward)
        d(a, b)  = Σ_{t < min(|a|, |b|)} (ρ_t(a) − ρ_t(b))²             (positions present in both)
        L        = mean_i max(0, d(y, y_w) − d(y, y_l) + margin)

    y is the anchor sampled from the current policy, y_w / y_l the chosen / rejected responses.
    Position t is the t-th *valid* token of each response (found from the masks), so any
    padding layout works; the three inputs may have different T. Gradients flow through all
    three sequences. reduction="none" returns the per-example hinge [B].
    """
    check_same_shape("anchor_policy_logps", anchor_policy_logps,
                     anchor_reference_logps=anchor_reference_logps, anchor_mask=anchor_mask)
    check_same_shape("chosen_policy_logps", chosen_policy_logps,
                     chosen_reference_logps=chosen_reference_logps, chosen_mask=chosen_mask)
    check_same_shape("rejected_policy_logps", rejected_policy_logps,
                     rejected_reference_logps=rejected_reference_logps,
                     rejected_mask=rejected_mask)
    b = anchor_policy_logps.shape[0]
    for name, t in (("chosen_policy_logps", chosen_policy_logps),
                    ("rejected_policy_logps", rejected_policy_logps)):
        if t.shape[0] != b:
            raise ValueError(f"{name} has batch size {t.shape[0]}, expected {b} "
                             f"(that of anchor_policy_logps)")
    rho_a, n_a = _left_align(anchor_policy_logps - anchor_reference_logps, anchor_mask)
    rho_w, n_w = _left_align(chosen_policy_logps - chosen_reference_logps, chosen_mask)
    rho_l, n_l = _left_align(rejected_policy_logps - rejected_reference_logps, rejected_mask)
    hinge = F.relu(_distance(rho_a, n_a, rho_w, n_w) - _distance(rho_a, n_a, rho_l, n_l) + margin)
    if reduction == "mean":
        return hinge.mean()
    if reduction == "none":
        return hinge
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


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
        # (split, example index) -> (anchor ids, step sampled). The split is part of the key: training and
        # validation examples number from 0 each, and a validation anchor must never stand in for a
        # training one (validation at step N would otherwise hand its anchors to training step N).
        self.anchors: dict[tuple[str, int], tuple[list[int], int]] = {}

    @staticmethod
    def _keys(ctx: StepContext) -> list[tuple[str, int]]:
        split = "train" if ctx.policy.training else "val"  # Lightning puts the module in eval mode to validate
        return [(split, int(i)) for i in ctx.batch["index"].tolist()]

    @torch.no_grad()
    def _sample(self, ctx: StepContext, rows: list[int]) -> None:
        policy, batch = ctx.policy, ctx.batch
        keys = self._keys(ctx)
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
            self.anchors[keys[row]] = (anchor_tokens(tokens, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id),
                                       ctx.step)

    def anchor_batch(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step, batch = ctx.step, ctx.batch
        keys = self._keys(ctx)
        stale = [i for i, key in enumerate(keys) if key not in self.anchors or step - self.anchors[key][1] >= self.anchor_every]
        if is_sharded(ctx.policy) and ctx.strategy.reduce_boolean_decision(bool(stale), all=False):
            # generate is collective under FSDP: when any rank samples, every rank does (its whole batch
            # if none of its anchors is stale: they are only refreshed early)
            stale = stale or list(range(len(batch["index"])))
        if stale:
            self._sample(ctx, stale)
        prompts = [batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
                   for i in range(len(batch["index"]))]
        anchors = [self.anchors[key][0] for key in keys]
        return prompt_response_batch(prompts, anchors, self.tokenizer.pad_token_id, batch["chosen_input_ids"].device)

    def _logps(self, model, ids, attention, labels):
        """The anchors' per-token log-probs; through the output head in chunks where the model allows
        it (no [N, T, V] logits, forward or backward), else from the full logits."""
        head = None if is_sharded(model) else chunked_head(model, ids)
        if head is not None:
            return head_token_logps(last_hidden(model, ids, attention), head, labels, chunk_size=self.chunk)
        return token_logps(model(input_ids=ids, attention_mask=attention, use_cache=False).logits, labels,
                           chunk_size=self.chunk)

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, Any]]:
        policy_logps, reference_logps, mask = ctx.policy_logps, ctx.reference_logps, ctx.mask
        if self.gamma == 0:
            return policy_logps.new_zeros(()), {}
        ids, attention, labels = self.anchor_batch(ctx)
        anchor_policy, anchor_mask = self._logps(ctx.policy, ids, attention, labels)
        with torch.no_grad():
            anchor_reference, _ = self._logps(ctx.reference, ids, attention, labels)
        half = ctx.batch_size
        loss = triplet_loss(
            anchor_policy, anchor_reference, anchor_mask.to(anchor_policy.dtype),
            policy_logps[:half], reference_logps[:half], mask[:half],
            policy_logps[half:], reference_logps[half:], mask[half:],
            margin=self.margin,
        )
        return self.gamma * loss, {"triplet/loss": loss.detach(), "triplet/anchor_length": anchor_mask.sum(-1).float().mean()}


def anchor_tokens(tokens: list[int], eos_token_id: int, pad_token_id: int | None) -> list[int]:
    """A sampled continuation cut after its first EOS, EOS kept (chosen/rejected end with it too),
    padding dropped. The EOS survives when pad == EOS (SmolLM2, Llama with pad = EOS): only the
    tokens before the cut are filtered for padding."""
    if eos_token_id in tokens:
        body = tokens[: tokens.index(eos_token_id)]
        return [t for t in body if t != pad_token_id] + [eos_token_id]
    return [t for t in tokens if t != pad_token_id] or [eos_token_id]


def build_triplet(loss_node: Mapping[str, Any], tokenizer, chunk_size: int = 256) -> TripletTerm | None:
    """The triplet term from the loss node's ``triplet`` (loss=tidpo); None without one (no
    ``loss.triplet``, or gamma = 0: the "w/o triplet loss" ablation, which then needs no reference
    model beyond cached log-probs)."""
    t = loss_node.get("triplet")
    if t is None or float(t["gamma"]) == 0:
        return None
    if tokenizer is None:
        raise ValueError(f"loss={loss_node.get('name')} has a triplet term, which samples anchors: binding it needs the tokenizer")
    return TripletTerm(
        tokenizer, gamma=float(t["gamma"]), margin=float(t["margin"]), anchor_every=int(t["anchor_every"]),
        max_new_tokens=int(t["max_new_tokens"]), top_k=int(t["top_k"]), top_p=float(t["top_p"]),
        temperature=float(t["temperature"]), chunk_size=chunk_size,
    )
