"""`QuantLinear`: a linear layer whose weight is stored int8 or packed int4, and `quantize`, which puts it in place
of a model's `nn.Linear`s from outside (the model stays plain).

    quantize(model, spec, device=None)     every linear layer of the blocks → QuantLinear (and the head: spec.head)
    QuantLinear.from_linear(linear, spec)                   one layer

How a QuantLinear computes y = x · ŵᵀ + b (ŵ: the dequantized weight):
  - a few rows (≤ 16, a decode step) on CUDA with Triton: smalto's decode-linear kernel reads the int8 / int4 weight
    and dequantizes it in registers (smalto/kernels/decode_linear.py), so a step reads 1/2 or ~1/4 of the bytes;
  - everything else (prefill, scoring, CPU): ŵ is dequantized into the input's dtype, then one GEMM.
On CUDA without Triton there is no kernel: `check_device` refuses it before a model is loaded (see docs/quantize.md).

The output matrix (the tied embedding / unembedding, 3% of MPT-7B's weights) stays in 16 bits unless the spec
says `head=True` (`--quantize-head`; smalto/quant/head.py).
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.errors import ConfigError
from smalto.kernels import decode_linear
from smalto.quant.formats import QuantSpec, check_shape, dequantize_weight, quantize_weight


class QuantLinear(nn.Module):
    """y = x · ŵᵀ + b with ŵ stored as `qweight` (int8 (N, K) or uint8 (N, K/2)), `scales` and int4's `zeros`.

    Buffers, not parameters: the weights are frozen (inference only). `bias`, when present, stays a 16-bit
    parameter."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        N, K = out_features, in_features
        if spec.format == "int8":
            self.register_buffer("qweight", torch.empty(N, K, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(N, dtype=dtype, device=device))
        else:
            groups = K // spec.group_size
            self.register_buffer("qweight", torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(N, groups, dtype=dtype, device=device))
        if spec.format == "int4" and not spec.symmetric:
            self.register_buffer("zeros", torch.empty(N, K // spec.group_size, dtype=dtype, device=device))
        else:
            self.zeros = None
        self.bias = (
            nn.Parameter(torch.empty(N, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, spec: QuantSpec, name: str = "linear", device: torch.device | None = None
    ) -> QuantLinear:
        """The quantized layer of `linear` (quantized on `device`, default the weight's own)."""
        N, K = linear.weight.shape
        check_shape(spec, name, K)
        w = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        tensors = quantize_weight(w, spec)
        q = cls(K, N, spec, bias=linear.bias is not None, dtype=tensors["scales"].dtype, device="meta")
        for key, t in tensors.items():
            setattr(q, key, t)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)
        return q

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """ŵ, the (out_features, in_features) matrix the stored tensors stand for."""
        return dequantize_weight(self.qweight, self.scales, self.zeros, self.spec, dtype or self.scales.dtype)

    def weight_args(self) -> decode_linear.QuantWeight:
        """What the decode-linear kernel reads instead of a 16-bit weight."""
        return decode_linear.QuantWeight(
            self.spec.format, self.qweight, self.scales, self.zeros, self.spec.group_size, self.in_features
        )

    def forward(self, x: Tensor) -> Tensor:
        q = self.weight_args()
        if decode_linear.supports_quant(x, q):
            return decode_linear.linear(x, q, self.bias)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.describe()}, "
            f"bias={self.bias is not None}"
        )


def linear_names(model: nn.Module) -> list[str]:
    """The names of the `nn.Linear`s of the model's blocks (the head is not one: it is tied to the embedding)."""
    return [
        n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("transformer.blocks.")
    ]


M = TypeVar("M", bound=nn.Module)


def quantize(
    model: M,
    spec: QuantSpec | str,
    *,
    group_size: int = 128,
    symmetric: bool = False,
    device: torch.device | str | None = None,
) -> M:
    """Replace every `nn.Linear` of the model's blocks by a `QuantLinear`, in place, one layer at a time (each
    layer's 16-bit weight is released once its quantized form exists), and with `spec.head` the output matrix by
    a QuantEmbedding / QuantHead (smalto/quant/head.py); returns the model, in eval mode.

    spec: a QuantSpec, or 'int8' / 'int4' with `group_size` and `symmetric`. device: where to quantize and keep
    the quantized layers (default: where each weight is), so a model loaded on the CPU is quantized on the GPU
    that will run it; the model's other tensors are moved there too."""
    if isinstance(spec, str):
        spec = QuantSpec(format=spec, group_size=group_size, symmetric=symmetric)
    already = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if already:
        raise ConfigError(f"the model is already quantized ({already[0]} is a QuantLinear); load it as it is")
    names = linear_names(model)
    modules = dict(model.named_modules())
    for name in names:  # every shape first: refuse before changing anything
        check_shape(spec, name, modules[name].in_features)  # type: ignore[arg-type]
    if spec.head:
        from smalto.quant.head import head_module_name

        head = head_module_name(model)
        check_shape(spec, head, modules[head].weight.shape[1])  # type: ignore[union-attr]
    dev = torch.device(device) if device is not None else None
    for name in names:
        parent, _, attr = name.rpartition(".")
        q = QuantLinear.from_linear(modules[name], spec, name, dev)  # type: ignore[arg-type]
        setattr(modules[parent], attr, q)
        del modules[name]
    if spec.head:
        from smalto.quant.head import quantize_head

        quantize_head(model, spec, dev)
    if dev is not None:
        model.to(dev)
    return model.eval()


def quant_spec_of(model: nn.Module) -> QuantSpec | None:
    """The spec of the model's QuantLinears (None: not quantized)."""
    return next((m.spec for m in model.modules() if isinstance(m, QuantLinear)), None)
