"""The quantized unembedding (`--quantize-head`, `QuantSpec(head=True)`): the output matrix stored int8 / int4 too.

    QuantHead       an untied `lm_head` quantized: a QuantLinear whose `weight` is the dequantized matrix
    QuantEmbedding  the tied embedding / unembedding quantized: one (vocab, d_model) matrix stored once, quantized;
                    `emb(ids)` dequantizes only the rows it gathers, `emb.logits(h)` runs the quantized linear path
    quantize_head(model, spec, device)   the model's output matrix (and with it a tied embedding) → the above
    quant_head(model)                    the model's QuantHead, or None

The model reads its output matrix as a tensor (`MPTForCausalLM.unembedding`: `F.linear(h, W)` for scoring and
prefill, the loss); for a quantized head that tensor is `weight`, the matrix dequantized on each access, which is
the dequantize-then-multiply path every QuantLinear takes for more than a decode step's rows. The decoders of
`generate` and `serve` call `logits(h)` instead, so a decode step reads the packed bytes (smalto's decode-linear
kernel on CUDA). The matrix's rows are the outputs (one per token) and its columns the inputs (d_model), so the
int4 groups run along d_model, as for every linear layer, and a row of the embedding dequantizes on its own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smalto.quant.formats import QuantSpec, check_shape, dequantize_weight, quantize_weight
from smalto.quant.linear import QuantLinear


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
