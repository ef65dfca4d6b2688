"""Optimizers and learning-rate schedules.

`DecoupledLionW` is llm-foundry's: the update is sign(β1·m + (1−β1)·g), the momentum then moves to
β2·m + (1−β2)·g, and the weight decay is "decoupled": p ← p·(1 − wd·lr/peak_lr), i.e. scaled by the schedule but
not by the learning rate itself (so `weight_decay` is a per-step fraction at the peak, unlike lion-pytorch's
p·(1 − lr·wd)). It works on lists of tensors with `torch._foreach_*` (a few kernels per step). Every operation is
elementwise, so under FSDP2 it steps each rank's local shards of parameters, gradients and momentum (DTensors with
the same placements) as plain tensors: no sharding rules needed (torch 2.11's DTensor has none for the out-of-place
`_foreach_lerp`), no collective.

It steps CHUNK_ELEMENTS at a time: the sign(β1·m + (1−β1)·g) it computes needs a temporary as large as its
tensors, which for all of MPT-7B's float32 parameters at once would be 26.6 GB on top of the weights, gradients and
momentum (the whole of MPT-7B's 99 GiB peak on one GPU above their 74 GiB; 82 GiB with chunks).

Schedules are a multiplier of the peak lr as a function of the optimizer step, composer's formulas:
linear warmup from 0, then cosine / linear decay to `alpha_f`, constant, or inverse square root.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from smalto.config import OptimizerConfig, SchedulerConfig, duration_steps
from smalto.errors import ConfigError
from smalto.train.adamw_bf16 import AdamWBf16State, closure_loss, local_shard

# parameters' elements per foreach call: a float32 temporary of 256 MB at most (or of one larger tensor)
CHUNK_ELEMENTS = 1 << 26


def _chunks(sizes: list[int], limit: int) -> list[slice]:
    """Consecutive index ranges whose sizes add up to at most `limit` (a larger single size is a range alone)."""
    out, start, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > limit:
            out.append(slice(start, i))
            start, total = i, 0
        total += n
    if start < len(sizes):
        out.append(slice(start, len(sizes)))
    return out


class DecoupledLionW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ):
        if lr <= 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        for group in self.param_groups:
            # the decay is scaled by lr / initial_lr; schedules change group["lr"] only
            group.setdefault("initial_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            params: list[Tensor] = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [local_shard(p.grad) for p in params if p.grad is not None]
            moms = []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)  # a DTensor like p under FSDP2 (DCP saves it so)
                moms.append(local_shard(state["exp_avg"]))
            params = [local_shard(p) for p in params]
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if wd != 0:
                decay = lr / group["initial_lr"] if group["initial_lr"] else 1.0
                torch._foreach_mul_(params, 1.0 - decay * wd)
            for part in _chunks([p.numel() for p in params], CHUNK_ELEMENTS):
                ps, gs, ms = params[part], grads[part], moms[part]
                update = torch._foreach_lerp(ms, gs, 1.0 - beta1)  # β1·m + (1−β1)·g
                torch._foreach_sign_(update)
                torch._foreach_add_(ps, update, alpha=-lr)
                torch._foreach_lerp_(ms, gs, 1.0 - beta2)
        return loss


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.offload == "cpu":
        from smalto.train.offload import OffloadedState

        if any(isinstance(p, DTensor) for p in params):
            raise ConfigError(
                "optimizer.offload = cpu is for one process; under torchrun FSDP2 already divides the optimizer "
                "state among the GPUs (set optimizer.offload=none)"
            )
        return OffloadedState(_build(params, cfg))
    return _build(params, cfg)


def _build(params: list[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "lion":
        return DecoupledLionW(
            params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay
        )
    if cfg.state_dtype == "bf16":
        return AdamWBf16State(
            params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    on_cuda = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=on_cuda or None,
        foreach=None if on_cuda else True,
    )


class Schedule:
    """lr multiplier by optimizer step; the lengths resolved to steps once."""

    def __init__(self, cfg: SchedulerConfig, *, total_steps: int, tokens_per_step: int):
        self.name, self.alpha_f = cfg.name, cfg.alpha_f
        self.warmup = duration_steps(
            cfg.warmup, "scheduler.warmup", tokens_per_step=tokens_per_step, total_steps=total_steps
        )
        self.t_max = duration_steps(
            cfg.t_max, "scheduler.t_max", tokens_per_step=tokens_per_step, total_steps=total_steps
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.name == "constant":
            return 1.0
        if self.name == "inverse_sqrt":
            return math.sqrt(max(self.warmup, 1) / max(step, self.warmup, 1))
        span = self.t_max - self.warmup
        frac = min(max((step - self.warmup) / span, 0.0), 1.0) if span > 0 else 1.0
        if self.name == "cosine":
            return self.alpha_f + (1.0 - self.alpha_f) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0 + (self.alpha_f - 1.0) * frac  # linear

    def apply(self, optimizer: torch.optim.Optimizer, step: int, peak_lr: float) -> float:
        lr = peak_lr * self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
