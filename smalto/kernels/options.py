"""Options of the decode fast paths, passed to the decoder (never module globals). Benchmarks vary them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    """How a compiled decode step on CUDA uses smalto's Triton kernels (defaults: the measured best on an H200).

    linear_rows      rows (batch × tokens) up to which products take the decode-linear kernel (0: cuBLAS; ≤ 16)
    fuse             the block's norms, activation and residual adds inside those products (fewer launches)
    norm_rows        rows up to which the norm is fused too (on 16 rows it makes the MPT-7B step 2× slower)
    programs_per_sm  (row, head) programs per SM from which attention takes the decode kernel (0: always;
                     below about one per SM SDPA is faster)
    attention_launch (cache slots per loop step, warps, pipelining stages) of the decode attention kernel
    quant_kernel     how the decode-linear kernel computes with int8 / int4 weights: a key of
                     decode_linear.QUANT_KERNELS (base, magic, fold, magic+fold)
    """

    linear_rows: int = 16
    fuse: bool = True
    norm_rows: int = 1
    programs_per_sm: float = 1.0
    attention_launch: tuple[int, int, int] = (64, 4, 3)
    quant_kernel: str = "base"
