"""The training loss from full logits, with the float32 upcast fused into the loss kernel (`train.loss: full`).

`causal_lm_loss` upcasts the (tokens, vocab) logits to float32 before the cross-entropy: in bf16 training that
materialises the largest tensor of the step a second time, twice as wide. Compiled, the upcast happens inside
the loss kernel's loads instead. Same function, same value (tests compare them); CUDA only, where inductor
generates the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from smalto.kernels.chunked_loss import chunked_head_loss
from smalto.model.mpt import HeadLoss, causal_lm_loss

_compiled = None


def fused_causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """`causal_lm_loss`, compiled on CUDA (eager elsewhere, and inside a graph being compiled already)."""
    global _compiled
    if not logits.is_cuda or torch.compiler.is_compiling():
        return causal_lm_loss(logits, labels)
    if _compiled is None:
        _compiled = torch.compile(causal_lm_loss, dynamic=False)
    return _compiled(logits, labels)


def full_head_loss(h: Tensor, weight: Tensor, labels: Tensor, scale: float | None = None) -> Tensor:
    """`smalto.model.mpt.head_loss` with the fused loss: the full logits, then `fused_causal_lm_loss`."""
    logits = F.linear(h, weight)
    return fused_causal_lm_loss(logits * scale if scale is not None else logits, labels)


FULL_LOGITS_LIMIT = 8 << 30
"""`train.loss: auto` keeps the full logits up to this many bytes of float32 logits per micro-batch: there the full
loss is faster (MPT-1B, 16 × 2,048 tokens, 6.6 GB of logits: 4% faster a step on an H200, docs/benchmarks.md);
above it the chunked loss's memory matters more (65,536 tokens: 13 GB, and as much again for their gradient)."""


def head_loss_for(choice: str, tokens: int, vocab: int) -> HeadLoss:
    """The loss function for `train.loss` (auto | chunked | full) and a micro-batch of `tokens` tokens."""
    if choice == "auto":
        choice = "full" if tokens * vocab * 4 <= FULL_LOGITS_LIMIT else "chunked"
    return chunked_head_loss if choice == "chunked" else full_head_loss
