"""GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): group-relative policy optimisation.

Online: each step samples G completions per prompt from the current policy, scores them with a
reward, and normalises the rewards within each prompt's group (no value model). The loss below sees
only per-token tensors of those N = P·G completions; sampling and scoring live in
``tisdpo/modules/grpo.py``. Conventions follow TRL's ``GRPOTrainer`` (loss_type="grpo"): the k3 KL
estimator, the per-sequence 1/|o_i| average, advantages (r − mean)/(std + 1e-4) with the
Bessel-corrected std, and the clip-fraction definitions.
"""
from __future__ import annotations

import torch

from ._common import check_same_shape
from tisdpo import checks
from tisdpo.losses.record import LossRecord


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (outcome supervision, DeepSeekMath §4.1.2).

        Â_{p,g} = (r_{p,g} − mean_g r_{p,·}) / (std_g r_{p,·} + eps)

    rewards [P, G] (P prompts, G completions each) -> [P, G], in the rewards' dtype. The std is the
    Bessel-corrected sample std (torch's default, as TRL); G must be >= 2. A group whose rewards are
    all equal gets advantage 0 for every completion (nothing to learn from it).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [P, G] (prompts x completions per prompt), got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group_advantages needs at least 2 completions per prompt, got G={rewards.shape[1]}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(policy_logps, old_logps, reference_logps, mask, advantages, *, clip_eps: float = 0.2,
              beta: float = 0.04):
    """GRPO loss per completion (DeepSeekMath eq. 3, outcome supervision: Â_{i,t} = Â_i).

        ρ_t  = exp(π_θ − π_old)                                  (per-token probability ratio)
        s_t  = min(ρ_t Â_i, clip(ρ_t, 1 − ε, 1 + ε) Â_i)         (clipped surrogate)
        KL_t = exp(π_ref − π_θ) − (π_ref − π_θ) − 1              (k3 estimator of KL(π_θ‖π_ref), ≥ 0)
        L_i  = −(1/|o_i|) Σ_t mask_t (s_t − β KL_t)              (|o_i| = Σ_t mask_t, at least 1)

    where π_θ, π_old, π_ref are per-token log-probs of the sampled completion o_i. The batch loss
    is the mean of L_i over the N completions (1/G Σ_i of the paper, also over prompts).

    policy_logps, old_logps, reference_logps, mask: [N, T]; advantages: [N]; ε = clip_eps, β = beta.
    ``old_logps`` are the sampling policy's (detached; with one update per sample, TRL's default
    num_iterations=1, they equal π_θ's values and ρ_t = 1, but the gradient is the clipped
    objective's). β = 0 drops the KL term (then ``reference_logps`` only feeds the KL metric).
    Returns (losses [N], kl [N] = (1/|o_i|) Σ_t mask_t KL_t (detached),
    clipped [N] = share of o_i's tokens whose clipped branch is active, i.e. whose gradient is
    cut: ρ_t < 1 − ε with Â_i < 0, or ρ_t > 1 + ε with Â_i > 0 (TRL's clip_ratio)).
    """
    check_same_shape("policy_logps", policy_logps, old_logps=old_logps, reference_logps=reference_logps, mask=mask)
    n = policy_logps.shape[0]
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (n,):
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages has shape {shape}, expected ({n},) (one per completion)")
    m = mask.to(policy_logps.dtype)
    a = advantages.to(policy_logps.dtype)[:, None]
    ratio = torch.exp(policy_logps - old_logps.detach())
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    delta = reference_logps.detach() - policy_logps
    kl = torch.exp(delta) - delta - 1
    per_token = surrogate - beta * kl if beta != 0 else surrogate
    length = m.sum(-1).clamp(min=1.0)
    losses = -(per_token * m).sum(-1) / length
    with torch.no_grad():
        cut = ((ratio < 1 - clip_eps) & (a < 0)) | ((ratio > 1 + clip_eps) & (a > 0))
        clipped = (cut.to(m.dtype) * m).sum(-1) / length
        mean_kl = (kl * m).sum(-1) / length
    return losses, mean_kl, clipped


def check_hparams(cfg) -> None:
    checks.in_range(cfg, "loss.beta", low=0, note="the KL penalty's weight; 0 drops it")
    checks.in_range(cfg, "loss.clip_eps", low=0, low_open=True, high=1, high_open=True,
                    note="the ratio's clip range [1 - eps, 1 + eps]")
    checks.in_range(cfg, "loss.group_size", low=2, integer=True,
                    note="completions per prompt: the advantage is relative to the group")
    checks.in_range(cfg, "loss.temperature", low=0, low_open=True, note="sampling needs a temperature > 0")
    checks.in_range(cfg, "loss.top_k", low=0, integer=True, nullable=True, note="0 or null: off")
    checks.in_range(cfg, "loss.top_p", low=0, high=1, low_open=True, nullable=True, note="null: off")
    checks.in_range(cfg, "loss.max_new_tokens", low=1, integer=True, nullable=True,
                    note="null: the longest training response, EOS included (as the eval stage)")
    checks.in_range(cfg, "loss.advantage_eps", low=0, low_open=True)
    checks.one_of(cfg, "loss.unfinished", ("penalize", "exclude", "keep"))
    checks.in_range(cfg, "loss.unfinished_reward")
    checks.one_of(cfg, "loss.reward", ("auto", "task", "reward_model"))
    reward, dataset = checks.get(cfg, "loss.reward"), checks.get(cfg, "dataset.name")
    if reward == "task" and dataset not in (checks.ABSENT, "synthetic"):
        raise checks.ConfigError(f"loss.reward=task is the built-in task's true reward, and dataset={dataset} has none: "
                                 "use loss.reward=reward_model (or auto)")
    if (reward == "reward_model" or (reward == "auto" and dataset not in (checks.ABSENT, "synthetic"))) \
            and not checks.get(cfg, "loss.reward_model.model_name_or_path"):
        raise checks.ConfigError("GRPO on real data is rewarded by a reward model: set loss.reward_model.model_name_or_path")


# Keys of conf/loss/grpo.yaml that are not arguments of grpo_loss: how the module samples and scores.
CONFIG_KEYS = ("group_size", "temperature", "top_k", "top_p", "max_new_tokens", "advantage_eps", "reward",
               "reward_model", "unfinished", "unfinished_reward")

# pairwise=False: GRPO trains on its own samples of the training prompts, not on preference pairs
# (tisdpo/stages/grpo.py); the reference runs every step (its log-probs on fresh samples).
RECORD = LossRecord(fn=grpo_loss, pairwise=False, check=check_hparams, config_keys=CONFIG_KEYS)
