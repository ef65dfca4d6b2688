"""Single-kernel probes behind the training decisions of docs/benchmarks.md (CUDA only).

    python bench/kernel_probes.py attention-plans   # every cuDNN plan of the MPT-1B attention, packed vs BHSD
    python bench/kernel_probes.py attention-plans 0.05   # the same with q, k, v as small as a new model's
    python bench/kernel_probes.py gelu              # the MLP's GELU: exact, tanh, a polynomial erf, a copy's time
    python bench/kernel_probes.py mlp-epilogues     # cuDNN matmul with a GELU / GELU-backward epilogue vs cuBLAS

Shapes are MPT-1B's training micro-batch (16 × 2048 tokens: x (32768, 2048), the MLP's (32768, 8192)). Each prints
a table; times are the mean of 20 launches after a warm-up, by CUDA events. `attention-plans` and `mlp-epilogues`
need the `cudnn` package (nvidia-cudnn-frontend).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from smalto.kernels import gelu as smalto_gelu

DEV = torch.device("cuda")
B, T, H, D = 16, 2048, 16, 128  # MPT-1B attention at micro-batch 16
M, DM, FF = B * T, 2048, 8192  # MPT-1B MLP: tokens, d_model, ffn hidden


def timeit(fn: Callable[[], object], iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def show(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)


def all_plans(cudnn, graph, pack: dict, handle, check: Callable[[], str] | None = None) -> list[list[str]]:
    """Build every plan cuDNN offers for `graph` (heuristics A, B and fallback) and time each."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    rows = []
    for i in range(graph.get_execution_plan_count()):
        size = max(1, graph.get_workspace_size_plan_at_index(i))
        ws = torch.empty(size, dtype=torch.uint8, device=DEV)
        try:
            ms = timeit(lambda: graph.execute_plan_at_index(pack, ws, index=i, handle=handle))  # noqa: B023
            rows.append([str(i), graph.get_plan_name_at_index(i), f"{ms:.3f}", check() if check else ""])
        except Exception as e:  # a plan that builds but does not run here
            rows.append([str(i), "?", "failed", f"{type(e).__name__}: {str(e)[:80]}"])
    return rows


def attention_plans(std: float = 1.0) -> None:
    """cuDNN's ALiBi attention at MPT-1B: each forward and backward plan, on views of the packed QKV projection (what
    smalto/kernels/cudnn_attention.py runs) and on contiguous (B, H, T, D) tensors; q, k, v drawn with standard
    deviation `std` (a freshly initialised model's are small: its scores, and so its softmax, are flat)."""
    import cudnn  # type: ignore[import-not-found]

    from smalto.kernels import cudnn_attention as ca

    handle = ca._handle(DEV.index or 0)
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    scale = 1 / math.sqrt(D)
    io, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    rows = []
    for layout in ("packed", "bhsd"):
        if layout == "packed":
            W = 3 * H * D
            ql = ((B, H, T, D), (T * W, D, W, 1))
            ol = ((B, H, T, D), (T * H * D, D, H * D, 1))
            packed = (torch.randn(B, T, W, device=DEV) * std).bfloat16()
            q, k, v = ca._views(packed, H, H)
            dq, dk, dv = ca._views(torch.empty_like(packed), H, H)
            o = ca._out((B, T, H, H, D), packed)
        else:
            ql = ol = ((B, H, T, D), (H * T * D, T * D, D, 1))
            q, k, v = ((torch.randn(B, H, T, D, device=DEV) * std).bfloat16() for _ in range(3))
            dq, dk, dv = (torch.empty_like(q) for _ in range(3))
            o = torch.empty_like(q)
        d_o = torch.randn_like(o)
        stats = torch.empty(B, H, T, 1, device=DEV, dtype=torch.float32)
        sl = ((B, H, T, 1), (H * T, T, 1, 1))
        band = dict(
            attn_scale=scale,
            use_alibi_mask=True,
            diagonal_band_right_bound=0,
            diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
        )

        def tensor(g, name, lay, dt=io):
            return g.tensor(name=name, dim=list(lay[0]), stride=list(lay[1]), data_type=dt)

        types = dict(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        fwd = cudnn.pygraph(**types)
        fq, fk, fv = tensor(fwd, "q", ql), tensor(fwd, "k", ql), tensor(fwd, "v", ql)
        fo, fs = fwd.sdpa(name="sdpa", q=fq, k=fk, v=fv, generate_stats=True, **band)
        fo.set_output(True).set_dim(list(ol[0])).set_stride(list(ol[1])).set_data_type(io)
        fs.set_output(True).set_dim(list(sl[0])).set_stride(list(sl[1])).set_data_type(f32)
        for r in all_plans(cudnn, fwd, {fq: q, fk: k, fv: v, fo: o, fs: stats}, handle):
            rows.append([layout, "forward", *r])
        bwd = cudnn.pygraph(**types)
        bq, bk, bv = tensor(bwd, "q", ql), tensor(bwd, "k", ql), tensor(bwd, "v", ql)
        bo, bdo, bs = tensor(bwd, "o", ol), tensor(bwd, "dO", ol), tensor(bwd, "stats", sl, f32)
        grads = bwd.sdpa_backward(name="sdpa_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bs, **band)
        for t in grads:
            t.set_output(True).set_dim(list(ql[0])).set_stride(list(ql[1])).set_data_type(io)
        pack = {bq: q, bk: k, bv: v, bo: o, bdo: d_o, bs: stats, grads[0]: dq, grads[1]: dk, grads[2]: dv}
        for r in all_plans(cudnn, bwd, pack, handle):
            rows.append([layout, "backward", *r])
    show(
        f"cuDNN ALiBi attention plans, (B, H, T, D) = {(B, H, T, D)}, q, k, v std {std}",
        ["layout", "pass", "plan", "engine", "ms", ""],
        rows,
    )


def gelu_poly_backward(gy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dGELU·gy, GELU(x)) by smalto/kernels/gelu.py's polynomial erf, sharing one exp(−x²/2): the backward that also
    recomputes the forward for a weight gradient."""
    xf = x.float()
    cdf, e = smalto_gelu._cdf_and_exp(xf)
    return (gy.float() * (cdf + xf * e * smalto_gelu.INV_SQRT_2PI)).to(x.dtype), (xf * cdf).to(x.dtype)


def _gelu_exact(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_poly(x: torch.Tensor) -> torch.Tensor:
    return smalto_gelu.gelu(x)


def _gelu_poly_precise(x: torch.Tensor) -> torch.Tensor:
    """The precise form: 1/y as a division and exp as exp, both precise instruction sequences on CUDA."""
    xf = x.float()
    z = xf * smalto_gelu.SQRT_HALF
    a = z.abs()
    t = 1.0 / (1.0 + smalto_gelu.P * a)
    g = smalto_gelu
    tail = 0.5 * t * (g.A1 + t * (g.A2 + t * (g.A3 + t * (g.A4 + t * g.A5)))) * torch.exp(-a * a)
    return (xf * torch.where(z < 0, tail, 1.0 - tail)).to(x.dtype)


def _scale(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


def _dgelu(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(gy, x)


def _dgelu_and_gelu(gy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.aten.gelu_backward(gy, x), F.gelu(x)


def _mul(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return gy * x


def gelu() -> None:
    h = torch.randn(M, FF, device=DEV, dtype=torch.bfloat16)
    g = torch.randn_like(h)
    fwd = {
        "exact (F.gelu)": torch.compile(_gelu_exact),
        "tanh approximation": torch.compile(_gelu_tanh),
        "polynomial erf (shipped: rsqrt, exp2)": torch.compile(_gelu_poly),
        "polynomial erf, division and exp": torch.compile(_gelu_poly_precise),
        "x * 1.5 (memory roofline)": torch.compile(_scale),
    }
    bwd = {
        "exact": torch.compile(_dgelu),
        "exact + recomputed forward": torch.compile(_dgelu_and_gelu),
        "polynomial + recomputed forward": torch.compile(gelu_poly_backward),
        "gy * x (memory roofline)": torch.compile(_mul),
    }
    exact = fwd["exact (F.gelu)"](h)
    rows = []
    for name, fn in fwd.items():
        y = fn(h)
        differ = "" if "roofline" in name else f"{int((y != exact).sum()):,}"
        rows.append(["forward", name, f"{timeit(lambda: fn(h)):.3f}", differ])  # noqa: B023
    for name, bfn in bwd.items():
        rows.append(["backward", name, f"{timeit(lambda: bfn(g, h)):.3f}", ""])  # noqa: B023
    show(
        f"GELU of a bf16 ({M}, {FF}) activation, compiled",
        ["pass", "variant", "ms", f"bf16 outputs unlike exact (of {h.numel():,})"],
        rows,
    )


def mlp_epilogues() -> None:
    """The up-projection with GELU in cuDNN's matmul epilogue (with and without also writing the pre-activation,
    which the backward needs), and the down-projection's data gradient with GELU's derivative in its epilogue,
    against cuBLAS plus inductor's separate kernel."""
    import cudnn  # type: ignore[import-not-found]

    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    bf, f32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT
    x = torch.randn(M, DM, device=DEV, dtype=torch.bfloat16)
    w_up = torch.randn(FF, DM, device=DEV, dtype=torch.bfloat16) * 0.02
    w_dn = torch.randn(DM, FF, device=DEV, dtype=torch.bfloat16) * 0.02
    dy = torch.randn(M, DM, device=DEV, dtype=torch.bfloat16)
    h = x @ w_up.t()
    da = dy @ w_dn
    gelu_c = torch.compile(lambda t: F.gelu(t))
    dgelu_c = torch.compile(lambda gy, t: torch.ops.aten.gelu_backward(gy, t))
    rows = [
        ["up: cuBLAS mm", "", f"{timeit(lambda: x @ w_up.t()):.3f}", ""],
        ["up: inductor GELU after it", "", f"{timeit(lambda: gelu_c(h)):.3f}", ""],
        ["down dgrad: cuBLAS mm", "", f"{timeit(lambda: dy @ w_dn):.3f}", ""],
        ["down dgrad: inductor GELU backward after it", "", f"{timeit(lambda: dgelu_c(da, h)):.3f}", ""],
    ]
    a_ref = F.gelu(h.float()).bfloat16()

    def graph():
        return cudnn.pygraph(
            io_data_type=bf, intermediate_data_type=f32, compute_data_type=f32, handle=handle
        )

    def up_operands(g):
        a = g.tensor(name="x", dim=[1, M, DM], stride=[M * DM, DM, 1], data_type=bf)
        b = g.tensor(name="w", dim=[1, DM, FF], stride=[FF * DM, 1, DM], data_type=bf)  # w_up transposed
        return a, b

    out_a = torch.empty(1, M, FF, device=DEV, dtype=torch.bfloat16)
    out_h = torch.empty_like(out_a)
    g = graph()
    xa, wb = up_operands(g)
    act = g.gelu(name="gelu", input=g.matmul(name="mm", A=xa, B=wb))
    act.set_output(True).set_data_type(bf)
    pack = {xa: x.view(1, M, DM), wb: w_up.t().unsqueeze(0), act: out_a}
    for r in all_plans(cudnn, g, pack, handle):
        rows.append([f"up: cuDNN mm + GELU, GELU(h) only, plan {r[0]}", r[1], r[2], r[3]])
    g = graph()
    xa, wb = up_operands(g)
    pre = g.matmul(name="mm", A=xa, B=wb)
    pre.set_output(True).set_data_type(bf)
    act = g.gelu(name="gelu", input=pre)
    act.set_output(True).set_data_type(bf)
    pack = {xa: x.view(1, M, DM), wb: w_up.t().unsqueeze(0), pre: out_h, act: out_a}

    def same_as_exact() -> str:
        return f"{int((out_a[0] != a_ref).sum()):,} outputs unlike F.gelu"

    for r in all_plans(cudnn, g, pack, handle, same_as_exact):
        rows.append([f"up: cuDNN mm + GELU, h and GELU(h), plan {r[0]}", r[1], r[2], r[3]])
    g = graph()
    gy = g.tensor(name="dy", dim=[1, M, DM], stride=[M * DM, DM, 1], data_type=bf)
    wd = g.tensor(name="wd", dim=[1, DM, FF], stride=[FF * DM, FF, 1], data_type=bf)
    hin = g.tensor(name="h", dim=[1, M, FF], stride=[M * FF, FF, 1], data_type=bf)
    dh = g.gelu_backward(name="dgelu", loss=g.matmul(name="mm", A=gy, B=wd), input=hin)
    dh.set_output(True).set_data_type(bf)
    pack = {gy: dy.view(1, M, DM), wd: w_dn.unsqueeze(0), hin: h.view(1, M, FF), dh: out_a}
    for r in all_plans(cudnn, g, pack, handle):
        rows.append([f"down dgrad: cuDNN mm + GELU backward, plan {r[0]}", r[1], r[2], r[3]])
    show(f"MPT-1B MLP GEMMs with GELU epilogues, {M} tokens", ["kernel", "engine", "ms", ""], rows)


def _usage(message: str) -> NoReturn:
    print(f"kernel_probes.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    probes = {"gelu": gelu, "mlp-epilogues": mlp_epilogues}
    names = ", ".join(["attention-plans", *probes])
    what, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if what in ("-h", "--help"):
        print(__doc__)
        return
    if what not in (*probes, "attention-plans"):
        _usage(f"choose one of {names} (see --help)")
    if not torch.cuda.is_available():
        _usage("needs a CUDA GPU")
    if what == "attention-plans":
        try:
            std = float(rest[0]) if rest else 1.0
        except ValueError:
            _usage(f"attention-plans takes the q/k/v standard deviation, a number, not {rest[0]!r}")
        attention_plans(std)
    else:
        probes[what]()


if __name__ == "__main__":
    main()
