"""bf16 copies of the linears' float32 weights, made once per optimizer step instead of once per micro-batch.

On one device, training runs under bf16 autocast over float32 parameters. Autocast casts every linear weight to
bf16 in every micro-batch's forward, and the backward turns each bf16 weight gradient into a new float32 tensor
that AccumulateGrad then adds to `.grad`: per micro-batch and parameter 6 bytes for the cast, 6 for the gradient's
cast and 12 for the addition. `StepWeightCast` (`train.weight_cast: step`, the default) makes the bf16 copies
once, when the step's first forward starts, as leaves of their own (`StepCastLinear.weight_lp`: training swaps
the model's `nn.Linear`s for this subclass before compiling, `use_step_cast`); a hook adds each copy's
bf16 gradient into the float32 parameter's `.grad` (10 bytes) and drops it. The numbers are the same bit for bit:
the copies are autocast's casts, and the float32 sums are the same sums. It holds 2 bytes per linear parameter for
the step (MPT-1B: 2.3 GiB); `train.weight_cast: micro_batch` keeps autocast's casts for the least memory.

Not used under FSDP2 (world size > 1), which casts to bf16 at each all-gather by its mixed-precision policy.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class StepCastLinear(nn.Linear):
    """nn.Linear (same parameters, names and state dict) whose forward reads `weight_lp`, the step's low-precision
    copy of the weight, while a `StepWeightCast` is active."""

    weight_lp: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight if self.weight_lp is None else self.weight_lp, self.bias)


def use_step_cast(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a `StepCastLinear` in place (parameters, hooks and the init markers
    stay: only the class changes); returns how many. Call it before compiling."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = StepCastLinear
            n += 1
    return n


def _accumulate(param: Tensor, copy: Tensor) -> None:
    """Hook after a copy's gradient is accumulated: add it to the float32 parameter's `.grad`, then drop it."""
    grad, copy.grad = copy.grad, None
    if grad is None:
        return
    if param.grad is None:
        param.grad = grad.to(param.dtype)
    else:
        param.grad.add_(grad)


class StepWeightCast:
    """`with StepWeightCast(model, torch.bfloat16):` around a step's forwards and backwards."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.linears = [
            m for m in model.modules() if isinstance(m, StepCastLinear) and m.weight.requires_grad
        ]
        if not self.linears:
            raise ValueError("no StepCastLinear in the model: apply use_step_cast(model) when building it")

    def __enter__(self) -> StepWeightCast:
        with torch.no_grad():
            for m in self.linears:
                copy = m.weight.to(self.dtype).requires_grad_()
                copy.register_post_accumulate_grad_hook(partial(_accumulate, m.weight))
                m.weight_lp = copy
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.linears:
            m.weight_lp = None


def uses_step_cast(mode: str, *, bf16: bool, world_size: int) -> bool:
    """Whether a run casts once per step: `train.weight_cast: step` on one device with bf16."""
    return mode == "step" and bf16 and world_size == 1
