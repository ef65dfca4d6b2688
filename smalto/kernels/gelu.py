"""MPT's exact (erf) GELU for bf16 training, with erf as a polynomial: cheaper kernels, the same function.

`F.gelu`'s exact erf costs some 25 float32 instructions an element, so on an H200 its forward and backward kernels
run well above the memory roofline (bench/kernel_probes.py gelu). Abramowitz & Stegun 7.1.26 writes erf as one exp
and a degree-5 polynomial in t = 1/(1 + p·|z|), |error| ≤ 1.5e-7 (a float32 rounding near 1); the backward reuses
the forward's exp(−x²/2) for the density. t is rsqrt(y²) and the exp an exp2: on CUDA one approximate instruction
each, where `1 / y` and `exp` are precise instruction sequences, and at the clock a power-capped training step runs
these kernels are bound by instructions. On bf16 activations a few outputs in 10⁵ differ from F.gelu's, by one bf16
rounding (and in the far lower tail, where F.gelu's 1 + erf cancels and this form does not); the MPT-1B training
step is faster with it (docs/benchmarks.md).

Training with bf16 replaces the MLPs' exact GELU by `PolyGELU` (`use_poly_gelu`, applied from outside like every
fast path), which calls `gelu(x)` on bf16/fp16 activations when autograd will take a backward through them.
Inference keeps F.gelu, so generation and evaluation match transformers' MPT bit for bit, and so does float32 (CPU
training): there the polynomial saves nothing, and inductor's CUDA code for this function's float32 backward
computes wrong gradients on torch 2.11 (eager and the bf16/fp16 code are right; tests/gpu/test_gelu.py checks those
compiled against eager and F.gelu).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.model.layers import MPTMLP, Activation

DTYPES = (torch.bfloat16, torch.float16)  # the activations training takes the polynomial for
SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327
LOG2E = 1.4426950408889634
# Abramowitz & Stegun 7.1.26: erf(z) ≈ 1 − t·(a1 + t·(a2 + t·(a3 + t·(a4 + t·a5))))·exp(−z²), t = 1 / (1 + P·z)
P = 0.3275911
A1, A2, A3, A4, A5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _cdf_and_exp(xf: Tensor) -> tuple[Tensor, Tensor]:
    """Φ(x) = (1 + erf(x/√2)) / 2 and exp(−x²/2), from one exp. The lower tail is Φ(x) = (1 − erf(|x|/√2)) / 2 =
    poly·exp/2 directly, without 1 + erf cancelling (F.gelu rounds GELU(x) to 0 or a few 1e-8 below x ≈ −5.5)."""
    z = xf * SQRT_HALF
    a = z.abs()
    y = 1.0 + P * a
    t = torch.rsqrt(y * y)  # 1/y: on CUDA one approximate instruction, where `1 / y` is a precise division
    e = torch.exp2(-a * a * LOG2E)  # exp(−z²): on CUDA ex2 directly, where exp is libdevice's precise expf
    tail = 0.5 * t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5)))) * e  # Φ(−|x|)
    return torch.where(z < 0, tail, 1.0 - tail), e


def erf(z: Tensor) -> Tensor:
    """erf by the polynomial (|error| ≤ 1.5e-7), in float32 or wider."""
    cdf, _ = _cdf_and_exp(z.to(_compute_dtype(z)) / SQRT_HALF)
    return 2.0 * cdf - 1.0


class _PolyGELU(torch.autograd.Function):
    """forward x·Φ(x); backward gy·(Φ(x) + x·φ(x)), φ(x) = exp(−x²/2)/√(2π). Saves x only, as F.gelu does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        xf = x.to(_compute_dtype(x))
        cdf, _ = _cdf_and_exp(xf)
        return (xf * cdf).to(x.dtype)

    @staticmethod
    def backward(ctx, gy: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        xf = x.to(_compute_dtype(x))
        cdf, e = _cdf_and_exp(xf)
        return (gy.to(xf.dtype) * (cdf + xf * e * INV_SQRT_2PI)).to(gy.dtype)


def gelu(x: Tensor) -> Tensor:
    """The exact GELU x·Φ(x) with the polynomial erf, differentiable (its own backward)."""
    return _PolyGELU.apply(x)


class PolyGELU(nn.Module):
    """The MLP activation for mixed-precision training: `gelu` on bf16/fp16 activations a backward will go
    through, F.gelu elsewhere (inference, float32)."""

    name = "gelu"  # what the decode kernel would read; the same function

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in DTYPES and x.requires_grad and torch.is_grad_enabled():
            return gelu(x)
        return F.gelu(x)


def use_poly_gelu(model: nn.Module) -> int:
    """Replace every exact-GELU activation of `model`'s MLPs by `PolyGELU`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, MPTMLP) and type(m.act) is Activation and m.act.name == "gelu":
            m.act = PolyGELU()
            n += 1
    return n
