"""Options of the decode fast paths, passed to the decoder (never module globals). Benchmarks vary them."""

from __future__ import annotations

from dataclasses import dataclass

from smalto.errors import check_choice
from smalto.kernels import decode_linear


@dataclass(frozen=True, kw_only=True)
class DecodeOptions:
    """How a compiled decode step on CUDA uses smalto's Triton kernels (defaults: the measured best on an H200).

    linear_rows      rows (batch × tokens) up to which products take the decode-linear kernel (0: cuBLAS; ≤ 16)
    fuse             the block's norms, activation and residual adds inside those products (fewer launches)
    norm_rows        rows up to which the norm is fused too (on 16 rows it makes the MPT-7B step 2× slower)
    programs_per_sm  (row, head) programs per SM from which attention takes the decode kernel (0: always;
                     below about one per SM SDPA is faster)
    attention_launch (cache slots per loop step, warps, pipelining stages) of the decode attention kernel
    quant_kernel     how the decode-linear kernel turns int8 weights into floats, one of
                     decode_linear.QUANT_KERNELS: auto (the 2²³ mantissa trick for one row, the conversion
                     instruction for 2–16), base (the instruction always), magic (the trick always); int4 has one way
    """

    linear_rows: int = 16
    fuse: bool = True
    norm_rows: int = 1
    programs_per_sm: float = 1.0
    attention_launch: tuple[int, int, int] = (64, 4, 3)
    quant_kernel: str = decode_linear.QUANT_KERNEL

    def __post_init__(self) -> None:
        check_choice("DecodeOptions.quant_kernel", self.quant_kernel, decode_linear.QUANT_KERNELS)
