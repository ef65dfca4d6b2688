"""The quantized decode-linear kernel beside bf16 cuBLAS and torch's kernels, one linear layer at a time: µs per
call, GB/s, error.

    python bench/quant_kernels.py                         # CUDA (H200: ~2 min): MPT-7B's four linear shapes,
                                                          # batch 1 and 16, every variant
    python bench/quant_kernels.py --variants int4:base,int4:tinygemm --batch 1
    python bench/quant_kernels.py --smoke                 # CPU, Triton's interpreter: tiny shapes, errors only

Shapes (N outputs × K inputs, MPT-7B): Wqkv 12288×4096, out_proj 4096×4096, up_proj 16384×4096, down_proj
4096×16384; random bf16 weights (std K^-1/2), x ~ N(0, 1) in bf16. Variants (`--variants`, comma-separated):

    bf16:cublas        F.linear with the bf16 weight (the 16-bit reference of every ratio)
    bf16:kernel        smalto's decode-linear kernel on the bf16 weight (full 16-bit autotune: adds minutes)
    int8:base          smalto's kernel reading the int8 weight, int → float by the conversion instruction
    int8:magic         the same, int → float by the 2²³ mantissa trick (`DecodeOptions.quant_kernel`'s auto
                       takes magic for one row, base for 2–16)
    int4:base          smalto's kernel reading the packed int4 weight, each value (q − 8)·s + z before the product
    int4:tinygemm      torch's tinygemm int4 kernel (aten._weight_int4pack_mm, CUDA sm80+; the same
                       (q − 8)·s + z format, repacked)
    int8:compiled      torch.compile'd F.linear(x, w.to(bf16)) * s (gpt-fast's int8 weight-only layer)

Timing: each call reads one of several copies of the weights (≥ 256 MB in all, more than the L2 cache), `--calls`
calls captured in one CUDA graph, replayed; the best of `--repeats` replays. GB/s = (weight + scale + x + y bytes)
/ time; "of peak" against `--bw` (H200: 4.8 TB/s). err: max |y − y_ref| / max |y_ref|, y_ref the float32 product of
x and the dequantized weight. The summary adds the four shapes (one MPT-7B block's linears) per variant and
divides by bf16:cublas. Results: a table, and quant_kernels.json in $OUT when that variable is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = {
    "Wqkv": (12288, 4096),
    "out_proj": (4096, 4096),
    "up_proj": (16384, 4096),
    "down_proj": (4096, 16384),
}
SMOKE_SHAPES = {"tiny": (64, 256)}
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
L2_FLUSH_BYTES = 256 * 2**20  # the weight copies one timing cycles through: far more than an H200's 50 MB L2


def variant_names(cuda: bool) -> list[str]:
    from smalto.kernels import decode_linear

    names = ["bf16:cublas"]
    names += [
        f"int8:{k}" for k in decode_linear.QUANT_KERNELS if k != "auto"
    ]  # auto is one of the two per call
    names += ["int4:base"]  # int4 has one way (int8's choice does not apply)
    return names + (["int4:tinygemm", "int8:compiled"] if cuda else [])


def tinygemm(q) -> Callable[[Tensor], Tensor]:
    """torch's int4 kernel on q's weights: even inputs go to the high nibble, scales and zeros as (K/g, N, 2)."""
    swapped = ((q.qweight & 0xF) << 4) | (q.qweight >> 4)
    packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
    zeros = q.zeros if q.zeros is not None else torch.zeros_like(q.scales)
    sz = torch.stack([q.scales, zeros], dim=-1).transpose(0, 1).contiguous()
    group = q.spec.group_size
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)


_int8_linear = None


def compiled_int8(q) -> Callable[[Tensor], Tensor]:
    global _int8_linear
    if _int8_linear is None:
        _int8_linear = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s)
    fn = _int8_linear
    return lambda x: fn(x, q.qweight, q.scales)


def layer_call(variant: str, lin: torch.nn.Linear, group_size: int, symmetric: bool):
    """(a function of x for one copy of the layer, the layer's weight bytes, the dequantized weight in float32)."""
    from smalto.kernels import decode_linear
    from smalto.quant import QuantLinear, QuantSpec

    fmt, how = variant.split(":")
    if fmt == "bf16":
        w = lin.weight.detach().clone()  # a copy per call: each timed copy is its own memory
        if how == "kernel":
            return (lambda x: decode_linear.linear(x, w)), w.numel() * w.element_size(), w.float()
        return (lambda x: F.linear(x, w)), w.numel() * w.element_size(), w.float()
    spec = QuantSpec(format=fmt, group_size=group_size, symmetric=symmetric)
    q = QuantLinear.from_linear(lin, spec)
    nbytes = sum(t.numel() * t.element_size() for t in (q.qweight, q.scales, q.zeros) if t is not None)
    if how == "tinygemm":
        fn = tinygemm(q)
    elif how == "compiled":
        fn = compiled_int8(q)
    else:
        args = q.weight_args()
        fn = lambda x: decode_linear.linear(x, args, quant_kernel=how)
    return fn, nbytes, q.dequantize(torch.float32)


def time_calls(calls: list[Callable[[], Tensor]], n_calls: int, repeats: int) -> float:
    """µs per call: `n_calls` calls (cycling through the copies) in one CUDA graph, best of `repeats` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()  # warm up: autotune, compile
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    best = math.inf
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / n_calls)
    return best


def measure(
    variant: str, name: str, N: int, K: int, batch: int, args, device: str, dtype: torch.dtype
) -> dict:
    g = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{name} {batch}".encode()))
    x = torch.randn(batch, K, generator=g).to(device=device, dtype=dtype)
    lin = torch.nn.Linear(K, N, bias=False, dtype=dtype, device=device)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(N, K, generator=g) * K**-0.5).to(dtype))
    row = dict(variant=variant, shape=name, N=N, K=K, batch=batch)
    try:
        with torch.inference_mode():
            fn, nbytes, w_ref = layer_call(variant, lin, args.group_size, args.symmetric)
            y = fn(x)
            ref = x.float() @ w_ref.T
            row["err"] = float((y.float() - ref).abs().max() / ref.abs().max())
            row["weight_mb"] = nbytes / 2**20
            if device == "cuda":
                copies = max(1, math.ceil(L2_FLUSH_BYTES / nbytes))
                fns = [fn] + [
                    layer_call(variant, lin, args.group_size, args.symmetric)[0] for _ in range(copies - 1)
                ]
                us = time_calls([partial(f, x) for f in fns], max(args.calls, copies), args.repeats)
                moved = nbytes + (x.numel() + batch * N) * x.element_size()
                row.update(us=us, gbps=moved / us / 1e3, of_peak=moved / us / 1e-6 / args.bw)
    except Exception as e:  # a variant that cannot run here (no kernel for this device): a row, not a stop
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"
    return row


def print_row(cols: list[str]) -> None:
    widths = [16, 10, 6, 9, 9, 9, 10]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=None, help="comma-separated (default: all that run on the device)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    ap.add_argument("--batch", default="1,16", help="rows per call, comma-separated (1–16)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size")
    ap.add_argument("--symmetric", action="store_true", help="int4 without zero points")
    ap.add_argument("--calls", type=int, default=200, help="calls per CUDA graph")
    ap.add_argument("--repeats", type=int, default=5, help="graph replays; the best counts")
    ap.add_argument(
        "--bw", type=float, default=None, help="memory bandwidth, bytes/s (default: the device's)"
    )
    ap.add_argument(
        "--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes: errors only"
    )
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel's module is imported (prepare)
    from smalto.kernels import decode_linear

    if not decode_linear.prepare():
        raise SystemExit("the decode-linear kernel needs Triton")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    batches = [1, 3] if args.smoke else [int(b) for b in args.batch.split(",")]
    variants = args.variants.split(",") if args.variants else variant_names(cuda)
    known = [*variant_names(cuda=True), "bf16:kernel"]
    if unknown := [v for v in variants if v not in known]:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    args.bw = args.bw or next((v for k, v in BANDWIDTH.items() if k in name), 1e12)
    group = f"int4 group {args.group_size}{', symmetric' if args.symmetric else ''}"
    print(f"# quant_kernels on {name}, torch {torch.__version__}, {group}", flush=True)
    rows = []
    for batch in batches:
        print(f"\n## batch {batch}")
        print_row(["variant", "shape", "MB", "µs", "GB/s", "of peak", "err"])
        for shape, (N, K) in shapes.items():
            for v in variants:
                r = measure(v, shape, N, K, batch, args, device, dtype)
                rows.append(r)
                if "error" in r:
                    print_row([v, shape, "", "", "", "", r["error"]])
                    continue
                t = (
                    [f"{r['us']:.1f}", f"{r['gbps']:.0f}", f"{100 * r['of_peak']:.0f}%"]
                    if "us" in r
                    else ["-"] * 3
                )
                print_row([v, shape, f"{r['weight_mb']:.1f}", *t, f"{r['err']:.1e}"])
        if cuda:
            summary(rows, batch, variants)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "quant_kernels.json"
        out.write_text(
            json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n"
        )
        print(f"wrote {out}")


def summary(rows: list[dict], batch: int, variants: list[str]) -> None:
    """µs of one block's four linears per variant, and the ratio to bf16:cublas."""
    total = {}
    for v in variants:
        got = [r for r in rows if r["variant"] == v and r["batch"] == batch and "us" in r]
        if got and len(got) == len({r["shape"] for r in rows if r["batch"] == batch}):
            total[v] = sum(r["us"] for r in got)
    base = total.get("bf16:cublas")
    print(f"\nbatch {batch}, the shapes together: " + ", ".join(
        f"{v} {us:.0f} µs" + (f" ({us / base:.2f}×)" if base else "") for v, us in total.items()
    ), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
