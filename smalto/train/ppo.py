"""PPO's objective beside the loop (smalto/ppo.py runs it): the formulas of TRL's PPOTrainer, and the update.

Notation: B rollouts, R response positions (right-padded; `mask` 1 on real response tokens). Per token t:
    rewards[t]    = -kl_coef · (logprob[t] - ref_logprob[t]), plus the scalar score at the last real token
    δ[t]          = rewards[t] + γ · V[t+1] - V[t]             (V past the last token is 0)
    A[t]          = δ[t] + γ · λ · A[t+1]                      (GAE), returns = A + V, then A whitened over the batch
    pg_loss       = mean over tokens of max(-A · ρ, -A · clip(ρ, 1 - ε, 1 + ε)),  ρ = exp(logprob - old_logprob)
    vf_loss       = ½ mean of max((V' - returns)², (clip(V', V - ε_v, V + ε_v) - returns)²)
    loss          = pg_loss + vf_coef · vf_loss
Means are over real tokens of the minibatch (`masked_mean`); whitening uses the unbiased variance, as TRL's
`masked_whiten`. The KL coefficient is fixed, or follows TRL's adaptive controller when `kl_target` is set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from smalto.errors import ConfigError


@dataclass(kw_only=True)
class PPOSection:
    steps: int = 20
    """PPO steps: each samples `batch_size` rollouts, then runs `ppo_epochs` passes over them in minibatches."""
    batch_size: int = 16
    mini_batch_size: int = 4
    ppo_epochs: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    """Sampling temperature of the rollouts; log-probabilities are those of the logits divided by it."""
    kl_coef: float = 0.05
    """Per-token KL penalty to the reference (the initial value when kl_target is set)."""
    kl_target: float | None = None
    """Adaptive KL controller (TRL's adap_kl_ctrl): kl_coef moves toward this KL per rollout."""
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    score_clip: float | None = None
    """Clip the scalar score to [-score_clip, score_clip] before it enters the rewards."""
    grad_clip: float | None = 1.0
    stop_after: int | None = None
    """End this launch (with a checkpoint) after this many steps; relaunching the command continues the run."""

    def __post_init__(self) -> None:
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(
                f"ppo.stop_after = {self.stop_after} must be a positive number of steps or null"
            )
        for key in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, key) < 1:
                raise ConfigError(f"ppo.{key} = {getattr(self, key)} must be ≥ 1")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"ppo.mini_batch_size ({self.mini_batch_size}) must divide ppo.batch_size ({self.batch_size})"
            )
        if not self.temperature > 0:
            raise ConfigError(f"ppo.temperature = {self.temperature} must be > 0 (PPO samples its rollouts)")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"ppo.{key} = {getattr(self, key)} must be in [0, 1]")
        for key in ("cliprange", "cliprange_value", "vf_coef", "kl_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"ppo.{key} = {getattr(self, key)} must not be negative")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ConfigError(f"ppo.kl_target = {self.kl_target} must be > 0 (or null: a fixed kl_coef)")


# ---------------------------------------------------------------- the formulas


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def kl_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """(rewards (B, R), kl (B, R)): the per-token KL penalty, with each row's score added at its last real token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores
    return rewards * mask, kl


def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (B, R) and not whitened: generalised advantage estimation from the last
    position back, with values and rewards zero past each row's end (TRL's compute_advantages)."""
    values, rewards = values * mask, rewards * mask
    R = rewards.shape[1]
    last = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t < R - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, Tensor]:
    """(clipped surrogate loss, clip fraction): the fraction of tokens where the clipped term is the larger."""
    ratio = torch.exp(logprobs - old_logprobs)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return masked_mean(torch.max(loss1, loss2), mask), masked_mean((loss2 > loss1).float(), mask)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, Tensor]:
    """(½ · clipped squared error, clip fraction)."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    loss1, loss2 = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(loss1, loss2), mask), masked_mean((loss2 > loss1).float(), mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) along the last dimension."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class AdaptiveKL:
    """TRL's AdaptiveKLController: coef ·= 1 + clip(KL / target - 1, ±0.2) · n / horizon after each batch of n."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.horizon


# ---------------------------------------------------------------- the update


@dataclass
class Experience:
    """One rollout batch, ready for the update (smalto.train.rollout builds it). Tensors on the model's device."""

    ids: Tensor  # (B, T) prompt + response, right-padded
    positions: Tensor  # (B, R) the position whose logits predict response token j
    targets: Tensor  # (B, R) response tokens
    mask: Tensor  # (B, R) 1.0 on real response tokens
    logprobs: Tensor  # (B, R) the policy's, at sampling time
    values: Tensor  # (B, R)
    advantages: Tensor  # (B, R) whitened
    returns: Tensor  # (B, R)


def response_logprobs(
    logits: Tensor, positions: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """logits (B, T, V) → (log-probabilities of the targets (B, R), the response logits (B, R, V) / temperature)."""
    picked = (
        torch.gather(logits, 1, positions[..., None].expand(-1, -1, logits.shape[-1])).float() / temperature
    )
    return torch.gather(picked.log_softmax(-1), 2, targets[..., None]).squeeze(-1), picked


def ppo_update(
    model: Any,
    optimizer: torch.optim.Optimizer,
    exp: Experience,
    section: PPOSection,
    *,
    autocast: Any,
    generator: torch.Generator,
    params: Sequence[Tensor],
) -> dict[str, float]:
    """`ppo_epochs` passes over `exp` in shuffled minibatches, one optimizer step each; the mean statistics."""
    B = exp.ids.shape[0]
    stats: dict[str, list[Tensor]] = {
        k: [] for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl", "entropy")
    }
    for _ in range(section.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(exp.ids.device)
        for i in range(0, B, section.mini_batch_size):
            mb = order[i : i + section.mini_batch_size]
            with autocast:
                logits, vpred_all = model(exp.ids[mb])
            logprobs, picked = response_logprobs(
                logits, exp.positions[mb], exp.targets[mb], section.temperature
            )
            vpred = torch.gather(vpred_all, 1, exp.positions[mb])
            mask = exp.mask[mb]
            pg, pg_clip = policy_loss(logprobs, exp.logprobs[mb], exp.advantages[mb], mask, section.cliprange)
            vf, vf_clip = value_loss(vpred, exp.values[mb], exp.returns[mb], mask, section.cliprange_value)
            (pg + section.vf_coef * vf).backward()
            clip = section.grad_clip if section.grad_clip is not None else math.inf
            torch.nn.utils.clip_grad_norm_(list(params), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                approx_kl = 0.5 * masked_mean((logprobs - exp.logprobs[mb]) ** 2, mask)
                entropy = masked_mean(entropy_from_logits(picked), mask)
            for k, v in zip(stats, (pg, vf, pg_clip, vf_clip, approx_kl, entropy), strict=True):
                stats[k].append(v.detach())
    means = torch.stack([torch.stack(v).mean() for v in stats.values()]).tolist()  # one host sync
    return {f"ppo/{k}": v for k, v in zip(stats, means, strict=True)}
