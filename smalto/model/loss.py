"""The causal-LM loss: mean next-token cross-entropy over the non-ignored targets.

On CUDA the loss is compiled, and written in base 2: `F.cross_entropy`'s softmax costs one libdevice `expf` per
logit (a precise sequence of some ten instructions) in the forward and again in the backward, over (tokens × 50,432)
logits, and at the clock a power-capped training step runs these reductions are bound by instructions, not
memory. exp2 is one instruction; logsumexp(x) = m + log2(Σ 2^((x − m)·log2 e)) / log2 e is the same number to
float32 rounding. Elsewhere (CPU) it is `F.cross_entropy` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOG2E = 1.4426950408889634


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """F.cross_entropy(reduction="mean") of (N, V) logits upcast to float32."""
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def cross_entropy_base2(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """The same loss with the softmax's exponentials as exp2 (what CUDA compiles); NaN when every target is
    ignored, as F.cross_entropy."""
    x = logits.float()
    m = x.detach().amax(dim=-1, keepdim=True)  # any constant per row gives the same logsumexp: no gradient
    lse = m.squeeze(-1) + torch.log2(torch.exp2((x - m) * LOG2E).sum(dim=-1)) / LOG2E
    valid = targets != ignore_index
    picked = x.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    return torch.where(valid, lse - picked, 0.0).sum() / valid.sum()


_compiled = None


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of next-token cross-entropies / number of non-ignored targets; labels are aligned with the inputs.

    The labels are shifted (not the logits: slicing them would copy the largest tensor of the step), and on CUDA
    the float32 upcast is fused into the compiled loss kernels instead of materialising fp32 logits.
    """
    global _compiled
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    if logits.is_cuda and not torch.compiler.is_compiling():
        if _compiled is None:
            _compiled = torch.compile(cross_entropy_base2, dynamic=False)
        return _compiled(flat, targets, ignore_index)
    return cross_entropy(flat, targets, ignore_index)
