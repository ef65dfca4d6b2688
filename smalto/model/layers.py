"""Linear layers, norms, feed-forward layers and the MPT block.

MPT's `low_precision_layernorm` runs the norm in the autocast dtype (bf16) instead of float32: cheaper, and the
published models were trained that way. Outside autocast it is an ordinary LayerNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.model import decode_linear, gelu
from smalto.model.config import MPTConfig

if TYPE_CHECKING:
    from smalto.model.attention import AttentionInputs


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose inference calls on a few rows, as in a decode step on CUDA,
    run smalto/model/decode_linear.py's kernel.

    A decode step also passes the work around the product, which that kernel then does in the same launch:
    `norm` (the block's norm module, applied to x first; fused up to NORM_ROWS rows), `act` (an `Activation`, applied to
    the output) and `residual` (added last). Elsewhere they run as the separate modules and ops they are.

    `weight_lp`, when set, is a low-precision copy of the weight that training's forwards use instead of it
    (smalto/train/weight_cast.py: made once per optimizer step rather than cast by autocast in every forward)."""

    weight_lp: Tensor | None = None

    def forward(
        self,
        x: Tensor,
        norm: nn.Module | None = None,
        act: Activation | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        if self.weight_lp is not None or not decode_linear.supports(x, self.weight):
            w = self.weight if self.weight_lp is None else self.weight_lp
            y = F.linear(norm(x) if norm is not None else x, w, self.bias)
        elif decode_linear.FUSE:
            spec = _fused_norm(norm, x) if norm is not None else None
            if norm is not None and spec is None:
                x = norm(x)
            name = act.name if act is not None else None
            return decode_linear.run(x, self.weight, self.bias, norm=spec, act=name, residual=residual)
        else:
            y = decode_linear.run(norm(x) if norm is not None else x, self.weight, self.bias)
        y = act(y) if act is not None else y
        return y if residual is None else y + residual


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


def _fused_norm(norm: nn.Module, x: Tensor) -> tuple[str, Tensor | None, Tensor | None, float] | None:
    """(kind, weight, bias, eps) for the decode kernel, or None where it does not fuse the norm: more rows than
    `decode_linear.NORM_ROWS`, or weights not in x's dtype (a bf16 model: low precision changes nothing)."""
    if x.numel() // x.shape[-1] > decode_linear.NORM_ROWS:
        return None
    if type(norm) is LayerNorm and norm.weight is not None and norm.weight.dtype == x.dtype:
        return ("layernorm", norm.weight, norm.bias, norm.eps)
    if type(norm) is RMSNorm and norm.weight.dtype == x.dtype:
        return ("rmsnorm", norm.weight, None, norm.eps)
    return None


def build_norm(config: MPTConfig, dim: int, device=None) -> nn.Module:
    low = config.norm_type.startswith("low_precision")
    if config.norm_type.endswith("rmsnorm"):
        return RMSNorm(dim, config.norm_eps, low, device=device)
    return LayerNorm(dim, config.norm_eps, bias=not config.no_bias, low_precision=low, device=device)


class Activation:
    """The feed-forward activation, named so that the decode kernel can apply it in its epilogue. The exact GELU
    of a bf16/fp16 activation takes smalto/model/gelu.py's polynomial erf where a backward will follow (mixed-precision
    training: cheaper kernels, the same function to float32 rounding) and F.gelu elsewhere."""

    def __init__(self, name: str):
        self.name = name  # gelu | gelu_tanh | silu | relu

    def __call__(self, x: Tensor) -> Tensor:
        if self.name == "gelu" and x.dtype in gelu.DTYPES and x.requires_grad and torch.is_grad_enabled():
            return gelu.gelu(x)
        if self.name in ("gelu", "gelu_tanh"):
            return F.gelu(x, approximate="tanh" if self.name == "gelu_tanh" else "none")
        if self.name == "silu":
            return F.silu(x)
        if self.name == "relu":
            return F.relu(x)
        raise ValueError(f"unknown activation {self.name!r}; allowed: gelu, gelu_tanh, silu, relu")


def build_activation(config: MPTConfig) -> Activation:
    act = config.ffn_config.ffn_act_fn or {"name": "gelu"}
    name, approx = act.get("name", "gelu"), act.get("approximate", "none")
    if name == "gelu" and approx == "tanh":
        name = "gelu_tanh"
    return Activation(name)


class MPTMLP(nn.Module):
    """up_proj → activation (exact GELU by default) → down_proj. `norm` / `residual`: see `Linear`."""

    def __init__(self, config: MPTConfig, device=None):
        super().__init__()
        bias, d, f = not config.no_bias, config.d_model, config.ffn_hidden_size
        self.up_proj = Linear(d, f, bias=bias, device=device)
        self.down_proj = Linear(f, d, bias=bias, device=device)
        self.down_proj._is_residual = True  # type: ignore[assignment]
        self.act = build_activation(config)

    def forward(self, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None) -> Tensor:
        return self.down_proj(self.up_proj(x, norm, self.act), residual=residual)


class MPTGLU(MPTMLP):
    """Gated: down_proj(act(gate_proj(x)) * up_proj(x)); SwiGLU when the activation is silu."""

    def __init__(self, config: MPTConfig, device=None):
        super().__init__(config, device)
        self.gate_proj = Linear(
            config.d_model, config.ffn_hidden_size, bias=not config.no_bias, device=device
        )

    def forward(self, x: Tensor, norm: nn.Module | None = None, residual: Tensor | None = None) -> Tensor:
        h = self.act(self.gate_proj(x, norm)) * self.up_proj(x, norm)
        return self.down_proj(h, residual=residual)


class MPTBlock(nn.Module):
    """Pre-norm block: x + attn(norm_1(x)), then x + ffn(norm_2(x))."""

    def __init__(self, config: MPTConfig, layer_idx: int, device=None):
        super().__init__()
        from smalto.model.attention import MPTAttention

        self.layer_idx = layer_idx
        self.norm_1 = build_norm(config, config.d_model, device)
        self.attn = MPTAttention(config, device)
        self.norm_2 = build_norm(config, config.d_model, device)
        ffn_cls = MPTGLU if config.ffn_config.ffn_type == "mptglu" else MPTMLP
        self.ffn = ffn_cls(config, device)
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_ffn_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, inputs: AttentionInputs, cache=None) -> Tensor:
        if self._fuses(x):
            # a decode step: the norms and residual adds go into the linears' kernels (fewer launches)
            x = self.attn(x, inputs, cache, self.layer_idx, norm=self.norm_1, residual=x)
            return self.ffn(x, norm=self.norm_2, residual=x)
        x = x + self.resid_attn_dropout(self.attn(self.norm_1(x), inputs, cache, self.layer_idx))
        return x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))

    def _fuses(self, x: Tensor) -> bool:
        """A decode step on the kernel, with every linear still smalto's own (not wrapped by an adapter library,
        whose extra branch would see x without the norm)."""
        if (
            not decode_linear.FUSE
            or self.training
            or not decode_linear.supports(x, self.attn.out_proj.weight)
        ):
            return False
        ffn = self.ffn
        linears = (
            self.attn.Wqkv,
            self.attn.out_proj,
            ffn.up_proj,
            ffn.down_proj,
            getattr(ffn, "gate_proj", ffn.up_proj),
        )
        return all(type(m) is Linear for m in linears)
