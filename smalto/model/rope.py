"""Rotary position embeddings (RoPE) and their frequency scalings, as transformers computes them for LLaMA.

The layout is GPT-NeoX's / HF's `rotate_half` (the two halves of a head rotate together, not interleaved pairs),
the one every HF LLaMA-family checkpoint stores its q/k rows for. `rope_scaling` (`AttnConfig.rope_scaling`,
checked by `config.check_rope_scaling`) changes only the inverse frequencies (and, for yarn, scales cos/sin):
    linear   inv_freq / factor                                    (position interpolation)
    dynamic  theta grows with the longest position once it passes original_max_position_embeddings (NTK-aware)
    llama3   low frequencies / factor, high ones kept, a smooth ramp between (Llama 3.1)
    yarn     interpolation / extrapolation blended per dimension by a ramp; cos and sin × attention_factor
Dynamic is computed per forward from the largest position in it, which is what transformers computes for a fresh
model and for a growing decode (it keeps the largest length it has seen as state; smalto keeps none).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _plain_inv_freq(head_dim: int, theta: float | Tensor, device: torch.device) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def _dynamic_theta(theta: float, s: dict[str, Any], longest: Tensor, head_dim: int) -> Tensor:
    """Dynamic (NTK-aware) scaling's base for a forward whose longest position is `longest` (any shape)."""
    factor, old = s["factor"], s["original_max_position_embeddings"]
    seq = (longest + 1).clamp(min=old).to(torch.float32)
    return theta * ((factor * seq / old) - (factor - 1)) ** (head_dim / (head_dim - 2))


def _llama3(inv: Tensor, s: dict[str, Any]) -> Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def yarn_attention_factor(s: dict[str, Any]) -> float:
    """cos/sin multiplier of yarn: `attention_factor`, else 0.1·ln(factor)+1 (DeepSeek's mscale ratio when given)."""
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = s["factor"]
    if s.get("mscale") and s.get("mscale_all_dim"):
        return mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    return mscale(factor)


def _yarn(head_dim: int, theta: float, s: dict[str, Any], device: torch.device) -> Tensor:
    factor, old = s["factor"], s["original_max_position_embeddings"]
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times over `old`
        return (head_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(
        0, 1
    )
    extrapolate = 1 - ramp  # 1: keep the pretrained frequency, 0: interpolate it by `factor`
    base = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    return (1.0 / (factor * base)) * (1 - extrapolate) + (1.0 / base) * extrapolate


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, pos: Tensor
) -> tuple[Tensor, float]:
    """(inverse frequencies (D/2,), cos/sin multiplier) for queries at positions `pos`."""
    device = pos.device
    kind = scaling["rope_type"] if scaling else None
    if kind is None:
        return _plain_inv_freq(head_dim, theta, device), 1.0
    assert scaling is not None
    if kind == "linear":
        return _plain_inv_freq(head_dim, theta, device) / scaling["factor"], 1.0
    if kind == "dynamic":
        # a tensor, not a host value: a compiled decode step computes it without a sync
        return _plain_inv_freq(head_dim, _dynamic_theta(theta, scaling, pos.max(), head_dim), device), 1.0
    if kind == "llama3":
        return _llama3(_plain_inv_freq(head_dim, theta, device), scaling), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, device), yarn_attention_factor(scaling)
    raise ValueError(f"rope_type {kind!r}")  # an invariant: the config refused it


def rope_cos_sin(
    pos: Tensor, head_dim: int, theta: float, scaling: dict[str, Any] | None = None
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, D) for queries and keys at positions `pos` (T,)."""
    inv, mult = rope_inv_freq(head_dim, theta, scaling, pos)
    freqs = pos.to(torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    if mult == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * mult, emb.sin() * mult


def rope_cos_sin_rows(
    pos: Tensor,
    head_dim: int,
    theta: float,
    scaling: dict[str, Any] | None = None,
    longest: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """cos, sin (N, D) for positions `pos` (N,) of different sequences, each one's scaling computed from the
    longest position of its own forward, `longest` (N,; default: `pos`, one decode query per row), as that
    sequence alone computes it (only dynamic scaling depends on the positions)."""
    if not scaling or scaling["rope_type"] != "dynamic":
        return rope_cos_sin(pos, head_dim, theta, scaling)
    grown = _dynamic_theta(theta, scaling, pos if longest is None else longest, head_dim)  # (N,)
    exps = torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim
    inv = 1.0 / (grown[:, None] ** exps[None, :])  # (N, D/2)
    freqs = pos.to(torch.float32)[:, None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
