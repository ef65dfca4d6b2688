"""FlexAttention: ALiBi as a `score_mod`, the mask as a block mask (fully masked tiles are skipped).

The training kernel for what cuDNN's causal kernel does not take (packed documents, padding, a window, ALiBi bias
max other than 8), and the one `attn_impl: flex` asks for. It compiles one kernel per shape: right for training
(fixed shapes), wrong for inference, whose lengths change with every request, so `select` does not pick it there
unless asked. It has no attention dropout and no backward on CPU; `select` refuses those with the reason.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from smalto.model.attention import AttentionInputs, AttentionKernel, AttentionMask
from smalto.model.config import MPTConfig


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return flex_attention, create_block_mask


@functools.cache
def _compiled_flex():
    flex_attention, _ = _flex()
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask: AttentionMask, n_heads: int):
    """The block mask for FlexAttention (tiles that are fully masked are skipped)."""
    _, create_block_mask = _flex()
    q_pos, window, valid, seq_q, seq_k = mask.q_pos, mask.window, mask.key_valid, mask.seq_q, mask.seq_k
    from_zero = mask.from_zero
    key = (
        (q_pos.numel(), mask.n_keys, window, q_pos.device)
        if from_zero and valid is None and seq_q is None
        else None
    )
    if key is not None and key in _BLOCK_MASKS:  # plain causal (+ window): the same mask every training step
        return _BLOCK_MASKS[key]

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx if from_zero else q_pos[q_idx]
        ok = kv_idx <= q
        if window > 0:
            ok = ok & (q - kv_idx < window)
        if seq_q is not None and seq_k is not None:
            ok = ok & (seq_q[b, q_idx] == seq_k[b, kv_idx])
        if valid is not None:
            ok = ok & (valid[b, kv_idx] | (kv_idx == q))
        return ok

    batch = None if valid is None and seq_q is None else (valid if valid is not None else seq_q).shape[0]  # type: ignore[union-attr]
    block_mask = create_block_mask(
        mask_mod, batch, None, q_pos.numel(), mask.n_keys, device=q_pos.device, _compile=q_pos.is_cuda
    )
    if key is not None:
        _BLOCK_MASKS[key] = block_mask
    return block_mask


_BLOCK_MASKS: dict[tuple, object] = {}


def flex_attention_fn(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, slopes: Tensor | None, scale: float, block_mask
) -> Tensor:
    flex_attention, _ = _flex()
    fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    score_mod = None
    if slopes is not None:
        q_pos, from_zero = mask.q_pos, mask.from_zero

        def score_mod(score, b, h, q_idx, kv_idx):
            q = q_idx if from_zero else q_pos[q_idx]
            return score + slopes[h] * (kv_idx - q).to(score.dtype)

    enable_gqa = q.shape[1] != k.shape[1]
    options = None
    if q.is_cuda and mask.causal_only:
        # plain causal: the kernel may assume every row has a visible key in each tile it visits and that a
        # row's tiles form runs (≈ 4% faster fwd+bwd, bench/bench_attention.py). Windows and documents break
        # both (a row can be fully masked in a window's edge tile): the tests on CUDA fail with these hints on
        options = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
    return fn(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=enable_gqa,
        kernel_options=options,
    )


def _prepare(config: MPTConfig, mask: AttentionMask, slopes: Tensor | None, dtype: torch.dtype):
    return flex_block_mask(mask, config.n_heads)


def _attend(q, k, v, qkv, inputs: AttentionInputs, scale: float, dropout_p: float) -> Tensor:
    return flex_attention_fn(q, k, v, inputs.mask, inputs.slopes, scale, inputs.state)


FLEX = AttentionKernel("flex", _attend, prepare=_prepare)
