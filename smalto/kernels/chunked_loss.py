"""The language-model loss without the full logits: the head's matmul and the cross-entropy, a chunk of tokens at a
time.

The plain loss (`smalto.model.mpt.head_loss`) builds the (tokens, vocab) logits, upcasts them to float32 and keeps
them for the backward: at 65,536 tokens and MPT's 50,432-token vocabulary that is 13 GB, and its gradient as much
again. Here each chunk of tokens computes its logits, its loss and, when gradients are wanted, the gradients of the
loss with respect to the chunk's hidden states and the head's weight, then lets the chunk's logits go: the peak is
one chunk's logits (`chunk_bytes`), not all of them. Computing the gradients during the forward costs no extra
matmul (the plain backward does the same two products); the backward only scales them by the incoming gradient,
which is a scalar for a loss.

Only tokens with a target take part: prompt tokens of finetuning data (label -100) skip the head entirely.
Numerics follow the plain loss under autocast: the matmuls in the hidden states' dtype, softmax and cross-entropy in
float32, the weight's gradient accumulated in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 1 << 30
"""Float32 logits of one chunk at most (1 GiB: 5,300 tokens of MPT's vocabulary)."""


def chunked_head_loss(
    h: Tensor,
    weight: Tensor,
    labels: Tensor,
    scale: float | None = None,
    *,
    ignore_index: int = -100,
    chunk_bytes: int = CHUNK_BYTES,
) -> Tensor:
    """Mean next-token cross-entropy of `scale · h @ weightᵀ` against `labels` shifted by one, as `head_loss`.

    h: (batch, seq, d) final hidden states; weight: (vocab, d); labels: (batch, seq) aligned with the inputs.
    With no target at all the loss is 0 (the plain loss gives nan; callers weight a micro-batch by its targets)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    rows = h.reshape(-1, h.shape[-1]).index_select(0, keep)
    chunk = max(1, chunk_bytes // (4 * weight.shape[0]))  # float32 logits (float64: twice)
    return _ChunkedLinearCrossEntropy.apply(rows, weight, targets.index_select(0, keep), scale, chunk)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, rows: Tensor, weight: Tensor, targets: Tensor, scale: float | None, chunk: int
    ) -> Tensor:
        n = rows.shape[0]
        w = weight.to(rows.dtype)
        want_rows, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.empty_like(rows) if want_rows else None
        wide = torch.promote_types(rows.dtype, torch.float32)  # the softmax's dtype: bf16 → float32
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=wide, device=rows.device)
        for start in range(0, n, chunk):
            x, t = rows[start : start + chunk], targets[start : start + chunk]
            logits = (x @ w.T).to(wide)
            if scale is not None:
                logits = logits * scale
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_rows is None and grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one-hot, then through the scale and the matmul
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1.0
            if scale is not None:
                g.mul_(scale)
            g = g.to(rows.dtype)
            if grad_rows is not None:
                grad_rows[start : start + chunk] = g @ w
            if grad_weight is not None:
                grad_weight += g.T @ x
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_rows, grad_weight = ctx.saved_tensors
        s = grad_out / max(ctx.n, 1)
        dr = grad_rows * s.to(grad_rows.dtype) if grad_rows is not None else None
        dw = (grad_weight * s).to(ctx.weight_dtype) if grad_weight is not None else None
        return dr, dw, None, None, None
