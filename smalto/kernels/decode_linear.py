"""The linear layers of a decode step on CUDA: a few rows times a weight matrix, in an autotuned Triton kernel.

Why a kernel of our own: decoding reads every weight once per step for 1–16 rows, so a step's time is the time to
stream the weights. cuBLAS's kernels for these skinny shapes read them at about 79% of the bandwidth in the
compiled MPT-7B step; this kernel, autotuned per weight shape, reads them at about 86% (docs/benchmarks.md). The
autotuner picks narrow tiles there (8 output columns × 512–1024 inputs, 8 warps): many programs per SM, each
streaming.

y (M, N) = x (M, K) · wᵀ with w (N, K) row-major as `nn.Linear` stores it. One program owns BLOCK_N output columns
and walks K in BLOCK_K steps, accumulating in float32. One row (M = 1) multiplies and reduces on CUDA cores; 2–16
rows are padded to a 16-row tile and use `tl.dot` (tensor cores). Each has its own autotuned configurations, keyed
by (N, K) and the fused work: the first call at a shape benchmarks them (the compiled decode step's first call runs
eagerly, outside the CUDA graph) and Triton caches the choice on disk.

The work around the product can come along in the same launch (fewer launches per decode step, which at batch 1
are bound by latency more than by bandwidth): a bias, an activation (ACTS) and a residual add on the output, and a
LayerNorm / RMSNorm of x (NORMS), folded into the weight pass: W·(g⊙(x − μ)·r) + W·b = r·(W·(g⊙x) − μ·W·g) + W·b,
with μ and r from Σx and Σx² gathered in the same loop, so nothing delays the first weight load. The tensor-core
path folds the norm the same way, g⊙x split into a high and a low 16-bit part for two `tl.dot`s.
`smalto/kernels/decode_block.py` decides which of that work a decode step fuses (`DecodeOptions`).

`supports(x, weight, max_rows)` says when the kernel applies: the op built (`prepare()`, which the decoder calls
before compiling), CUDA, bf16 / fp16 weights and input of one dtype, at most `max_rows` rows, no autograd.
The kernel's source is smalto/kernels/decode_linear_kernel.py.

Quantized weights (smalto/quant/: int8 per-row, packed int4 per group) take the same kernel through a second op:
`linear(x, QuantWeight(...))`, with the same fused work; the kernel reads the int8 / int4 bytes and dequantizes
them in registers, so a decode step reads 1/2 or about 1/4 of the weight bytes (`supports_quant`). How int8 bytes
become floats depends on the rows (`QUANT_KERNELS`: the faster way on an H200 for one row is the slower for 16).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TILE_ROWS = 16  # the few-row path's tensor-core tile: the most rows the kernel takes

NORMS = {"layernorm": 1, "rmsnorm": 2}  # a norm of x's rows before the product (the block's norm_1 / norm_2)
ACTS = {"gelu": 1, "gelu_tanh": 2, "silu": 3, "relu": 4}  # an activation of the output (the MLP's up_proj)

NormSpec = tuple[str, Tensor | None, Tensor | None, float]  # (kind, weight, bias, eps), kind a key of NORMS

_PLAIN = (
    Tensor,
    nn.Parameter,
)  # not a tensor subclass (a DTensor shard, a quantised weight): those take F.linear
_OP = None  # the built custom op (a build cache: `prepare()` fills it once per process)
_QOP = None  # its twin for quantized weights

QUANTS = {"int8": 1, "int4": 2}  # the kernel's QUANT
# how the kernel turns int8 weights into floats (decode_linear_kernel.py's MAGIC): "base" the conversion
# instruction, "magic" the 2²³ mantissa trick, "auto" the faster of the two on an H200 for the call's rows: magic
# for one row, base for 2–16 (docs/quantize.md has the measurement, bench/quant_kernels.py takes it). int4 has one
# way, the conversion instruction.
QUANT_KERNELS = ("auto", "base", "magic")
QUANT_KERNEL = "auto"  # what a QuantLinear and DecodeOptions use unless told
GROUP_SIZES_MAX = (
    256  # int4 groups are 32–256 inputs (smalto/quant/formats.py): BLOCK_K is a multiple of each
)
# (BLOCK_N, BLOCK_K, warps, stages) the autotuner tries for quantized weights, one row / 2–16 rows; BLOCK_K is a
# multiple of every int4 group size
QUANT_TILES = {
    1: [(8, 512, 8, 2), (8, 1024, 8, 2), (16, 1024, 8, 2), (16, 512, 4, 4)],
    TILE_ROWS: [(16, 256, 4, 2), (16, 512, 8, 2), (32, 256, 4, 2), (32, 256, 8, 3)],
}


class QuantWeight(NamedTuple):
    """A quantized weight as the kernel reads it (smalto/quant/formats.py holds the format)."""

    format: str  # a key of QUANTS
    qweight: Tensor  # int8 (N, K), or uint8 (N, K/2) two int4 values per byte
    scales: Tensor  # (N,) int8; (N, K/group) int4
    zeros: Tensor | None  # (N, K/group): int4 asymmetric
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]


def int8_magic(quant_kernel: str, rows: int) -> bool:
    """Whether int8 weights become floats by the 2²³ mantissa trick in a call of `rows` rows."""
    if quant_kernel not in QUANT_KERNELS:
        raise ValueError(f"quant_kernel {quant_kernel!r}: one of {', '.join(QUANT_KERNELS)}")
    return quant_kernel == "magic" or (quant_kernel == "auto" and rows == 1)


def supports_quant(x: Tensor, q: QuantWeight, max_rows: int = TILE_ROWS) -> bool:
    """Whether the kernel runs this input and quantized weight (otherwise the caller dequantizes and multiplies)."""
    if (
        _QOP is None
        or not x.is_cuda
        or torch.is_grad_enabled()
        or x.dtype not in (torch.bfloat16, torch.float16)
    ):
        return False
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 0
    return x.shape[-1] == q.in_features and 0 < rows <= min(max_rows, TILE_ROWS)


def supports(x: Tensor, weight: Tensor, max_rows: int = TILE_ROWS) -> bool:
    """Whether the kernel runs this input and weight (otherwise the caller takes F.linear)."""
    if _OP is None or not x.is_cuda or torch.is_grad_enabled() or type(weight) not in _PLAIN:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or weight.dim() != 2:
        return False
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 0
    return x.shape[-1] == weight.shape[1] and 0 < rows <= min(max_rows, TILE_ROWS)


def linear(
    x: Tensor,
    weight: Tensor | QuantWeight,
    bias: Tensor | None = None,
    *,
    norm: NormSpec | None = None,
    act: str | None = None,
    residual: Tensor | None = None,
    quant_kernel: str = QUANT_KERNEL,
) -> Tensor:
    """act(norm(x) · wᵀ + bias) + residual in one launch. The caller has checked `supports(x, weight)` (or
    `supports_quant` for a `QuantWeight`).

    norm = (kind, weight, bias, eps), kind a key of NORMS, computed in the product's own pass (float32 statistics);
    act a key of ACTS; residual has the output's shape; quant_kernel a key of QUANT_KERNELS (quantized weights).
    """
    kind, norm_w, norm_b, eps = norm if norm is not None else ("", None, None, 0.0)
    N = weight.out_features if isinstance(weight, QuantWeight) else weight.shape[0]
    res = residual.reshape(-1, N).contiguous() if residual is not None else None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    fused = (NORMS[kind] if kind else 0, float(eps), ACTS[act] if act else 0)
    if isinstance(weight, QuantWeight):
        assert _QOP is not None, "decode_linear needs prepare() (and supports_quant(x, weight)) first"
        q = weight
        magic = q.format == "int8" and int8_magic(quant_kernel, x2.shape[0])
        y = _QOP(
            x2,
            q.qweight,
            q.scales,
            q.zeros,
            bias,
            norm_w,
            norm_b,
            res,
            *fused,
            QUANTS[q.format],
            q.group_size,
            int(magic),
        )
    else:
        assert _OP is not None, "decode_linear needs prepare() (and supports(x, weight)) first"
        w = weight if weight.stride(-1) == 1 else weight.contiguous()
        y = _OP(x2, w, bias, norm_w, norm_b, res, *fused)
    return y.view(*x.shape[:-1], N)


def linear_or_matmul(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, max_rows: int = TILE_ROWS
) -> Tensor:
    """The kernel where it applies, F.linear elsewhere (the decoder's unembedding)."""
    if supports(x, weight, max_rows):
        return linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _configs(triton, rows: int, quant: bool = False) -> list:
    """Tiles of BLOCK_N output columns × BLOCK_K inputs small enough for registers, and a few launch shapes.
    Quantized weights search four (`QUANT_TILES`) around the 16-bit winners (narrow tiles, long K, 8 warps): each
    (shape, fused work, format) is tuned on its own at its first call, and each tile costs a compilation."""
    if quant:
        return [
            triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k, w, s in QUANT_TILES[1 if rows == 1 else TILE_ROWS]
        ]
    blocks_n = (8, 16, 32, 64) if rows == 1 else (16, 32, 64, 128)  # a tensor-core tile needs N ≥ 16
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n in blocks_n
        for k in (128, 256, 512, 1024)
        for w in (4, 8)
        for s in (2, 4)
        if 2048 <= n * k <= 16384
    ]


def _build(autotune: bool):
    import triton

    from smalto.kernels import decode_linear_kernel as source

    kernels = {}
    for rows, quant in [(r, q) for r in (1, TILE_ROWS) for q in (False, True)]:
        kernel = source.skinny_matmul_kernel
        if autotune:
            cache = (
                {"cache_results": True}
                if "cache_results" in inspect.signature(triton.autotune).parameters
                else {}
            )
            # the fused work and the weight format change the best tile
            key = ["N", "K", "NORM", "ACT", "HAS_RES", "QUANT", "GROUP", "MAGIC"]
            kernel = triton.autotune(configs=_configs(triton, rows, quant), key=key, **cache)(kernel)
        kernels[rows, quant] = kernel

    def launch(
        x, w, scales, zeros, bias, norm_w, norm_b, residual, norm, eps, act, quant, group, magic=0
    ) -> Tensor:
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        block_m = 1 if M == 1 else TILE_ROWS
        args = (
            x, w, scales if scales is not None else y, zeros if zeros is not None else y, y,
            bias if bias is not None else y, norm_w if norm_w is not None else y,
            norm_b if norm_b is not None else y, residual if residual is not None else y,
            M, N, K, x.stride(0), w.stride(0), scales.stride(0) if scales is not None and scales.dim() == 2 else 0,
            y.stride(0), residual.stride(0) if residual is not None else 0, eps,
        )  # fmt: skip
        flags = dict(
            BLOCK_M=block_m, NORM=norm, HAS_NB=norm_b is not None, HAS_BIAS=bias is not None, ACT=act,
            HAS_RES=residual is not None, QUANT=quant, GROUP=group, HAS_ZERO=zeros is not None, MAGIC=magic,
        )  # fmt: skip
        if autotune:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
            kernels[block_m, quant > 0][grid](*args, **flags)
        else:  # one fixed configuration (Triton's CPU interpreter, tests)
            block_k = 64 if quant != QUANTS["int4"] else max(GROUP_SIZES_MAX, 64)  # int4 reads whole groups
            kernels[block_m, quant > 0][(triton.cdiv(N, 32),)](*args, BLOCK_N=32, BLOCK_K=block_k, **flags)
        return y

    @torch.library.custom_op("smalto::decode_linear", mutates_args=())
    def decode_linear_op(
        x: Tensor,
        w: Tensor,
        bias: Tensor | None,
        norm_w: Tensor | None,
        norm_b: Tensor | None,
        residual: Tensor | None,
        norm: int,
        eps: float,
        act: int,
    ) -> Tensor:
        return launch(x, w, None, None, bias, norm_w, norm_b, residual, norm, eps, act, 0, 1)

    @decode_linear_op.register_fake
    def _(x, w, bias, norm_w, norm_b, residual, norm, eps, act):  # shapes only, for tracing
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.custom_op("smalto::decode_linear_quant", mutates_args=())
    def decode_linear_quant_op(
        x: Tensor,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        bias: Tensor | None,
        norm_w: Tensor | None,
        norm_b: Tensor | None,
        residual: Tensor | None,
        norm: int,
        eps: float,
        act: int,
        quant: int,
        group: int,
        magic: int,
    ) -> Tensor:
        return launch(
            x,
            qweight,
            scales,
            zeros,
            bias,
            norm_w,
            norm_b,
            residual,
            norm,
            eps,
            act,
            quant,
            group,
            magic,
        )

    @decode_linear_quant_op.register_fake
    def _(x, qweight, scales, zeros, bias, norm_w, norm_b, residual, norm, eps, act, quant, group, magic):
        return x.new_empty(x.shape[0], qweight.shape[0])

    return decode_linear_op, decode_linear_quant_op


def prepare() -> bool:
    """Build the op (imports Triton; autotuned, except under Triton's CPU interpreter); True when it is ready.
    Call it outside torch.compile (the decoder does, on CUDA): tracing cannot enter an import."""
    global _OP, _QOP
    if _OP is None and importlib.util.find_spec("triton") is not None:
        _OP, _QOP = _build(autotune=os.environ.get("TRITON_INTERPRET") != "1")
    return _OP is not None
