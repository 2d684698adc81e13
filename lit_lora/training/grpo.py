"""Group Relative Policy Optimization and its successors: advantages and losses, each one small function.

Notation, per completion ``i`` of a group of ``G`` completions of the same prompt and per completion token
``t``: ``logp_it`` is the token's log-prob under the policy being trained (the adapter on, logits divided by
the sampling temperature, as they were sampled), ``old_it`` the same under the policy that sampled the
completion (the rollout-time weights), ``ref_it`` under the reference (the base, adapter off),
``m_it`` 1 on the completion's real tokens, ``|o_i| = sum_t m_it``, ``A_i`` the completion's advantage,
``r_it = exp(logp_it - old_it)`` the importance ratio, ``clip(r) = clamp(r, 1 - eps_low, 1 + eps_high)``.

The formulas and their names are those of TRL's ``GRPOTrainer`` (``loss_type``, ``scale_rewards``,
``importance_sampling_level``), so that a run configured alike computes the same loss; the tests compare
advantages, losses and gradients with TRL's own code on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # added to the standard deviation before dividing by it (TRL's constant)


# ------------------------------------------------------------------------------------------ advantages
def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation with Bessel's correction over the non-NaN values (NaN where fewer than two)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    std = variance.sqrt()
    return std if dim is not None else std.reshape(())


@dataclass
class Advantages:
    """Per completion (``(N,)``, ``N = groups * G``, a group's completions adjacent): the advantage, the
    weighted reward (NaN where every reward function said None) and whether the completion's group (or,
    under ``scale_rewards=batch``, the batch) has rewards that all tie."""

    advantages: torch.Tensor
    rewards: torch.Tensor
    std_zero: torch.Tensor


def group_advantages(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: str
) -> Advantages:
    """GRPO's group-relative advantage (Shao et al., 2024, "DeepSeekMath", sec. 4.1.2)::

        R_i = sum_k w_k * R_ik                       (None, NaN here, counts as 0 unless all are None)
        A_i = (R_i - mean_group(R)) / (std(R) + 1e-4)

    ``scale_rewards``: ``group`` divides by the group's standard deviation (the paper), ``batch`` by the
    standard deviation of all ``N`` rewards (Liu et al., 2025, "Understanding R1-Zero-Like Training", who
    show the per-group division biases towards groups with little variance), ``none`` does not divide
    (Dr. GRPO). Means and deviations skip completions whose every reward is None; such completions get
    advantage 0 (they teach nothing).

    ``rewards_per_func`` is ``(N, K)`` float with NaN for None, ``weights`` ``(K,)``.
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None, :]).nansum(dim=1)
    rewards[unscorable] = float("nan")
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # group (and none, where the deviation only tells which groups tie)
        std = nanstd(grouped, dim=1).reshape(-1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    std_zero = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), rewards, std_zero)


# ------------------------------------------------------------------------------------------ per token
def importance_log_weights(
    logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str
) -> torch.Tensor:
    """The log of the importance ratio, per token (PPO, GRPO) or per sequence (GSPO: Zheng et al., 2025,
    "Group Sequence Policy Optimization", eq. 7: the length-normalised sequence ratio)::

        token:     log r_it = logp_it - old_it                               shape (B, T)
        sequence:  log s_i  = sum_t m_it * (logp_it - old_it) / |o_i|        shape (B, 1)
    """
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> torch.Tensor:
    """PPO's clipped objective as a loss (Schulman et al., 2017, eq. 7), with DAPO's decoupled bounds
    ("clip-higher": Yu et al., 2025, eq. 8)::

        l_it = -min(r_it * A_i, clamp(r_it, 1 - eps_low, 1 + eps_high) * A_i)

    ``ratio`` is ``(B, T)`` or ``(B, 1)``; ``advantages`` ``(B,)``."""
    advantages = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate to the reference that GRPO adds (Schulman's "k3", unbiased, >= 0)::

    kl_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


# ------------------------------------------------------------------------------------------ aggregation
def grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO (Shao et al., 2024, eq. 3): each completion's mean over its tokens, then the mean over
    completions: ``L = 1/B * sum_i 1/|o_i| * sum_t m_it * l_it``. Long completions weigh as much as
    short ones, so each of their tokens weighs less (the length bias Dr. GRPO removes)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def bnpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BNPO, batch-normalised (Xiao et al., 2025): the mean over every token of the micro-batch,
    ``L = sum_it m_it * l_it / sum_it m_it``."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def dr_grpo_aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, max_completion_length: int
) -> torch.Tensor:
    """Dr. GRPO (Liu et al., 2025, eq. 3): a constant divisor instead of the lengths,
    ``L = sum_it m_it * l_it / (B * max_completion_length)``: no length bias."""
    return (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)


def dapo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | float) -> torch.Tensor:
    """DAPO's token-level loss (Yu et al., 2025, eq. 8): every token of the whole generation batch
    weighs the same, ``L = sum_it m_it * l_it / sum_{all completions of the step, all ranks} |o_i|``.
    ``tokens`` is that count (scaled by the caller for gradient accumulation and ranks)."""
    return (per_token * mask).sum() / tokens


# ------------------------------------------------------------------------------------------ the loss
@dataclass
class GRPOLoss:
    """The loss (with gradient) and what the metrics report, detached: per-token KL (or None), the
    low / high / either clip indicators (shaped like the ratio)."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor


def grpo_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    loss_type: str,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    use_bias_correction_kl: bool = True,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    dapo_tokens: torch.Tensor | float | None = None,
) -> GRPOLoss:
    """The loss of one micro-batch of completions: ``logps`` / ``old_logps`` / ``ref_logps`` ``(B, T)``
    per completion token (0 past the end), ``mask`` ``(B, T)``, ``advantages`` ``(B,)``.

    ``old_logps`` None: the completions were sampled by the current weights (``num_iterations`` 1), so
    the old policy is ``logps`` detached (ratio 1, gradient ``A * grad logp``). ``beta`` > 0 adds
    ``beta * k3_kl`` per token (needs ``ref_logps``), times the importance ratio when
    ``use_bias_correction_kl`` (DeepSeek-V3.2's correction for completions sampled by the old policy;
    TRL's default, and its ``kl`` metric reports the corrected value). The clipped surrogate plus KL is aggregated by
    ``loss_type`` (:func:`grpo_aggregate`, :func:`bnpo_aggregate`, :func:`dr_grpo_aggregate`,
    :func:`dapo_aggregate`); the value is TRL's before its division for gradient accumulation."""
    old = logps.detach() if old_logps is None else old_logps
    mask = mask.to(logps.dtype)
    ratio = torch.exp(importance_log_weights(logps, old, mask, importance_sampling_level))
    high = epsilon if epsilon_high is None else epsilon_high
    per_token = clipped_surrogate(ratio, advantages, epsilon, high)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("objective.beta > 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        if use_bias_correction_kl:
            kl = kl * ratio  # the ratio keeps its gradient: on-policy its value is 1, its gradient is not
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = grpo_aggregate(per_token, mask)
    elif loss_type == "bnpo":
        loss = bnpo_aggregate(per_token, mask)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type=dr_grpo needs max_completion_length")
        loss = dr_grpo_aggregate(per_token, mask, max_completion_length)
    elif loss_type == "dapo":
        tokens = mask.sum().clamp(min=1.0) if dapo_tokens is None else dapo_tokens
        loss = dapo_aggregate(per_token, mask, tokens)
    else:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    a = advantages[:, None]
    detached = ratio.detach()
    return GRPOLoss(
        loss=loss,
        kl=None if kl is None else kl.detach(),
        low_clipped=((detached < 1 - epsilon) & (a < 0)).float(),
        high_clipped=((detached > 1 + high) & (a > 0)).float(),
    )


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum, count)`` of ``x`` over the mask's tokens (``x`` ``(B, T)``), or over the sequences when ``x``
    is ``(B, 1)`` (sequence-level ratios): the parts of a mean that ranks and micro-batches add up."""
    if x.shape[1] == 1:
        return x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
    m = mask.to(x.dtype)
    return (x * m).sum(), m.sum()
