"""smalto/kernels/decode_linear.py: the kernel's logic on CPU through Triton's interpreter equals x · wᵀ at decode
shapes (one row on CUDA cores, a few rows on the tensor-core path, ragged edges), with its fused prologue (LayerNorm,
RMSNorm) and epilogue (bias, activation, residual) equal to the modules they replace; the op traces in one graph;
and a model whose blocks take the fused decode path computes what the unfused blocks compute.
On a GPU, tests/gpu/test_decode_linear.py checks the autotuned kernel and the model's use of it."""

import pytest
import torch
import torch.nn.functional as F

from smalto.kernels import DecodeOptions, decode_linear
from smalto.kernels.decode_block import FusedDecodeBlock, decode_blocks
from smalto.model.layers import Activation
from tests.model.helpers import tiny, tokens, use_triton_interpreter

use_triton_interpreter()


@pytest.fixture(autouse=True)
def _built():
    assert decode_linear.prepare(), "Triton is installed: the op must build"


def op(x, w, bias=None, norm_w=None, norm_b=None, residual=None, norm="", eps=0.0, act=None):
    assert decode_linear._OP is not None
    kind = decode_linear.NORMS[norm] if norm else 0
    return decode_linear._OP(
        x, w, bias, norm_w, norm_b, residual, kind, eps, decode_linear.ACTS[act] if act else 0
    )


@pytest.mark.parametrize("M,N,K", [(1, 96, 256), (1, 70, 200), (5, 96, 128), (16, 64, 192), (3, 50, 100)])
def test_kernel_equals_matmul(M, N, K):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    torch.testing.assert_close(op(x, w), x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "M,N,K,norm,norm_bias,act,bias,residual",
    [
        (1, 96, 200, "layernorm", False, None, False, False),  # MPT's norm_1 → Wqkv
        (1, 70, 128, "layernorm", True, "gelu", True, False),  # norm_2 → up_proj → GELU, with biases
        (1, 50, 100, "rmsnorm", False, "silu", False, False),
        (16, 64, 96, None, False, "gelu_tanh", False, True),
        (5, 40, 64, None, False, "relu", True, True),
        (1, 72, 130, None, False, None, False, True),  # out_proj / down_proj + the residual stream
        (
            3,
            70,
            128,
            "layernorm",
            True,
            "gelu",
            True,
            True,
        ),  # the same on the tensor-core path (NORM_ROWS > 1)
        (16, 40, 96, "rmsnorm", False, "silu", False, False),
    ],
)
def test_fused_work_equals_the_modules(M, N, K, norm, norm_bias, act, bias, residual):
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(M, K, generator=g) + 1.5  # a mean and scale for the norm to remove
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    nw, nb = 1 + 0.1 * torch.randn(K, generator=g), (torch.randn(K, generator=g) if norm_bias else None)
    r = torch.randn(M, N, generator=g) if residual else None
    h = x
    if norm == "layernorm":
        h = F.layer_norm(x, (K,), nw, nb, 1e-5)
    elif norm == "rmsnorm":
        h = F.rms_norm(x, (K,), nw, 1e-5)
    ref = F.linear(h, w, b)
    ref = Activation(act)(ref) if act else ref
    ref = ref + r if r is not None else ref
    got = op(x, w, b, nw if norm else None, nb, r, norm or "", 1e-5, act)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_op_traces_in_one_graph():
    w = torch.randn(32, 64)
    f = torch.compile(lambda x: op(x, w) * 2, backend="eager", fullgraph=True)
    x = torch.randn(1, 64)
    torch.testing.assert_close(f(x), 2 * (x @ w.T), atol=1e-4, rtol=1e-4)


def test_cpu_inputs_take_f_linear():  # the CUDA conditions: tests/gpu/test_decode_linear.py
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    x = torch.randn(1, 1, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not decode_linear.supports(x, w)  # CPU: F.linear
        got = decode_linear.linear_or_matmul(x, w, torch.ones(8, dtype=torch.bfloat16))
    torch.testing.assert_close(got, F.linear(x, w, torch.ones(8, dtype=torch.bfloat16)))


def _decode_path(model, blocks, ids):
    """What the decoder's step computes, over `blocks`, for a forward without a cache."""
    tr = model.transformer
    x, inputs = tr.embed(ids)
    for block in blocks:
        x = block(x, inputs, None)
    return model.unembed(tr.norm_f(x))


def _lift_device_check(monkeypatch):
    """Only the CUDA condition lifted, so that the kernel (through the interpreter), not F.linear, takes the rows."""
    monkeypatch.setattr(
        decode_linear, "supports", lambda x, w, max_rows=16: 0 < x.numel() // x.shape[-1] <= max_rows
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # MPT as published: low-precision LayerNorm without bias, exact GELU, no biases
        {"no_bias": False, "norm_type": "layernorm", "ffn_config": {"ffn_act_fn": {"name": "gelu_tanh"}}},
        {"norm_type": "rmsnorm", "ffn_config": {"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}}},
    ],
)
@pytest.mark.parametrize(("norm_rows", "fuse"), [(1, True), (16, True), (1, False)])
def test_blocks_fused_for_decode_equal_unfused(overrides, norm_rows, fuse, monkeypatch):
    """The fused decode blocks on CPU through the interpreter: one row and 12 rows compute what the model's own
    blocks compute, the norms inside the kernel up to `norm_rows` rows and as modules above."""
    model = tiny(**overrides)
    calls = []
    for block in model.transformer.blocks:
        block.norm_1.register_forward_hook(lambda *a: calls.append(1))
        block.norm_2.register_forward_hook(lambda *a: calls.append(1))
    blocks = decode_blocks(model, DecodeOptions(norm_rows=norm_rows, fuse=fuse))
    assert all(isinstance(b, FusedDecodeBlock) for b in blocks)
    with torch.no_grad():
        for ids in (tokens(1, 1), tokens(2, 6)):
            ref = model(ids).logits
            calls.clear()
            _lift_device_check(monkeypatch)
            got = _decode_path(model, blocks, ids)
            monkeypatch.undo()
            assert bool(calls) == (not fuse or ids.numel() > norm_rows)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_more_rows_than_the_options_allow_run_the_block(monkeypatch):
    model = tiny()
    blocks = decode_blocks(model, DecodeOptions(linear_rows=4))
    ran = []
    model.transformer.blocks[0].register_forward_hook(lambda *a: ran.append(1))
    _lift_device_check(monkeypatch)
    with torch.no_grad():
        _decode_path(model, blocks, tokens(1, 4))
        assert not ran  # 4 rows: the fused path
        torch.testing.assert_close(_decode_path(model, blocks, tokens(1, 5)), model(tokens(1, 5)).logits)
        assert ran  # 5 rows: the block itself


def test_a_wrapped_linear_turns_the_fusion_off(monkeypatch):
    """An adapter library (LoRA) wraps a linear and adds a branch of its own on the input: that branch must see
    norm(x), so a block with a wrapped linear is decoded as it is."""

    class Adapter(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base, self.weight = base, base.weight

        def forward(self, x):
            return self.base(x) + x[..., :1]  # a branch of its own on the input

    model = tiny()
    for block in model.transformer.blocks:
        block.attn.Wqkv = Adapter(block.attn.Wqkv)
    blocks = decode_blocks(model, DecodeOptions())
    assert blocks == list(model.transformer.blocks)
    ids = tokens(1, 1)
    with torch.no_grad():
        ref = model(ids).logits
        _lift_device_check(monkeypatch)
        got = _decode_path(model, blocks, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_no_options_means_the_plain_blocks():
    model = tiny()
    assert decode_blocks(model, None) == list(model.transformer.blocks)
