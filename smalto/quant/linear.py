"""`QuantLinear`: a linear layer whose weight is stored int8 or packed int4, and `quantize`, which puts it in place
of a model's `nn.Linear`s from outside (the model stays plain).

    quantize(model, spec, device=None)      every linear layer of the blocks → QuantLinear (the head too: spec.head)
    QuantLinear.from_linear(linear, spec)   one layer
    QuantHead, QuantEmbedding               the output matrix quantized (`--quantize-head`), below

How a QuantLinear computes y = x · ŵᵀ + b (ŵ: the dequantized weight):
  - a few rows (≤ 16, a decode step) on CUDA with Triton: smalto's decode-linear kernel reads the int8 / int4 weight
    and dequantizes it in registers (smalto/kernels/decode_linear.py), so a step reads 1/2 or ~1/4 of the bytes;
  - everything else (prefill, scoring, CPU): ŵ is dequantized into the input's dtype, then one GEMM.
On CUDA without Triton there is no kernel: `check_device` refuses it before a model is loaded (see docs/quantize.md).

The output matrix (MPT's tied embedding / unembedding, 3% of MPT-7B's weights) stays in 16 bits unless the spec
says `head=True`. Then a tied matrix becomes a QuantEmbedding, stored once, quantized: `emb(ids)` dequantizes only
the rows it gathers, `emb.logits(h)` is the quantized linear path; an untied lm_head becomes a QuantHead. The model
reads its output matrix as a tensor (`MPTForCausalLM.unembedding`: `F.linear(h, W)` for scoring and prefill, the
loss); for a quantized head that tensor is `weight`, the matrix dequantized on each access, the
dequantize-then-multiply path every QuantLinear takes beyond a decode step's rows. The decoders of `generate` and
`serve` call `logits(h)` instead (`quant_head(model)`), so a decode step reads the packed bytes. The matrix's rows
are the outputs (one per token), its columns the inputs (d_model): int4 groups run along d_model, and a row of the
embedding dequantizes on its own.
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


class QuantHead(QuantLinear):
    """A quantized output layer: `logits(h)` is the quantized linear path, `weight` the dequantized matrix (for
    code that reads the model's unembedding as a tensor)."""

    @property
    def weight(self) -> Tensor:
        return self.dequantize()

    def logits(self, h: Tensor) -> Tensor:
        return QuantLinear.forward(self, h)


class QuantEmbedding(QuantHead):
    """The tied embedding / unembedding, quantized: a lookup dequantizes the rows it gathers."""

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        """ids (...) → the dequantized rows (..., d_model): the rows of `weight` at ids, bit for bit."""
        flat = ids.reshape(-1)
        rows = dequantize_weight(
            self.qweight[flat],
            self.scales[flat],
            None if self.zeros is None else self.zeros[flat],
            self.spec,
            self.scales.dtype,
        )
        return rows.view(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.spec.describe()}"


def head_module_name(model: nn.Module) -> str:
    """Where the model's output matrix lives: the embedding when tied, else lm_head."""
    return "transformer.wte" if model.config.tie_word_embeddings else "lm_head"  # type: ignore[union-attr]


def quantize_head(model: nn.Module, spec: QuantSpec, device: torch.device | None = None) -> None:
    """Replace the output matrix's module by its quantized form, in place (a tied embedding with it)."""
    name = head_module_name(model)
    parent, _, attr = name.rpartition(".")
    w: Tensor = model.get_submodule(name).weight.detach()  # type: ignore[operator]
    check_shape(spec, name, w.shape[1])
    w = w.to(device) if device is not None else w
    tensors = quantize_weight(w, spec)
    cls = QuantEmbedding if name == "transformer.wte" else QuantHead
    q = cls(w.shape[1], w.shape[0], spec, dtype=tensors["scales"].dtype, device="meta")
    for key, t in tensors.items():
        setattr(q, key, t)
    setattr(model.get_submodule(parent) if parent else model, attr, q)


def head_skeleton(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> None:
    """The quantized head's module on the meta device, in place of the 16-bit one (loading a quantized folder)."""
    name = head_module_name(model)
    parent, _, attr = name.rpartition(".")
    N, K = model.get_submodule(name).weight.shape  # type: ignore[misc]
    cls = QuantEmbedding if name == "transformer.wte" else QuantHead
    setattr(
        model.get_submodule(parent) if parent else model, attr, cls(K, N, spec, dtype=dtype, device="meta")
    )


def quant_head(model: nn.Module) -> QuantHead | None:
    """The model's quantized output layer, or None when its head is 16-bit."""
    m = model.get_submodule(head_module_name(model)) if hasattr(model, "config") else None
    return m if isinstance(m, QuantHead) else None


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
    a QuantEmbedding / QuantHead (below); returns the model, in eval mode.

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
        head = head_module_name(model)
        check_shape(spec, head, modules[head].weight.shape[1])  # type: ignore[union-attr]
    dev = torch.device(device) if device is not None else None
    for name in names:
        parent, _, attr = name.rpartition(".")
        q = QuantLinear.from_linear(modules[name], spec, name, dev)  # type: ignore[arg-type]
        setattr(modules[parent], attr, q)
        del modules[name]
    if spec.head:
        quantize_head(model, spec, dev)
    if dev is not None:
        model.to(dev)
    return model.eval()


def quant_spec_of(model: nn.Module) -> QuantSpec | None:
    """The spec of the model's QuantLinears (None: not quantized)."""
    return next((m.spec for m in model.modules() if isinstance(m, QuantLinear)), None)
