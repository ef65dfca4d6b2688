"""Attention for one decode step on CUDA: one new query per row against the static KV cache, in one Triton kernel.

Why a kernel of our own: for one query over a short cache neither of PyTorch's SDPA backends reads the cache near
memory bandwidth (at the MPT-7B shape, batch 16, 256 slots: a third of it; docs/benchmarks.md), and the ALiBi +
mask bias they need is one more tensor built every step.

One program per (row, query head) walks the cache slots up to the query's position (unwritten slots are never
read) in blocks, computes q·k, adds ALiBi, masks padding / the window, and keeps an online softmax and the weighted
sum of values in float32. GQA: a query head reads its key/value head. The semantics are `eager_attention`'s for
T == 1 (a query always sees itself), which `tests/gpu` checks.

`decode_attention(q, k, v, q_pos, slopes, key_valid, scale, window, launch)` is a `torch.library` custom op with a
fake (shape) implementation, so a compiled (CUDA-graph) decode step calls it without a graph break. `prepare()`
builds it (the decoder calls it before compiling). `fills_gpu` says whether a decode step should use it: only when
rows × heads fill the GPU. With fewer programs (batch 1: 16 or 32 heads on 132 SMs) each walks its whole cache
alone and SDPA is faster; from about one program per SM up the kernel is faster (docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from smalto.model.attention import AttentionInputs, AttentionKernel

MAX_SLOTS = 8192  # one program per (row, head) walks the whole cache: past this, split-KV kernels do better


def why_not(
    head_dim: int, n_slots: int, programs: int, device: torch.device, programs_per_sm: float
) -> str | None:
    """None when a decode step should take the kernel; else why not (Triton missing, the shape, too few programs).
    Reads the device's SM count: call it where the step is planned, not inside a traced step."""
    if device.type != "cuda":
        return "it runs on CUDA only"
    if _OP is None:
        return "Triton is not installed (or prepare() was not called)"
    if not 0 < head_dim <= 256 or not 0 < n_slots <= MAX_SLOTS:
        return f"head_dim {head_dim} / {n_slots} cache slots are outside its range (≤ 256 / ≤ {MAX_SLOTS})"
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs < programs_per_sm * sms:
        return f"{programs} (row, head) programs do not fill {sms} SMs: SDPA is faster"
    return None


def _build():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention_kernel(
        Q, K, V, Out, QPos, Slopes, Valid,
        sqb, sqh, skb, skh, sks, svb, svh, svs, sob, soh, svalb, sqpos,
        scale, n_rep, window,
        HAS_ALIBI: tl.constexpr, HAS_VALID: tl.constexpr, HAS_WINDOW: tl.constexpr,
        D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // n_rep
        qpos = tl.load(QPos + b * sqpos).to(tl.int32)  # one position for all rows (stride 0), or one per row
        d = tl.arange(0, DP)  # head dims padded to a power of two (MPT-30B: 112 → 128), the padding masked
        in_d = d < D
        q = tl.load(Q + b * sqb + h * sqh + d, mask=in_d, other=0.0).to(tl.float32) * scale
        slope = tl.load(Slopes + h) if HAS_ALIBI else 0.0
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(qpos - window + 1, 0) // BLOCK * BLOCK
        m = tl.full([], float("-inf"), tl.float32)
        den = tl.zeros([], tl.float32)
        acc = tl.zeros([DP], tl.float32)
        k_base = K + b * skb + kvh * skh
        v_base = V + b * svb + kvh * svh
        for start in range(lo, qpos + 1, BLOCK):
            s = start + tl.arange(0, BLOCK)
            ok = s <= qpos
            tile = ok[:, None] & in_d[None, :]
            k = tl.load(k_base + s[:, None] * sks + d[None, :], mask=tile, other=0.0).to(tl.float32)
            score = tl.sum(k * q[None, :], axis=1)
            if HAS_ALIBI:
                score += slope * (s - qpos).to(tl.float32)
            if HAS_VALID:
                real = tl.load(Valid + b * svalb + s, mask=ok, other=0) != 0
                ok = ok & (real | (s == qpos))
            if HAS_WINDOW:
                ok = ok & (qpos - s < window)
            score = tl.where(ok, score, float("-inf"))
            m_new = tl.maximum(m, tl.max(score, axis=0))
            alpha = tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new))
            p = tl.where(ok, tl.exp(score - m_new), 0.0)
            tile = ok[:, None] & in_d[None, :]
            v = tl.load(v_base + s[:, None] * svs + d[None, :], mask=tile, other=0.0).to(tl.float32)
            den = den * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m = m_new
        tl.store(Out + b * sob + h * soh + d, (acc / den).to(Out.dtype.element_ty), mask=in_d)

    @torch.library.custom_op("smalto::decode_attention", mutates_args=())
    def decode_attention_op(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        slopes: Tensor | None,
        key_valid: Tensor | None,
        scale: float,
        window: int,
        block: int,
        warps: int,
        stages: int,
    ) -> Tensor:
        B, H, _, D = q.shape
        out = torch.empty_like(q)
        dummy = q_pos  # any tensor: the kernel does not read a pointer whose flag is off
        decode_attention_kernel[(B, H)](
            q, k, v, out, q_pos,
            slopes if slopes is not None else dummy,
            key_valid if key_valid is not None else dummy,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
            key_valid.stride(0) if key_valid is not None else 0,
            q_pos.stride(0) if q_pos.numel() > 1 else 0,
            scale, H // k.shape[1], window,
            HAS_ALIBI=slopes is not None, HAS_VALID=key_valid is not None, HAS_WINDOW=window > 0,
            D=D, DP=triton.next_power_of_2(D), BLOCK=block, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return out

    @decode_attention_op.register_fake
    def _(q, k, v, q_pos, slopes, key_valid, scale, window, block, warps, stages):  # shapes only, for tracing
        return torch.empty_like(q)

    return decode_attention_op


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    slopes: Tensor | None,
    key_valid: Tensor | None,
    scale: float,
    window: int = -1,
    launch: tuple[int, int, int] = (64, 4, 3),
) -> Tensor:
    """q (B, H, 1, D); k, v (B, K, S, D) with unit stride over D; q_pos (1,) long, or (B,): each row's own
    position (the server's slots); slopes (H,) float32 or None;
    key_valid (B, S) bool or None → (B, H, 1, D) in q's dtype. launch: (cache slots per loop step, warps,
    pipelining stages)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if key_valid is not None and key_valid.stride(-1) != 1:
        key_valid = key_valid.contiguous()
    if slopes is not None and slopes.dtype != torch.float32:
        slopes = slopes.float()
    assert _OP is not None, "decode_attention needs Triton (prepare() first)"
    return _OP(q, k, v, q_pos, slopes, key_valid, float(scale), int(window), *launch)


_OP = None  # the built custom op (a build cache: `prepare()` fills it once per process)


def prepare() -> bool:
    """Build the op (imports Triton); True when it is ready. Call it outside torch.compile (the decoder does, on
    CUDA): tracing a decode step cannot enter an import, so the step only uses an op that exists already."""
    global _OP
    if _OP is None and importlib.util.find_spec("triton") is not None:
        _OP = _build()
    return _OP is not None


def decode_kernel(launch: tuple[int, int, int] = (64, 4, 3)) -> AttentionKernel:
    """The kernel as an `AttentionKernel` for a decode plan, with its launch shape (`DecodeOptions`)."""

    def attend(q: Tensor, k: Tensor, v: Tensor, qkv, inputs: AttentionInputs, scale: float, dropout_p: float):
        m = inputs.mask
        return decode_attention(q, k, v, m.q_pos, inputs.slopes, m.key_valid, scale, m.window, launch)

    return AttentionKernel("decode", attend)
