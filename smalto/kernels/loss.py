"""The training loss with the float32 upcast fused into the loss kernel.

`causal_lm_loss` upcasts the (tokens, vocab) logits to float32 before the cross-entropy: in bf16 training that
materialises the largest tensor of the step a second time, twice as wide. Compiled, the upcast happens inside
the loss kernel's loads instead. Same function, same value (tests compare them); CUDA only, where inductor
generates the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from smalto.model.mpt import causal_lm_loss

_compiled = None


def fused_causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """`causal_lm_loss`, compiled on CUDA (eager elsewhere, and inside a graph being compiled already)."""
    global _compiled
    if not logits.is_cuda or torch.compiler.is_compiling():
        return causal_lm_loss(logits, labels)
    if _compiled is None:
        _compiled = torch.compile(causal_lm_loss, dynamic=False)
    return _compiled(logits, labels)
