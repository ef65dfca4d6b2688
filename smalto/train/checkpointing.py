"""Activation checkpointing of the transformer blocks: full, every k-th block, or selective (attention kept).

`train.activation_checkpointing` takes
    true         every block keeps only its input; the backward recomputes the whole block
    k (an int)   every k-th block, as true; the others keep all their activations
    selective    every block, as true, except that the attention kernel's outputs (the attention output and what
                 its backward reads: the log-sum-exp statistics) are kept, so the backward's recompute runs the
                 projections, norms and MLP but not attention's forward
    false        none

Selective checkpointing is torch.utils.checkpoint's (`create_selective_checkpoint_contexts` with the list of ops
whose outputs are saved, handed to `checkpoint_wrapper` as `context_fn`). It works in eager mode and inside a
`torch.compile`d block, where the compiler's partitioner saves the listed ops' outputs and recomputes the rest.
The cost is the attention output and its statistics per block: (B, T, H·D) in the activations' dtype plus
(B, H, T) float32, 64 MiB at MPT-7B's width with micro-batch 4 and 2,048 tokens in bf16.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

SELECTIVE = "selective"


def attention_ops() -> list:
    """The attention kernels' forward ops whose outputs selective checkpointing keeps: SDPA's fused kernels (flash
    on CUDA and CPU, memory-efficient, cuDNN), smalto's cuDNN op (smalto/kernels/cudnn_attention.py) and
    FlexAttention's higher-order op. The eager formula has no single op: under `attn_impl: eager` the mode
    recomputes as full checkpointing does."""
    import smalto.kernels.cudnn_attention  # noqa: F401  (registers torch.ops.smalto.cudnn_attention_fwd)

    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    ops: list = [getattr(aten, n).default for n in names if hasattr(aten, n)]
    ops.append(torch.ops.smalto.cudnn_attention_fwd.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.append(flex)
    return ops


def checkpoint_blocks(blocks: nn.ModuleList, mode: bool | int | str, *, preserve_rng_state: bool) -> None:
    """Wrap the blocks `mode` names in place (see the module docstring); `preserve_rng_state` when the block
    draws random numbers (dropout), so the recompute draws the same."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if mode is False:
        return
    if not (mode is True or mode == SELECTIVE or (type(mode) is int and mode >= 1)):
        raise ValueError(f"activation checkpointing {mode!r}: true, false, a positive k or {SELECTIVE!r}")
    kwargs: dict = {"preserve_rng_state": preserve_rng_state}
    if mode == SELECTIVE:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, attention_ops())
    every = mode if type(mode) is int else 1
    for i in range(len(blocks)):
        if i % every == 0:
            blocks[i] = checkpoint_wrapper(blocks[i], **kwargs)
