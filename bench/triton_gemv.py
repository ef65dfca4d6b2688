"""An experiment for `bench/decode_kernels.py` (variant `tgemv`): decode-step linears as a Triton skinny GEMM.

Why: in the compiled MPT-7B decode step cuBLAS's GEMV/GEMM kernels read the weights at about 79% of the H100's
3.35 TB/s (5.0 ms of a 5.7 ms step against a 3.97 ms floor; docs/benchmarks.md). A streaming kernel that keeps more
loads in flight could get closer; this one is autotuned per shape on first use (outside the CUDA graph: the
compiled step's first call runs eagerly) and is measured against cuBLAS before anything ships.

y (M, N) = x (M, K) · wᵀ, w (N, K) row-major as nn.Linear stores it, M ≤ 16 (decode rows). One program owns
BLOCK_N output columns and walks K in BLOCK_K steps: M = 1 multiplies and reduces on CUDA cores (no padding of the
row to a tensor-core tile), M > 1 pads the rows to 16 and uses `tl.dot`. Accumulation in float32.

`gemv(x, w)` is a `torch.library` custom op (`smalto_bench::gemv`) so a compiled step calls it without a graph
break; `build()` creates it (imports Triton). Correctness on CPU: tests/bench/test_triton_gemv.py (interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor

_OP = None


def _configs():
    import triton

    return [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n in (16, 32, 64)
        for k in (128, 256, 512)
        for w in (4, 8)
        for s in (2, 4)
        if n * k <= 16384
    ]


def build(autotune: bool = True):
    """Create the op (once). `autotune=False` uses one fixed config (the CPU interpreter, tests)."""
    global _OP
    if _OP is not None:
        return _OP
    import triton
    import triton.language as tl

    def kernel_body(
        X, W, Y, M, N, K, sxm, swn, sym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = n < N
        m = tl.arange(0, BLOCK_M)
        in_m = m < M
        if BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            in_k = k < K
            w = tl.load(W + n[:, None] * swn + k[None, :], mask=in_n[:, None] & in_k[None, :], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
            if BLOCK_M == 1:
                x = tl.load(X + k, mask=in_k, other=0.0).to(tl.float32)
                acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            else:
                x = tl.load(X + m[:, None] * sxm + k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
                acc += tl.dot(x, tl.trans(w))
        if BLOCK_M == 1:
            tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=in_n)
        else:
            tl.store(
                Y + m[:, None] * sym + n[None, :],
                acc.to(Y.dtype.element_ty),
                mask=in_m[:, None] & in_n[None, :],
            )

    kernel = triton.jit(kernel_body)
    if autotune:
        kernel = triton.autotune(configs=_configs(), key=["M", "N", "K"])(kernel)

    @torch.library.custom_op("smalto_bench::gemv", mutates_args=())
    def gemv_op(x: Tensor, w: Tensor) -> Tensor:
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, device=x.device, dtype=x.dtype)
        block_m = 1 if M == 1 else 16
        if autotune:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
            kernel[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=block_m)
        else:
            kernel[(triton.cdiv(N, 32),)](
                x,
                w,
                y,
                M,
                N,
                K,
                x.stride(0),
                w.stride(0),
                y.stride(0),
                BLOCK_M=block_m,
                BLOCK_N=32,
                BLOCK_K=64,
            )
        return y

    @gemv_op.register_fake
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    _OP = gemv_op
    return _OP


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) with M ≤ 16, w (N, K) → x · wᵀ (M, N) in x's dtype."""
    assert _OP is not None, "call build() first (outside torch.compile)"
    assert x.shape[0] <= 16, "decode rows only (M <= 16)"
    return _OP(x.contiguous(), w if w.stride(-1) == 1 else w.contiguous())
