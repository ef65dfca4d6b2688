"""The Triton source of the decode-linear kernel: y = act(norm(x) · wᵀ + bias) + residual for 1–16 rows.

smalto/kernels/decode_linear.py builds, autotunes, launches and documents it; this module holds only the kernel and
imports Triton at the top, so it is imported when that module builds its op, never by `import smalto`.

The first BLOCK_K tile of a program is peeled off the loop, so that its weights are loaded before anything else
(rotating the loop, each next tile loaded a step ahead, is slower on an H200: docs/benchmarks.md).

Quantized weights (QUANT, smalto/quant/formats.py) are read as stored and dequantized in registers: int8 (QUANT 1)
is multiplied as it is and its per-row scale applied to the sums at the end (the scale factors out of every sum
the kernel keeps); packed int4 (QUANT 2) is read group by group, unpacked, and each value becomes (q − 8)·s + z with
its group's scale and zero point before the product.

int8 weights become floats in one of two ways (MAGIC; `decode_linear.QUANT_KERNELS` chooses per call):
  MAGIC 0  the conversion instruction (I2F, quarter rate on Hopper)
  MAGIC 1  the byte's top bit flipped (+128) and the result OR-ed into the mantissa of the float 2²³ (0x4B000000):
           2²³ + 128 + q exactly, so a bitcast and one subtraction give q (faster for one row on an H200,
           slower for 16: docs/quantize.md)
"""

import triton
import triton.language as tl


@triton.jit
def weight_tile(
    W, S, Z, n, in_n, swn, ssn, k0, k, in_k, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    QUANT: tl.constexpr, HAS_ZERO: tl.constexpr,
):  # fmt: skip
    """The BLOCK_N × BLOCK_K weights of output columns n and inputs k = k0 + 0…BLOCK_K−1, read once: not kept in
    L2. 16-bit and int8 weights as stored; int4 dequantized to float32 (`int4_tile`)."""
    # one return: Triton would emit both returns of a constexpr `if` that returned early
    if QUANT == 2:
        w = int4_tile(W, S, Z, n, in_n, swn, ssn, k0, K, BLOCK_N, BLOCK_K, GROUP, HAS_ZERO)
    else:
        ok = in_n[:, None] & in_k[None, :]
        w = tl.load(W + n[:, None] * swn + k[None, :], mask=ok, other=0, eviction_policy="evict_first")
    return w


@triton.jit
def int8_float(w, MAGIC: tl.constexpr):
    """int8 → float32, exactly; with MAGIC the byte's top bit flipped (+128) and 2²³ OR-ed in by one XOR."""
    if MAGIC:
        u = w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x4B000080
        f = u.to(tl.float32, bitcast=True) - 8388736.0
    else:
        f = w.to(tl.float32)
    return f


@triton.jit
def int4_tile(
    W, S, Z, n, in_n, swn, ssn, k0, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):  # fmt: skip
    """Packed int4 → (q − 8)·s + z in float32, inputs in order. The bytes are read as (BLOCK_N, groups, GROUP/2)
    so that each group's bytes are one contiguous (vector) load and its scale and zero point broadcast over them;
    the low and high nibbles are then interleaved back into input order. BLOCK_K is a multiple of GROUP."""
    g = tl.arange(0, BLOCK_K // GROUP)
    h = tl.arange(0, GROUP // 2)
    grp = k0 // GROUP + g
    in_g = in_n[:, None] & (grp * GROUP < K)[None, :]  # K is a multiple of GROUP: a group is in or out
    at = n[:, None, None] * swn + (k0 // 2 + g * (GROUP // 2))[None, :, None] + h[None, None, :]
    b = tl.load(W + at, mask=in_g[:, :, None], other=0, eviction_policy="evict_first")
    sg = n[:, None] * ssn + grp[None, :]
    s = tl.load(S + sg, mask=in_g, other=0.0).to(tl.float32)[:, :, None]
    lo = ((b & 0xF).to(tl.float32) - 8.0) * s
    hi = ((b >> 4).to(tl.float32) - 8.0) * s
    if HAS_ZERO:
        z = tl.load(Z + sg, mask=in_g, other=0.0).to(tl.float32)[:, :, None]
        lo += z
        hi += z
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # input 2j low nibble, 2j + 1 high


@triton.jit
def one_row_tile(
    acc, acc_g, acc_b, s1, s2, w, X, NW, NB, k, in_k, NORM: tl.constexpr, HAS_NB: tl.constexpr,
    QUANT: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """One BLOCK_K step for one row, on CUDA cores: W·x, or with a norm W·(g⊙x), W·g, W·b, Σx and Σx²."""
    wf = int8_float(w, MAGIC) if QUANT == 1 else w.to(tl.float32)
    x = tl.load(X + k, mask=in_k, other=0.0).to(tl.float32)
    if NORM != 0:
        g = tl.load(NW + k, mask=in_k, other=0.0).to(tl.float32)
        s1 += tl.sum(x, axis=0)
        s2 += tl.sum(x * x, axis=0)
        acc += tl.sum(wf * (x * g)[None, :], axis=1)
        if NORM == 1:
            acc_g += tl.sum(wf * g[None, :], axis=1)
        if HAS_NB:
            acc_b += tl.sum(wf * tl.load(NB + k, mask=in_k, other=0.0).to(tl.float32)[None, :], axis=1)
    else:
        acc += tl.sum(wf * x[None, :], axis=1)
    return acc, acc_g, acc_b, s1, s2


@triton.jit
def few_rows_tile(
    acc, acc_g, acc_b, t1, t2, w, X, NW, NB, m, in_m, sxm, k, in_k, NORM: tl.constexpr, HAS_NB: tl.constexpr,
    QUANT: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """One BLOCK_K step for 2–16 rows, on tensor cores; a norm as for one row, with g⊙x split into a high and a
    low 16-bit part so that the products keep 16 bits."""
    x = tl.load(X + m[:, None] * sxm + k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
    if QUANT == 1:
        w = int8_float(w, MAGIC)
    w = w.to(x.dtype)  # a no-op for 16-bit weights
    if NORM != 0:
        g = tl.load(NW + k, mask=in_k, other=0.0).to(tl.float32)
        xf = x.to(tl.float32)
        t1 += tl.sum(xf, axis=1)
        t2 += tl.sum(xf * xf, axis=1)
        v = xf * g[None, :]
        hi = v.to(x.dtype)
        lo = (v - hi.to(tl.float32)).to(x.dtype)
        acc = tl.dot(hi, tl.trans(w), acc)
        acc = tl.dot(lo, tl.trans(w), acc)
        wf = w.to(tl.float32)
        if NORM == 1:
            acc_g += tl.sum(wf * g[None, :], axis=1)
        if HAS_NB:
            acc_b += tl.sum(wf * tl.load(NB + k, mask=in_k, other=0.0).to(tl.float32)[None, :], axis=1)
    else:
        acc = tl.dot(x, tl.trans(w), acc)
    return acc, acc_g, acc_b, t1, t2


@triton.jit
def one_row_sums(
    X, W, S, Z, NW, NB, n, in_n, swn, ssn, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    HAS_NB: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """W·x, or with a norm W·(g⊙x), W·g, W·b, Σx and Σx², for one row on CUDA cores; the weights of the first
    BLOCK_K inputs are loaded before anything else."""
    k = tl.arange(0, BLOCK_K)
    in_k = k < K
    w = weight_tile(
        W, S, Z, n, in_n, swn, ssn, 0, k, in_k, K, BLOCK_N, BLOCK_K, GROUP, QUANT, HAS_ZERO
    )  # 1st tile
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_N], tl.float32)  # W·g
    acc_b = tl.zeros([BLOCK_N], tl.float32)  # W·b
    s1 = tl.zeros([BLOCK_N], tl.float32)  # Σx (the same in every lane)
    s2 = tl.zeros([BLOCK_N], tl.float32)  # Σx²
    acc, acc_g, acc_b, s1, s2 = one_row_tile(
        acc, acc_g, acc_b, s1, s2, w, X, NW, NB, k, in_k, NORM, HAS_NB, QUANT, MAGIC
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < K
        w = weight_tile(W, S, Z, n, in_n, swn, ssn, k0, k, in_k, K, BLOCK_N, BLOCK_K, GROUP, QUANT, HAS_ZERO)
        acc, acc_g, acc_b, s1, s2 = one_row_tile(
            acc, acc_g, acc_b, s1, s2, w, X, NW, NB, k, in_k, NORM, HAS_NB, QUANT, MAGIC
        )
    return acc, acc_g, acc_b, s1, s2


@triton.jit
def few_rows_sums(
    X, W, S, Z, NW, NB, m, in_m, sxm, n, in_n, swn, ssn, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_NB: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """The same sums for 2–16 rows, one tensor-core tile (Σx and Σx² per row)."""
    k = tl.arange(0, BLOCK_K)
    in_k = k < K
    w = weight_tile(
        W, S, Z, n, in_n, swn, ssn, 0, k, in_k, K, BLOCK_N, BLOCK_K, GROUP, QUANT, HAS_ZERO
    )  # 1st tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_N], tl.float32)
    t1 = tl.zeros([BLOCK_M], tl.float32)
    t2 = tl.zeros([BLOCK_M], tl.float32)
    acc, acc_g, acc_b, t1, t2 = few_rows_tile(
        acc, acc_g, acc_b, t1, t2, w, X, NW, NB, m, in_m, sxm, k, in_k, NORM, HAS_NB, QUANT, MAGIC
    )
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        in_k = k < K
        w = weight_tile(W, S, Z, n, in_n, swn, ssn, k0, k, in_k, K, BLOCK_N, BLOCK_K, GROUP, QUANT, HAS_ZERO)
        acc, acc_g, acc_b, t1, t2 = few_rows_tile(
            acc, acc_g, acc_b, t1, t2, w, X, NW, NB, m, in_m, sxm, k, in_k, NORM, HAS_NB, QUANT, MAGIC
        )
    return acc, acc_g, acc_b, t1, t2


@triton.jit
def skinny_matmul_kernel(
    X, W, S, Z, Y, BIAS, NW, NB, R, M, N, K, sxm, swn, ssn, sym, srm, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, HAS_NB: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    QUANT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < N
    m = tl.arange(0, BLOCK_M)
    in_m = m < M
    if BLOCK_M == 1:  # CUDA cores; a norm of x in the same pass, so that nothing delays the weight loads:
        # W·(g⊙(x − μ)·r) + W·b = r·(W·(g⊙x) − μ·W·g) + W·b, with μ, r from Σx and Σx² of the same loop
        acc, acc_g, acc_b, s1, s2 = one_row_sums(
            X, W, S, Z, NW, NB, n, in_n, swn, ssn, K, BLOCK_N, BLOCK_K, NORM, HAS_NB, QUANT, GROUP, HAS_ZERO, MAGIC,
        )  # fmt: skip
        if QUANT == 1:  # int8's per-row scale factors out of every sum
            sc = tl.load(S + n, mask=in_n, other=0.0).to(tl.float32)
            acc, acc_g, acc_b = acc * sc, acc_g * sc, acc_b * sc
        if NORM == 1:  # LayerNorm
            mean = s1 / K
            acc = (acc - mean * acc_g) / tl.sqrt(s2 / K - mean * mean + eps) + acc_b
        elif NORM == 2:  # RMSNorm
            acc = acc / tl.sqrt(s2 / K + eps)
    else:  # 2–16 rows: one tensor-core tile
        acc, acc_g, acc_b, t1, t2 = few_rows_sums(
            X, W, S, Z, NW, NB, m, in_m, sxm, n, in_n, swn, ssn, K, BLOCK_M, BLOCK_N, BLOCK_K, NORM, HAS_NB, QUANT,
            GROUP, HAS_ZERO, MAGIC,
        )  # fmt: skip
        if QUANT == 1:
            sc = tl.load(S + n, mask=in_n, other=0.0).to(tl.float32)
            acc, acc_g, acc_b = acc * sc[None, :], acc_g * sc, acc_b * sc
        if NORM == 1:
            mu = t1 / K
            r = 1.0 / tl.sqrt(t2 / K - mu * mu + eps)
            acc = (acc - mu[:, None] * acc_g[None, :]) * r[:, None] + acc_b[None, :]
        elif NORM == 2:
            acc = acc * (1.0 / tl.sqrt(t2 / K + eps))[:, None]
    if HAS_BIAS:
        acc += tl.load(BIAS + n, mask=in_n, other=0.0).to(tl.float32)
    if ACT == 1:  # exact GELU
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:  # tanh GELU; tanh(z) = 2·sigmoid(2z) − 1
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    elif ACT == 3:
        acc = acc * tl.sigmoid(acc)
    elif ACT == 4:
        acc = tl.maximum(acc, 0.0)
    if BLOCK_M == 1:
        if HAS_RES:
            acc += tl.load(R + n, mask=in_n, other=0.0).to(tl.float32)
        tl.store(Y + n, acc.to(Y.dtype.element_ty), mask=in_n)
    else:
        ok = in_m[:, None] & in_n[None, :]
        if HAS_RES:
            acc += tl.load(R + m[:, None] * srm + n[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + m[:, None] * sym + n[None, :], acc.to(Y.dtype.element_ty), mask=ok)
