"""Causal attention with ALiBi in cuDNN's flash-attention kernels: training's fastest path on Hopper GPUs.

cuDNN's fused attention has ALiBi built in (`use_alibi_mask`: slope_h · (j − i) added to the scaled scores, with
the slopes of the ALiBi paper, which are MPT's for `alibi_bias_max: 8` at any head count) and a causal band, in
its forward and its backward. On an H200 at the MPT-1B shape its forward + backward runs 2.23 ms against 3.02 ms
for FlexAttention with ALiBi as a score_mod (bench/bench_attention.py, docs/benchmarks.md).

The kernels are reached through NVIDIA's `cudnn` Python package (nvidia-cudnn-frontend, `pip install
"smalto[cudnn]"`), which builds a graph per shape once and then executes it on PyTorch's tensors and stream. It is
optional: for training, `attn_impl: auto` uses it when it imports and the step is one it computes (CUDA, bf16/fp16,
ALiBi with bias max 8 or no positional bias, no dropout; `why_not` says which is missing), FlexAttention otherwise.
It computes plain causal self-attention from position 0 (`CUDNN.accepts`); a training plan that chooses it takes
FlexAttention for batches with padding or packed documents.

`cudnn_attention(qkv, n_heads, kv_heads, alibi, scale)` is a `torch.library` custom op with autograd (its backward
another custom op), so a `torch.compile`d block calls it as one opaque kernel. It takes the packed (B, T, (H + 2K)·D)
projection (rows Q | K | V, as `Wqkv` makes it) and hands cuDNN strided views of it; the backward writes dQ, dK and
dV into the same views of one packed gradient, which is then the projection's gradient as it is, where separate
dq, dk, dv would be concatenated by autograd (a copy of three activations per block). The output is (B, H, T, D)
laid out as (B, T, H, D), so the `transpose(1, 2).reshape` that follows is free. GQA (H a multiple of K) is cuDNN's
own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from smalto.model.attention import AttentionInputs, AttentionKernel, AttentionMask
from smalto.model.config import MPTConfig

MISSING = 'the "cudnn" package (nvidia-cudnn-frontend) is not installed: pip install "smalto[cudnn]"'


@functools.cache
def _cudnn():
    try:
        import cudnn  # type: ignore[import-not-found]
    except Exception:  # not installed, or its CUDA libraries do not load
        return None
    return cudnn


def available() -> bool:
    return torch.cuda.is_available() and _cudnn() is not None


@functools.cache
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return _cudnn().create_handle()


Layout = tuple[tuple[int, ...], tuple[int, ...]]  # (shape, strides) of one tensor
# (B, T, H, K, D): batch, length, query heads, key/value heads, head dim
Shape = tuple[int, int, int, int, int]


@dataclass
class _Graphs:
    """One shape's forward and backward graphs and their tensor handles."""

    fwd: object
    bwd: object
    f_in: tuple  # q, k, v
    f_out: tuple  # o, stats
    b_in: tuple  # q, k, v, o, dO, stats
    b_out: tuple  # dq, dk, dv
    workspace: int


def _layouts(shape: Shape) -> tuple[Layout, Layout, Layout]:
    """q (B, H, T, D) and k, v (B, K, T, D) as views of the packed (B, T, (H + 2K)·D) projection, and o
    (B, H, T, D) stored as (B, T, H, D)."""
    B, T, H, K, D = shape
    W = (H + 2 * K) * D
    return (
        ((B, H, T, D), (T * W, D, W, 1)),
        ((B, K, T, D), (T * W, D, W, 1)),
        ((B, H, T, D), (T * H * D, D, H * D, 1)),
    )


def _views(packed: Tensor, H: int, K: int) -> tuple[Tensor, Tensor, Tensor]:
    B, T, W = packed.shape
    D = W // (H + 2 * K)
    q, k, v = packed.split([H * D, K * D, K * D], dim=-1)
    return (
        q.view(B, T, H, D).transpose(1, 2),
        k.view(B, T, K, D).transpose(1, 2),
        v.view(B, T, K, D).transpose(1, 2),
    )


@functools.cache
def _graphs(shape: Shape, dtype: torch.dtype, device_index: int, alibi: bool, scale: float) -> _Graphs:
    cudnn = _cudnn()
    if cudnn is None:
        raise RuntimeError(MISSING)
    handle = _handle(device_index)
    band = dict(
        attn_scale=scale,
        use_alibi_mask=alibi,
        diagonal_band_right_bound=0,  # causal: key j ≤ query i
        diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
    )
    B, T, H, _, _ = shape
    q, kv, o = _layouts(shape)
    stats: Layout = ((B, H, T, 1), (H * T, T, 1, 1))
    io = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]
    types = dict(
        io_data_type=io,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle,
    )

    def tensor(g, name: str, lay: Layout, data_type=io):
        return g.tensor(name=name, dim=list(lay[0]), stride=list(lay[1]), data_type=data_type)

    fwd = cudnn.pygraph(**types)
    f_in = (tensor(fwd, "q", q), tensor(fwd, "k", kv), tensor(fwd, "v", kv))
    f_o, f_s = fwd.sdpa(name="sdpa", q=f_in[0], k=f_in[1], v=f_in[2], generate_stats=True, **band)
    f_o.set_output(True).set_dim(list(o[0])).set_stride(list(o[1])).set_data_type(io)
    f_s.set_output(True).set_dim(list(stats[0])).set_stride(list(stats[1])).set_data_type(
        cudnn.data_type.FLOAT
    )

    bwd = cudnn.pygraph(**types)
    b_in = (
        tensor(bwd, "q", q),
        tensor(bwd, "k", kv),
        tensor(bwd, "v", kv),
        tensor(bwd, "o", o),
        tensor(bwd, "dO", o),  # the backward op copies any other dO layout into o's
        tensor(bwd, "stats", stats, cudnn.data_type.FLOAT),
    )
    bq, bk, bv, bo, bdo, bs = b_in
    b_out = bwd.sdpa_backward(name="sdpa_bwd", q=bq, k=bk, v=bv, o=bo, dO=bdo, stats=bs, **band)
    for t, lay in zip(b_out, (q, kv, kv), strict=True):  # dq, dk, dv: views of one packed gradient
        t.set_output(True).set_dim(list(lay[0])).set_stride(list(lay[1])).set_data_type(io)
    for g in (fwd, bwd):
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
    size = max(fwd.get_workspace_size(), bwd.get_workspace_size())
    return _Graphs(fwd, bwd, f_in, (f_o, f_s), b_in, tuple(b_out), size)


def _shape(packed: Tensor, H: int, K: int) -> Shape:
    B, T, W = packed.shape
    return B, T, H, K, W // (H + 2 * K)


def _out(shape: Shape, like: Tensor) -> Tensor:
    o = _layouts(shape)[2]
    return torch.empty_strided(o[0], o[1], dtype=like.dtype, device=like.device)


def _execute(graph, pack: dict, g: _Graphs, device: torch.device) -> None:
    cudnn = _cudnn()
    handle = _handle(device.index)
    cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)
    workspace = torch.empty(g.workspace, dtype=torch.uint8, device=device)
    graph.execute(pack, workspace, handle=handle)


@torch.library.custom_op("smalto::cudnn_attention_fwd", mutates_args=())
def _fwd(qkv: Tensor, n_heads: int, kv_heads: int, alibi: bool, scale: float) -> tuple[Tensor, Tensor]:
    shape = _shape(qkv, n_heads, kv_heads)
    g = _graphs(shape, qkv.dtype, qkv.device.index, alibi, scale)
    B, T, H = shape[:3]
    o = _out(shape, qkv)
    stats = torch.empty(B, H, T, 1, dtype=torch.float32, device=qkv.device)
    pack = dict(zip(g.f_in, _views(qkv, n_heads, kv_heads), strict=True))
    pack.update({g.f_out[0]: o, g.f_out[1]: stats})
    _execute(g.fwd, pack, g, qkv.device)
    return o, stats


@_fwd.register_fake
def _(qkv, n_heads, kv_heads, alibi, scale):
    shape = _shape(qkv, n_heads, kv_heads)
    B, T, H = shape[:3]
    return _out(shape, qkv), qkv.new_empty(B, H, T, 1, dtype=torch.float32)


@torch.library.custom_op("smalto::cudnn_attention_bwd", mutates_args=())
def _bwd(
    qkv: Tensor, o: Tensor, stats: Tensor, d_o: Tensor, n_heads: int, kv_heads: int, alibi: bool, scale: float
) -> Tensor:
    if d_o.stride() != o.stride():  # autograd hands dO in o's layout; anything else is copied into it
        d_o = torch.empty_like(o).copy_(d_o)
    g = _graphs(_shape(qkv, n_heads, kv_heads), qkv.dtype, qkv.device.index, alibi, scale)
    d_qkv = torch.empty_like(qkv)
    pack = dict(zip(g.b_in, (*_views(qkv, n_heads, kv_heads), o, d_o, stats), strict=True))
    pack.update(zip(g.b_out, _views(d_qkv, n_heads, kv_heads), strict=True))
    _execute(g.bwd, pack, g, qkv.device)
    return d_qkv


@_bwd.register_fake
def _(qkv, o, stats, d_o, n_heads, kv_heads, alibi, scale):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output) -> None:
    qkv, n_heads, kv_heads, alibi, scale = inputs
    o, stats = output
    ctx.save_for_backward(qkv, o, stats)
    ctx.mark_non_differentiable(stats)
    ctx.args = (n_heads, kv_heads, alibi, scale)


def _backward(ctx, d_o: Tensor, _d_stats: Tensor | None):
    qkv, o, stats = ctx.saved_tensors
    return _bwd(qkv, o, stats, d_o, *ctx.args), None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def cudnn_attention(qkv: Tensor, n_heads: int, kv_heads: int, alibi: bool, scale: float) -> Tensor:
    """Causal self-attention (T queries at positions 0..T-1 over the same T keys) of the packed (B, T, (H + 2K)·D)
    projection, rows Q | K | V; with cuDNN's ALiBi when asked. Returns (B, H, T, D), stored as (B, T, H, D)."""
    return _fwd(qkv.contiguous(), n_heads, kv_heads, alibi, scale)[0]


def why_not(
    config: MPTConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    seq: int,
) -> str | None:
    """None when cuDNN computes this model's causal attention for a (batch, seq) forward; else the reason it does
    not (for `attn_impl: cudnn`'s error and the training plan's reason).

    The last check builds the very graphs a step runs (q, k, v and their gradients as views of the packed QKV
    projection), so a cuDNN that refuses the shape is found here, not in the middle of a step."""
    a = config.attn_config
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it runs on CUDA only"
    if _cudnn() is None:
        return MISSING
    if dtype not in (torch.bfloat16, torch.float16):
        return f"its kernels take bf16 or fp16, not {dtype} (train with train.precision bf16)"
    if a.alibi and a.alibi_bias_max != 8:
        return f"its ALiBi slopes are those of alibi_bias_max 8, not {a.alibi_bias_max}"
    if a.attn_pdrop > 0:
        return "smalto does not pass attention dropout to it; set attn_config.attn_pdrop 0"
    shape = (batch, seq, config.n_heads, config.kv_n_heads, config.head_dim)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe(shape, dtype, index, a.alibi, config.softmax_scale)


@functools.cache  # a refusal too: a failing build must not be retried
def _probe(shape: Shape, dtype: torch.dtype, index: int, alibi: bool, scale: float) -> str | None:
    try:
        _graphs(shape, dtype, index, alibi, scale)
    except Exception as e:  # cuDNN's own words: the version, the head dim, GQA...
        B, T, H, K, D = shape
        return (
            f"cuDNN does not support (B, H, K, T, D) = {(B, H, K, T, D)}: {type(e).__name__}: {str(e)[:200]}"
        )
    return None


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    qkv: Tensor | None,
    inputs: AttentionInputs,
    scale: float,
    dropout_p: float,
):
    B, H, T, _ = q.shape
    if qkv is None:  # QK-norm or RoPE made new q, k: pack them again (the kernel reads one projection)
        qkv = torch.cat([t.transpose(1, 2).reshape(B, T, -1) for t in (q, k, v)], dim=-1)
    return cudnn_attention(qkv, H, k.shape[1], inputs.slopes is not None, scale)


def _accepts(mask: AttentionMask) -> bool:
    """Plain causal self-attention from position 0: no padding, documents, window or cache."""
    return mask.causal_only and mask.from_zero


CUDNN = AttentionKernel("cudnn", _attend, accepts=_accepts)
