"""Norms, the activation and the feed-forward layers.

MPT's `low_precision_layernorm` runs the norm in the autocast dtype (bf16) instead of float32: cheaper, and the
published models were trained that way. Outside autocast it is an ordinary LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.model.config import MPTConfig


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class LayerNorm(nn.LayerNorm):
    """LayerNorm; with `low_precision`, computed in the autocast dtype (MPT's LPLayerNorm)."""

    def __init__(self, dim: int, eps: float, bias: bool, low_precision: bool, device=None):
        super().__init__(dim, eps=eps, bias=bias, device=device)
        self.low_precision = low_precision

    def forward(self, x: Tensor) -> Tensor:
        dtype = _autocast_dtype(x) if self.low_precision else None
        if dtype is None:
            return super().forward(x)
        w = self.weight.to(dtype) if self.weight is not None else None
        b = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, no bias; with `low_precision`, computed in the autocast dtype."""

    def __init__(self, dim: int, eps: float, low_precision: bool, device=None):
        super().__init__()
        self.eps, self.low_precision = eps, low_precision
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        dtype = _autocast_dtype(x) if self.low_precision else None
        if dtype is None:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.rms_norm(x.to(dtype), (x.shape[-1],), self.weight.to(dtype), self.eps)


def build_norm(config: MPTConfig, dim: int, device=None) -> nn.Module:
    low = config.norm_type.startswith("low_precision")
    if config.norm_type.endswith("rmsnorm"):
        return RMSNorm(dim, config.norm_eps, low, device=device)
    return LayerNorm(dim, config.norm_eps, bias=not config.no_bias, low_precision=low, device=device)


ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")


class Activation(nn.Module):
    """The feed-forward activation by name (gelu | gelu_tanh | silu | relu); a module without parameters, so that
    a fast path (smalto/kernels/gelu.py, a fused decode kernel) can read its name or replace it."""

    def __init__(self, name: str):
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        if self.name in ("gelu", "gelu_tanh"):
            return F.gelu(x, approximate="tanh" if self.name == "gelu_tanh" else "none")
        return F.silu(x) if self.name == "silu" else F.relu(x)

    def extra_repr(self) -> str:
        return self.name


def build_activation(config: MPTConfig) -> Activation:
    act = config.ffn_config.ffn_act_fn or {"name": "gelu"}
    name, approx = act.get("name", "gelu"), act.get("approximate", "none")
    if name == "gelu" and approx == "tanh":
        name = "gelu_tanh"
    return Activation(name)


class MPTMLP(nn.Module):
    """up_proj → activation (exact GELU by default) → down_proj."""

    def __init__(self, config: MPTConfig, device=None):
        super().__init__()
        bias, d, f = config.ffn_bias, config.d_model, config.ffn_hidden_size
        self.up_proj = nn.Linear(d, f, bias=bias, device=device)
        self.down_proj = nn.Linear(f, d, bias=bias, device=device)
        self.down_proj._is_residual = True  # type: ignore[assignment]  # init scales it (init.py)
        self.act: nn.Module = build_activation(config)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MPTGLU(MPTMLP):
    """Gated: down_proj(act(gate_proj(x)) * up_proj(x)); SwiGLU when the activation is silu."""

    def __init__(self, config: MPTConfig, device=None):
        super().__init__(config, device)
        self.gate_proj = nn.Linear(
            config.d_model, config.ffn_hidden_size, bias=config.ffn_bias, device=device
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def build_ffn(config: MPTConfig, device=None) -> MPTMLP:
    return (MPTGLU if config.ffn_config.ffn_type == "mptglu" else MPTMLP)(config, device)
