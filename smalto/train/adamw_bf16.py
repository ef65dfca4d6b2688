"""AdamW with its two moments stored in bfloat16: 4 bytes of optimizer state a parameter instead of 8.

For full finetuning on one GPU, where AdamW's float32 moments (54 GB for MPT-7B) are what does not fit. The update
is torch's AdamW (decoupled weight decay p·(1 − lr·wd), bias-corrected moments) computed in float32 from the bf16
moments, which are rounded back after each step; the weights stay float32. Under FSDP2 each rank steps its local
shards (every operation is elementwise).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's shard on this rank (the same storage: in-place ops on it update the DTensor), else t. The
    optimizers' operations are elementwise, so under FSDP2 they step these shards as plain tensors."""
    return t.to_local() if isinstance(t, DTensor) else t


def closure_loss(closure) -> Tensor | None:
    """What `closure` returns, run with gradients on (torch's `Optimizer.step(closure)` protocol); None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamWBf16State(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                w, g = local_shard(p), local_shard(p.grad).float()
                m_store, v_store = local_shard(state["exp_avg"]), local_shard(state["exp_avg_sq"])
                m = m_store.float().lerp_(g, 1.0 - b1)
                v = v_store.float().mul_(b2).addcmul_(g, g, value=1.0 - b2)
                if wd != 0:
                    w.mul_(1.0 - lr * wd)
                denom = (v.sqrt() / math.sqrt(1.0 - b2**t)).add_(eps)
                w.addcdiv_(m, denom, value=-lr / (1.0 - b1**t))
                m_store.copy_(m)
                v_store.copy_(v)
        return loss
