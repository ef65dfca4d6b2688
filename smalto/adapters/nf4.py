"""NF4 storage for QLoRA: frozen base linears held in 4-bit NormalFloat, dequantized on the fly for the matmul.

    NF4Linear.from_linear(linear)   one frozen layer: y = x · ŵᵀ (+ b), differentiable in x, never in ŵ
    apply_nf4(model)                every linear of a plain model's blocks → NF4Linear, in place, one at a time
    NF4_CODE                        the 16 NormalFloat values (QLoRA, Dettmers et al. 2023, appendix E)

The format (QLoRA §3): the weight, flattened row by row, is cut into blocks of 64; each block is divided by its
absmax and every value is stored as the index (4 bits, two per byte) of the nearest of the 16 NF4 values, which are
the quantiles of N(0, 1) scaled to [-1, 1] with an exact zero. ŵ = NF4_CODE[index] · absmax.
Double quantization stores the absmax scales themselves in 8 bits: the mean is subtracted, and each group of 256
scales gets an int8 code and one scale factor, so a weight costs 4 + 8/64 + 16/(64·256) ≈ 4.13 bits instead of
4 + 32/64 = 4.5 bits with float32 scales.

Implementation: torchao's `NF4Tensor` (`to_nf4`), the one torchtune uses for QLoRA. It is maintained, pure PyTorch
(no CUDA-only kernel, so the CPU tests run the GPU's code), a traceable tensor subclass (torch.compile) and it
implements FSDP2's all-gather hooks, so a sharded frozen base gathers 4-bit data. bitsandbytes' `Linear4bit` is the
other maintained NF4, but its `Params4bit` is made for FSDP1's flattened storage (`bnb_4bit_quant_storage`), not
FSDP2's per-parameter hooks, and its CPU path is a separate backend. torchao always double-quantizes;
`double_quant=False` keeps float32 absmax scales beside torchao's codes (plain tensors: FSDP2 shards those without
hooks).

ŵ is rebuilt through a 256-entry byte table (one lookup gives both nibbles): the transient memory is the 16-bit ŵ
plus an int32 index per two weights, which is what bounds MPT-30B's peak (a (28672, 7168) down projection).
The blocks are row-major over the flattened weight, so a dimension-0 shard (FSDP2) holds whole blocks whenever
its rows hold a multiple of 64 · scale-group weights; `_scaler_block` picks the scale group so that holds for up
to 8 shards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.errors import ConfigError

# QLoRA's NF4 values (bitsandbytes' `create_normal_map()`, float32): index 7 is an exact zero
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256  # scales per double-quantization group (QLoRA's)


def _torchao() -> Any:
    """torchao's NF4 module (imported on first use; its optional C++ extensions are not needed and their loader's
    warnings are silenced)."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as ao
        except ImportError:
            try:
                from torchao.dtypes import nf4tensor as ao  # torchao < 0.16
            except ImportError:
                raise ConfigError(
                    "NF4 (QLoRA) needs torchao: pip install 'smalto[qlora]' (torchao>=0.18)"
                ) from None
    finally:
        log.setLevel(level)
    return ao


def _scaler_block(n_blocks: int) -> int:
    """The double-quantization group: QLoRA's 256 scales, or the largest power of two that leaves a whole number
    of groups in each of 8 (else fewer) dimension-0 shards, for small layers."""
    for shards in (8, 4, 2, 1):
        size = SCALER_BLOCK_SIZE
        while size > 1 and n_blocks % (size * shards):
            size //= 2
        if n_blocks % (size * shards) == 0:
            return size
    return 1


def _byte_table(code: Tensor, dtype: torch.dtype) -> Tensor:
    """(256, 2): byte b → (code[b >> 4], code[b & 15]), torchao's packing (the first of two values is the high
    nibble)."""
    c = code.to(dtype)
    return torch.stack((c.repeat_interleave(16), c.repeat(16)), dim=-1)


def _decode(packed: Tensor, scales: Tensor, code: Tensor, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """ŵ in `dtype` from packed indices (numel/2 uint8) and one scale per block of 64 (in `dtype`)."""
    values = _byte_table(code, dtype)[packed.int()]  # (numel/2, 2), a new tensor: scaled in place
    return values.view(scales.numel(), -1).mul_(scales.to(dtype)[:, None]).view(shape)


def dequantize_nf4(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A torchao NF4Tensor's ŵ (what torchao's `get_original_weight` computes, in the tensor's dtype), then cast."""
    t: Any = weight
    scales = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
    w = _decode(t.quantized_data, scales, t.nf4, t.shape, t.dtype)
    return w if dtype is None else w.to(dtype)


def _weight(stored: tuple[Tensor, ...], shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """ŵ from what an NF4Linear stores: (an NF4Tensor,) or (packed codes, float32 absmax, the code values)."""
    if len(stored) == 1:
        return dequantize_nf4(stored[0], dtype)
    codes, absmax, code = stored
    return _decode(codes, absmax.float(), code, shape, torch.float32).to(dtype)


class _FrozenLinear(torch.autograd.Function):
    """y = x · ŵᵀ with ŵ rebuilt in the forward and again in the backward: nothing 16-bit outlives the call, and
    no gradient is formed for ŵ."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, shape: torch.Size, *stored: Tensor) -> Tensor:
        ctx.shape = shape
        ctx.save_for_backward(*stored)
        return F.linear(x, _weight(stored, shape, x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        stored = ctx.saved_tensors
        return (grad @ _weight(stored, ctx.shape, grad.dtype), None, *(None for _ in stored))


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (see the module docstring). Parameters with
    `requires_grad=False`: FSDP2 shards them, the optimizer never sees them.

    double_quant=True: `weight` is a torchao NF4Tensor. double_quant=False: `weight_codes` (packed uint8) and
    `weight_absmax` (float32, one per block)."""

    weight: nn.Parameter
    weight_codes: nn.Parameter
    weight_absmax: nn.Parameter
    code: Tensor

    def __init__(
        self, in_features: int, out_features: int, *, block_size: int = BLOCK_SIZE, double_quant: bool = True
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.bias: nn.Parameter | None = None

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        block_size: int = BLOCK_SIZE,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> NF4Linear:
        """The NF4 layer of `linear` (quantized on `device`, default the weight's own). The stored dtype (the one
        ŵ is rebuilt in) is the weight's 16-bit type; a float32 weight is stored as bfloat16."""
        N, K = linear.weight.shape
        if (N * K) % block_size:
            raise ConfigError(
                f"NF4 block size {block_size} does not divide the {N}×{K} weight of a linear layer; use a block "
                "size that divides its size (64 divides every MPT / LLaMA projection)"
            )
        w = linear.weight.detach().to(device) if device is not None else linear.weight.detach()
        if w.dtype not in (torch.bfloat16, torch.float16):
            w = w.to(torch.bfloat16)
        w = w.contiguous()
        ao = _torchao()
        q = cls(K, N, block_size=block_size, double_quant=double_quant)
        n_blocks = w.numel() // block_size
        if double_quant:
            nf4 = ao.to_nf4(w, block_size, _scaler_block(n_blocks))
            q.weight = nn.Parameter(nf4, requires_grad=False)
        else:
            code = torch.tensor(NF4_CODE, dtype=w.dtype, device=w.device)
            packed = ao.NF4Tensor.convert_to_norm_float_weight(w, n_blocks, block_size, code)
            absmax = w.float().view(n_blocks, block_size).abs().amax(dim=1)
            q.weight_codes = nn.Parameter(packed, requires_grad=False)
            q.weight_absmax = nn.Parameter(absmax, requires_grad=False)
            q.register_buffer("code", code, persistent=False)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().to(w.device), requires_grad=False)
        return q

    def _stored(self) -> tuple[Tensor, ...]:
        return (self.weight,) if self.double_quant else (self.weight_codes, self.weight_absmax, self.code)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """ŵ, the (out_features, in_features) matrix the stored tensors stand for (default: the stored dtype)."""
        return _weight(self._stored(), self.shape, dtype or self.dtype)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        """The 16-bit type ŵ is stored for."""
        return self.weight.dtype if self.double_quant else self.code.dtype

    def forward(self, x: Tensor) -> Tensor:
        y = _FrozenLinear.apply(x, self.shape, *self._stored())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def storage_bytes(self) -> int:
        """The bytes the stored weight takes (codes and scales; not the bias)."""
        if not self.double_quant:
            return sum(int(t.numel() * t.element_size()) for t in (self.weight_codes, self.weight_absmax))
        w: Any = self.weight  # torchao's NF4Tensor
        inner = (w.quantized_data, w.quantized_scalers, w.quantization_factor)
        return sum(int(t.numel() * t.element_size()) for t in inner)

    def extra_repr(self) -> str:
        scales = "double-quantized scales" if self.double_quant else "float32 scales"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, NF4 blocks of "
            f"{self.block_size}, {scales}, bias={self.bias is not None}"
        )


def nf4_targets(model: nn.Module) -> list[str]:
    """The names of the `nn.Linear`s of the model's blocks: attention Wqkv / out_proj, ffn up / down (/ gate).
    The embedding (tied to the head), the norms and an untied lm_head stay as they are."""
    return [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear and ".blocks." in f".{n}" and "lora" not in n
    ]


def apply_nf4(
    model: nn.Module,
    *,
    double_quant: bool = True,
    block_size: int = BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> int:
    """Replace every linear layer of the model's blocks by an `NF4Linear`, in place, one at a time (each 16-bit
    weight is released as its NF4 form exists, so a model loaded on the CPU is quantized layer by layer onto
    `device`, the GPU that will train it). Returns how many layers were replaced. With `device`, the model's
    other tensors are moved there too."""
    if any(isinstance(m, NF4Linear) for m in model.modules()):
        raise ConfigError("the model's base is already NF4 (apply_nf4 was called on it before)")
    names = nf4_targets(model)
    modules = dict(model.named_modules())
    for name in names:
        parent, _, attr = name.rpartition(".")
        lin = modules.pop(name)
        assert isinstance(lin, nn.Linear)
        setattr(
            modules[parent],
            attr,
            NF4Linear.from_linear(lin, block_size=block_size, double_quant=double_quant, device=device),
        )
        lin.weight = None  # type: ignore[assignment]  # release the 16-bit weight now, not when the model goes
    if device is not None:
        model.to(device)
    return len(names)
