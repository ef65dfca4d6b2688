"""The decode-linear kernel's int4 paths with the scale and zero point folded out of the inner loop (FOLD).

A group of GROUP inputs of an output row holds w = (q − 8)·s + z = q·s + z' with z' = z − 8s (symmetric: z = 0),
so its part of the product is Σ x·w = s·Σ x·q + z'·Σ x: each weight costs one int → float conversion and one
multiply-add, and s, z' are applied once per group. Σ x over a group is computed by each program for all its
output rows. A byte holds inputs 2j (low nibble) and 2j + 1 (high nibble): x is read as its even and odd inputs
so each nibble meets its own input without re-interleaving the unpacked values.

One row (CUDA cores) reads a tile of BLOCK_K inputs as (BLOCK_N, groups, GROUP/2) bytes; 2–16 rows (tensor cores)
take one group at a time, its integers 0–15 as 16-bit floats (exact) in two tl.dots (even and odd inputs), the
scale and zero point applied to the (rows, BLOCK_N) result. A norm folded into the product (decode_linear.py)
needs W·g and W·b as well: the same group sums with g and b in place of x.

Imported by decode_linear_kernel.py (Triton at the top), never by `import smalto`.
"""

import triton
import triton.language as tl


@triton.jit
def to_float(u, MAGIC: tl.constexpr):
    """Non-negative integers below 2²³ → float32, exactly; with MAGIC without the quarter-rate I2F: u OR-ed into
    the mantissa of the float 2²³ (0x4B000000) is 2²³ + u, so a bitcast and one subtraction give u."""
    if MAGIC:
        f = (u.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        f = u.to(tl.float32)
    return f


@triton.jit
def group_sums(lo, hi, ve, vo, s, zp):
    """Σ_groups s·Σ(q·v) + z'·Σ v for each output row: lo, hi (BLOCK_N, groups, GROUP/2) the low / high nibbles
    as floats, ve, vo (groups, GROUP/2) the even / odd inputs' values, s, zp (BLOCK_N, groups)."""
    part = tl.sum(lo * ve[None, :, :] + hi * vo[None, :, :], axis=2)
    vs = tl.sum(ve + vo, axis=1)
    return tl.sum(part * s + zp * vs[None, :], axis=1)


@triton.jit
def scale_zero(S, Z, at, ok, HAS_ZERO: tl.constexpr):
    """A group's scale s and z' = z − 8s (float32); 0 where masked."""
    s = tl.load(S + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zp = tl.load(Z + at, mask=ok, other=0.0).to(tl.float32) - 8.0 * s
    else:
        zp = -8.0 * s
    return s, zp


@triton.jit
def one_row_folded(
    X, W, S, Z, NW, NB, n, in_n, swn, ssn, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
    HAS_NB: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, MAGIC: tl.constexpr,
):  # fmt: skip
    """W·x, or with a norm W·(g⊙x), W·g, W·b, Σx and Σx², for one row: decode_linear_kernel.one_row_sums's
    results, from packed int4 with the scales folded."""
    G: tl.constexpr = BLOCK_K // GROUP
    H: tl.constexpr = GROUP // 2
    g = tl.arange(0, G)
    h = tl.arange(0, H)
    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_N], tl.float32)
    s1 = tl.zeros([BLOCK_N], tl.float32)
    s2 = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        grp = k0 // GROUP + g
        ok = in_n[:, None] & (grp * GROUP < K)[None, :]  # K is a multiple of GROUP: a group is in or out
        at = n[:, None, None] * swn + (k0 // 2 + g * H)[None, :, None] + h[None, None, :]
        b = tl.load(W + at, mask=ok[:, :, None], other=0, eviction_policy="evict_first")
        s, zp = scale_zero(S, Z, n[:, None] * ssn + grp[None, :], ok, HAS_ZERO)
        lo = to_float(b & 0xF, MAGIC)
        hi = to_float(b >> 4, MAGIC)
        ke = k0 + (g * GROUP)[:, None] + 2 * h[None, :]  # (groups, GROUP/2) the even inputs
        in_ke = ke < K
        xe = tl.load(X + ke, mask=in_ke, other=0.0).to(tl.float32)
        xo = tl.load(X + ke + 1, mask=in_ke, other=0.0).to(tl.float32)
        if NORM != 0:
            ge = tl.load(NW + ke, mask=in_ke, other=0.0).to(tl.float32)
            go = tl.load(NW + ke + 1, mask=in_ke, other=0.0).to(tl.float32)
            s1 += tl.sum(tl.sum(xe + xo, axis=1), axis=0)
            s2 += tl.sum(tl.sum(xe * xe + xo * xo, axis=1), axis=0)
            acc += group_sums(lo, hi, xe * ge, xo * go, s, zp)
            if NORM == 1:
                acc_g += group_sums(lo, hi, ge, go, s, zp)
            if HAS_NB:
                be = tl.load(NB + ke, mask=in_ke, other=0.0).to(tl.float32)
                bo = tl.load(NB + ke + 1, mask=in_ke, other=0.0).to(tl.float32)
                acc_b += group_sums(lo, hi, be, bo, s, zp)
        else:
            acc += group_sums(lo, hi, xe, xo, s, zp)
    return acc, acc_g, acc_b, s1, s2


@triton.jit
def few_rows_folded(
    X, W, S, Z, NW, NB, m, in_m, sxm, n, in_n, swn, ssn, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_NB: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    MAGIC: tl.constexpr,
):  # fmt: skip
    """decode_linear_kernel.few_rows_sums's results from packed int4 with the scales folded: per group two
    tl.dots of the rows' even / odd inputs with the integers (a norm's g⊙x split into a high and a low 16-bit
    part, four dots), then s and z' on the (BLOCK_M, BLOCK_N) result."""
    H: tl.constexpr = GROUP // 2
    h = tl.arange(0, H)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_b = tl.zeros([BLOCK_N], tl.float32)
    t1 = tl.zeros([BLOCK_M], tl.float32)
    t2 = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for gi in tl.static_range(BLOCK_K // GROUP):
            kg = k0 + gi * GROUP
            ok = in_n & (n * 0 + kg < K)  # a vector mask (the interpreter refuses a scalar one)
            at = n[:, None] * swn + kg // 2 + h[None, :]
            b = tl.load(W + at, mask=ok[:, None], other=0, eviction_policy="evict_first")
            s, zp = scale_zero(S, Z, n * ssn + kg // GROUP, ok, HAS_ZERO)
            ke = kg + 2 * h
            in_ke = ke < K
            rows = in_m[:, None] & in_ke[None, :]
            xe = tl.load(X + m[:, None] * sxm + ke[None, :], mask=rows, other=0.0)
            xo = tl.load(X + m[:, None] * sxm + ke[None, :] + 1, mask=rows, other=0.0)
            lo = to_float(b & 0xF, MAGIC)
            hi = to_float(b >> 4, MAGIC)
            lo16 = tl.trans(lo.to(xe.dtype))
            hi16 = tl.trans(hi.to(xe.dtype))
            xef = xe.to(tl.float32)
            xof = xo.to(tl.float32)
            if NORM != 0:
                ge = tl.load(NW + ke, mask=in_ke, other=0.0).to(tl.float32)
                go = tl.load(NW + ke + 1, mask=in_ke, other=0.0).to(tl.float32)
                t1 += tl.sum(xef + xof, axis=1)
                t2 += tl.sum(xef * xef + xof * xof, axis=1)
                ve = xef * ge[None, :]
                vo = xof * go[None, :]
                ve_hi = ve.to(xe.dtype)
                vo_hi = vo.to(xe.dtype)
                part = tl.dot(ve_hi, lo16)
                part = tl.dot((ve - ve_hi.to(tl.float32)).to(xe.dtype), lo16, part)
                part = tl.dot(vo_hi, hi16, part)
                part = tl.dot((vo - vo_hi.to(tl.float32)).to(xe.dtype), hi16, part)
                vs = tl.sum(ve + vo, axis=1)
                if NORM == 1:
                    acc_g += s * tl.sum(lo * ge[None, :] + hi * go[None, :], axis=1) + zp * tl.sum(
                        ge + go, axis=0
                    )
                if HAS_NB:
                    be = tl.load(NB + ke, mask=in_ke, other=0.0).to(tl.float32)
                    bo = tl.load(NB + ke + 1, mask=in_ke, other=0.0).to(tl.float32)
                    acc_b += s * tl.sum(lo * be[None, :] + hi * bo[None, :], axis=1) + zp * tl.sum(
                        be + bo, axis=0
                    )
            else:
                part = tl.dot(xe, lo16)
                part = tl.dot(xo, hi16, part)
                vs = tl.sum(xef + xof, axis=1)
            acc += part * s[None, :] + vs[:, None] * zp[None, :]
    return acc, acc_g, acc_b, t1, t2
