"""A transformer block's decode step with the work around each product inside the decode-linear kernel.

A decode step at batch 1 is bound by launch latency as much as by bandwidth: the norms, the activation and the
residual adds are each a kernel of their own in the plain block. `FusedDecodeBlock` computes the same block with
them folded into the products' launches (smalto/kernels/decode_linear.py): norm_1 into Wqkv, the residual into
out_proj, norm_2 and the activation into up_proj (gate_proj for a GLU), the residual into down_proj. The decoder
builds one per block when it builds its compiled step (`decode_blocks`); the model itself stays plain.

Where a call does not fit the kernel (more rows than `DecodeOptions.linear_rows`, float32, CPU) the block runs
as it is. A block of smalto's `QuantLinear`s (int8 / int4, smalto/quant/) is fused the same way: the kernel reads
the quantized weights. A block whose linears are neither (wrapped by an adapter library) is never fused: the
wrapper's extra work would see x without the norm.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from smalto.kernels import decode_linear
from smalto.kernels.options import DecodeOptions
from smalto.model.attention import AttentionInputs
from smalto.model.layers import MPTGLU, Activation, LayerNorm, RMSNorm
from smalto.model.mpt import MPTBlock, MPTForCausalLM
from smalto.quant.linear import QuantLinear

Block = Callable[[Tensor, AttentionInputs, object], Tensor]


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1]


def weight_of(lin: nn.Module) -> Tensor | decode_linear.QuantWeight:
    """What the kernel reads for a linear layer: its 16-bit weight, or a QuantLinear's stored tensors."""
    return lin.weight_args() if isinstance(lin, QuantLinear) else lin.weight  # type: ignore[return-value]


def fits(x: Tensor, lin: nn.Module, max_rows: int) -> bool:
    """Whether the kernel runs x through this (plain or quantized) linear layer."""
    w = weight_of(lin)
    if isinstance(w, decode_linear.QuantWeight):
        return decode_linear.supports_quant(x, w, max_rows)
    return decode_linear.supports(x, w, max_rows)


def norm_spec(norm: nn.Module, x: Tensor, max_rows: int) -> decode_linear.NormSpec | None:
    """(kind, weight, bias, eps) for the kernel, or None where it does not fold the norm: more rows than
    `max_rows`, or norm weights not in x's dtype (a float32 norm in a bf16 model)."""
    if _rows(x) > max_rows:
        return None
    if type(norm) is LayerNorm and norm.weight is not None and norm.weight.dtype == x.dtype:
        return ("layernorm", norm.weight, norm.bias, norm.eps)
    if type(norm) is RMSNorm and norm.weight.dtype == x.dtype:
        return ("rmsnorm", norm.weight, None, norm.eps)
    return None


class FusedDecodeBlock:
    """`block`'s computation for a decode step, in fewer launches (not a module: it holds no state of its own)."""

    def __init__(self, block: MPTBlock, options: DecodeOptions):
        self.block, self.options = block, options

    def linear(
        self,
        x: Tensor,
        lin: nn.Linear | QuantLinear,
        norm: nn.Module | None = None,
        act: nn.Module | None = None,
        residual: Tensor | None = None,
    ) -> Tensor:
        """act(norm(x) · wᵀ + b) + residual, with as much of it in the kernel as the options allow."""
        o = self.options
        if not o.fuse:
            y = decode_linear.linear(
                norm(x) if norm is not None else x, weight_of(lin), lin.bias, quant_kernel=o.quant_kernel
            )
            y = act(y) if act is not None else y
            return y if residual is None else y + residual
        spec = norm_spec(norm, x, o.norm_rows) if norm is not None else None
        if norm is not None and spec is None:
            x = norm(x)
        name = getattr(act, "name", None) if act is not None else None
        return decode_linear.linear(
            x, weight_of(lin), lin.bias, norm=spec, act=name, residual=residual, quant_kernel=o.quant_kernel
        )

    def __call__(self, x: Tensor, inputs: AttentionInputs, cache=None) -> Tensor:
        b = self.block
        if b.training or not fits(x, b.attn.out_proj, self.options.linear_rows):
            return b(x, inputs, cache)
        qkv = self.linear(x, b.attn.Wqkv, norm=b.norm_1)
        x = self.linear(b.attn.attend(qkv, inputs, cache, b.layer_idx), b.attn.out_proj, residual=x)
        ffn = b.ffn
        if isinstance(ffn, MPTGLU):
            h = ffn.act(self.linear(x, ffn.gate_proj, norm=b.norm_2)) * self.linear(
                x, ffn.up_proj, norm=b.norm_2
            )
        else:
            h = self.linear(x, ffn.up_proj, norm=b.norm_2, act=ffn.act)
        return self.linear(h, ffn.down_proj, residual=x)


def _plain(block: MPTBlock) -> bool:
    linears = [block.attn.Wqkv, block.attn.out_proj, block.ffn.up_proj, block.ffn.down_proj]
    linears += [block.ffn.gate_proj] if isinstance(block.ffn, MPTGLU) else []
    kinds = {type(m) for m in linears}
    return (kinds == {nn.Linear} or kinds == {QuantLinear}) and type(block.ffn.act) is Activation


def decode_blocks(model: MPTForCausalLM, options: DecodeOptions | None) -> list[Block]:
    """What a decode step runs for each block: the fused block where the kernel is built and the options and the
    block allow it, the block itself elsewhere (options None: no kernels)."""
    blocks: list[Block] = list(model.transformer.blocks)
    if options is None or options.linear_rows < 1 or not decode_linear.prepare():
        return blocks
    return [FusedDecodeBlock(b, options) if _plain(b) else b for b in blocks]  # type: ignore[arg-type]
