"""Training attention kernels, forward + backward: FlexAttention-ALiBi under different kernel options, and SDPA.

    python bench/bench_attention.py                       # MPT-1B and MPT-125M attention shapes, on CUDA
    python bench/bench_attention.py --autotune            # also FlexAttention with inductor's max-autotune

Each row times `out = attn(q, k, v); out.backward(g)` at one training micro-batch of the shape (causal, seq 2048)
and reports milliseconds and TFLOP/s of causal work (forward 2·B·H·S²·D, backward 2.5× that: the FLOPs a causal
kernel must do, half of the dense count). `sdpa-causal` is PyTorch's flash attention *without* ALiBi: not MPT's
semantics, shown as the speed a bias-free kernel reaches.

`sdpa, ALiBi as head dims (BACKEND)` computes MPT's ALiBi attention with a bias-free causal kernel: within a row,
ALiBi's −m·(i − j) equals m·j up to a constant that softmax ignores, and m·j is a dot product of 4 extra dimensions
q' = (64·m_hi, m_hi, 64·m_lo, m_lo) / scale and k' = (j // 64, j % 64, j // 64, j % 64), exact in bf16 (m = m_hi +
m_lo to 16 significant bits, integers below 256); padded with zeros to a multiple of 8 (D + 8), v too. The concat
is timed with it (eager), and once compiled (`compiled`).

`cudnn-frontend ALiBi` is `attn_impl: cudnn` (smalto/kernels/cudnn_attention.py): cuDNN's own flash attention with
its built-in ALiBi and a causal band, through the optional `cudnn` package (the row says so when it is missing).
`sdpa + ALiBi bias tensor (BACKEND)` passes the materialised (1, H, S, S) ALiBi + causal bias as SDPA's attn_mask.
Results: a table, and attention.json in $OUT when set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from smalto.kernels.cudnn_attention import cudnn_attention
from smalto.model.attention import alibi_slopes

SHAPES = {"1b": (16, 16, 2048, 128), "125m": (32, 12, 2048, 64)}  # micro-batch, heads, seq, head dim

HINTS = {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}  # true of every causal mask

VARIANTS: dict[str, dict] = {
    "flex default": {},
    "flex + causal hints": dict(HINTS),
    "flex + hints + prescale": {**HINTS, "PRESCALE_QK": True},
    "flex + hints + TMA": {**HINTS, "USE_TMA": True},
    "flex + hints, bwd 64/64/64/64 s3 w4": {
        **HINTS,
        "BLOCK_M1": 64,
        "BLOCK_N1": 64,
        "BLOCK_M2": 64,
        "BLOCK_N2": 64,
        "num_stages": 3,
        "num_warps": 4,
    },
    "flex + hints, fwd 128/128 s2 w8": {
        **HINTS,
        "BLOCK_M": 128,
        "BLOCK_N": 128,
        "num_stages": 2,
        "num_warps": 8,
    },
}


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / iters


def bench_shape(shape: str, variants: dict[str, dict], args: argparse.Namespace) -> list[dict]:
    B, H, S, D = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    slopes = alibi_slopes(H, device="cuda")

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx).to(score.dtype)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    block_mask = create_block_mask(causal, None, None, S, S, device="cuda")
    flops = 2 * B * H * S * S * D * 3.5  # causal fwd (2·B·H·S²·D = half of 4·B·H·S²·D) + bwd (2.5×)

    def flex(opts: dict | None, mode: str | None = None) -> Callable[[], torch.Tensor]:
        fn = torch.compile(flex_attention, dynamic=False, mode=mode)
        return lambda: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_options=opts or None)  # type: ignore[arg-type]

    cases = {name: flex(opts) for name, opts in variants.items()}
    if args.autotune:
        cases["flex max-autotune + hints"] = flex(dict(HINTS), "max-autotune-no-cudagraphs")
    cases["sdpa-causal (no ALiBi)"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    scale = D**-0.5
    ms = slopes.float() / scale
    m_hi = ms.bfloat16()
    m_lo = (ms - m_hi.float()).bfloat16()
    q_extra = torch.stack([64 * m_hi, m_hi, 64 * m_lo, m_lo, *[torch.zeros_like(m_hi)] * 4], -1)  # (H, 8)
    j = torch.arange(S, device="cuda")
    hi, lo = (j // 64).bfloat16(), (j % 64).bfloat16()
    k_extra = torch.stack([hi, lo, hi, lo, *[torch.zeros_like(hi)] * 4], -1)  # (S, 8)

    def alibi_dims(q, k, v):
        q2 = torch.cat([q, q_extra[None, :, None].expand(B, H, S, 8)], -1)
        k2 = torch.cat([k, k_extra[None, None].expand(B, H, S, 8)], -1)
        v2 = F.pad(v, (0, 8))
        return F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, scale=scale)[..., :D]

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def with_backend(backend):
        def run():
            with sdpa_kernel(backend):
                return alibi_dims(q, k, v)

        return run

    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        cases[f"sdpa, ALiBi as head dims ({name})"] = with_backend(backend)
    compiled_dims = torch.compile(alibi_dims, dynamic=False)
    cases["sdpa, ALiBi as head dims (compiled)"] = lambda: compiled_dims(q, k, v)
    # the model's call: the packed (B, S, 3·H·D) projection in, its packed gradient out
    packed = torch.cat(
        [t.detach().transpose(1, 2).reshape(B, S, H * D) for t in (q, k, v)], -1
    ).requires_grad_()
    cases["cudnn-frontend ALiBi"] = lambda: cudnn_attention(packed, H, H, True, scale)
    i = torch.arange(S, device="cuda")
    rel = (i[None, :] - i[:, None]).float()  # j - i
    bias = (slopes.float()[:, None, None] * rel).masked_fill(rel > 0, float("-inf"))
    bias = bias[None].bfloat16()  # (1, H, S, S): the materialised ALiBi + causal bias, no gradient

    def with_bias(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

        return run

    cases["sdpa + ALiBi bias tensor (cudnn)"] = with_bias(SDPBackend.CUDNN_ATTENTION)
    cases["sdpa + ALiBi bias tensor (efficient)"] = with_bias(SDPBackend.EFFICIENT_ATTENTION)
    if args.only:
        keep = args.only.split(",")
        cases = {n: f for n, f in cases.items() if n in variants or any(w in n for w in keep)}

    def step(fwd) -> None:
        q.grad = k.grad = v.grad = packed.grad = None
        fwd().backward(grad)

    rows, ref = [], None
    for name, fwd in cases.items():
        try:
            t0 = time.perf_counter()
            step(fwd)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            out = fwd().float()
            err: float | None = None if ref is None else (out - ref).abs().max().item()
            ref = out if ref is None else ref
            ms = time_ms(lambda fwd=fwd: step(fwd), args.iters)
            row = dict(shape=shape, variant=name, ms=ms, tflops=flops / ms / 1e9, compile_s=compile_s)
            row["max_abs_diff_vs_first"] = err
        except Exception as e:  # an option this torch/GPU rejects: say so, go on
            row = dict(shape=shape, variant=name, error=f"{type(e).__name__}: {str(e)[:120]}")
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,125m")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--autotune", action="store_true", help="add FlexAttention compiled with max-autotune")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated words: of the non-flex rows, keep those whose name has one",
    )
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    variants = dict(VARIANTS)
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    rows = [row for shape in args.shapes.split(",") for row in bench_shape(shape, variants, args)]
    table = Table(title=f"attention fwd+bwd, causal, seq 2048 ({torch.cuda.get_device_name()})")
    for c in ("shape", "variant", "ms", "TFLOP/s (causal)", "compile s", "max |Δ| vs first"):
        table.add_column(c)
    for r in rows:
        if "error" in r:
            table.add_row(r["shape"], r["variant"], r["error"], "", "", "")
            continue
        d = r["max_abs_diff_vs_first"]
        table.add_row(
            r["shape"],
            r["variant"],
            f"{r['ms']:.2f}",
            f"{r['tflops']:.0f}",
            f"{r['compile_s']:.0f}",
            "-" if d is None else f"{d:.3g}",
        )
    Console(width=160).print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "attention.json").write_text(
            json.dumps({"torch": torch.__version__, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
