"""The autotuned decode-linear kernel (smalto/model/decode_linear.py) equals a float32 matmul, and the model's
inference on a few CUDA rows runs it while training does not (run on a GPU: `pytest -m gpu tests/gpu`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from smalto.generate import generate
from smalto.model import decode_linear
from smalto.model.layers import Activation
from tests.model.helpers import tiny, tokens

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _built():
    assert decode_linear.prepare(), "the decode-linear kernel needs Triton"


def _ran_kernel(fn) -> bool:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("skinny_matmul_kernel" in e.key for e in prof.key_averages())


@pytest.mark.parametrize(
    "rows,N,K,dtype",
    [
        (1, 1000, 2048, torch.bfloat16),
        (1, 384, 200, torch.float16),  # ragged K
        (4, 384, 512, torch.bfloat16),
        (16, 200, 300, torch.float16),  # ragged N and K
        (7, 96, 64, torch.bfloat16),
    ],
)
def test_kernel_equals_a_float32_matmul(rows, N, K, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, device="cuda", generator=g).to(dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    with torch.inference_mode():
        assert decode_linear.supports(x, w)
        got = decode_linear.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, N)
    torch.testing.assert_close(
        got.float(), ref, atol=2e-2, rtol=1e-2
    )  # one rounding of the output to 16 bits


@pytest.mark.parametrize(
    "rows,norm,act,dtype",
    [(1, "layernorm", None, torch.bfloat16), (1, None, "gelu", torch.bfloat16), (1, "layernorm", "gelu", torch.float16),
     (1, "rmsnorm", "silu", torch.bfloat16), (16, None, "silu", torch.bfloat16), (3, None, "gelu_tanh", torch.float16),
     (16, "layernorm", "gelu", torch.bfloat16), (5, "rmsnorm", None, torch.float16)],  # the few-row norm (NORM_ROWS)
)  # fmt: skip
def test_fused_norm_activation_residual_equal_float32(rows, norm, act, dtype):
    N, K = 640, 1536
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (3 * torch.randn(rows, K, device="cuda", generator=g) + 1).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dtype)
    r = torch.randn(rows, N, device="cuda", generator=g).to(dtype)
    h = x.float()
    if norm == "layernorm":
        h = F.layer_norm(h, (K,), nw.float(), None, 1e-5)
    elif norm == "rmsnorm":
        h = F.rms_norm(h, (K,), nw.float(), 1e-5)
    ref = Activation(act)(F.linear(h, w.float())) if act else F.linear(h, w.float())
    ref = ref + r.float()
    with torch.inference_mode():
        got = decode_linear.linear(x, w, norm=(norm, nw, None, 1e-5) if norm else None, act=act, residual=r)
    torch.testing.assert_close(
        got.float(), ref, atol=3e-2, rtol=2e-2
    )  # normed x rounded to 16 bits, as F does


def test_only_inference_on_a_few_rows_uses_it():
    x = torch.randn(2, 1, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert decode_linear.supports(x, w)
        assert not decode_linear.supports(x.float(), w.float())  # float32: cuBLAS
        assert not decode_linear.supports(
            torch.randn(17, 64, device="cuda", dtype=torch.bfloat16), w
        )  # a prefill
        assert not decode_linear.supports(x.cpu(), w.cpu())
    assert not decode_linear.supports(x, w.requires_grad_())  # training


def test_bf16_generation_runs_the_kernel_and_matches_cublas(monkeypatch):
    model = tiny(max_seq_len=256, d_model=128).cuda().to(torch.bfloat16)
    prompts = [tokens(1, 20)[0].tolist(), tokens(1, 7, seed=3)[0].tolist()]
    kw = dict(max_new_tokens=16, temperature=0, ignore_eos=True)
    ids = tokens(1, 9).cuda()
    norms = []
    hooks = [b.norm_1.register_forward_hook(lambda *a: norms.append(1)) for b in model.transformer.blocks]
    with torch.inference_mode():
        assert _ran_kernel(lambda: model(ids[:, :1]))  # one row: the kernel
        assert not norms  # norm_1 ran inside Wqkv's kernel
        assert not _ran_kernel(lambda: model(torch.cat([ids, ids, ids])))  # 27 rows: cuBLAS
        assert norms  # and the norm as a module
        fast = model(ids[:, :1]).logits.float()
        monkeypatch.setattr(decode_linear, "MAX_ROWS", 0)
        ref = model(ids[:, :1]).logits.float()
    torch.testing.assert_close(fast, ref, atol=3e-2, rtol=2e-2)
    for h in hooks:
        h.remove()
    ref_tokens = generate(model, None, prompts, compile=True, **kw)  # cuBLAS (MAX_ROWS still 0)
    monkeypatch.undo()
    fast_tokens: list = []
    assert _ran_kernel(lambda: fast_tokens.extend(generate(model, None, prompts, compile=True, **kw)))
    assert model.__dict__["_smalto_decoder"].compiled  # no fallback to the eager step
    pairs = [
        (a, b)
        for x, y in zip(ref_tokens, fast_tokens, strict=True)
        for a, b in zip(x.token_ids, y.token_ids, strict=True)
    ]
    assert len(pairs) == 2 * 16
    assert sum(a == b for a, b in pairs) >= 24  # bf16 greedy paths may part at a near tie; most tokens agree


def test_a_captured_chain_with_programmatic_dependent_launch_equals_float32(monkeypatch):
    """With PDL (opt-in, Hopper+) each launch in a CUDA graph may start before the one before it ends: a chain of
    products, each reading the previous one's output (and adding it as the residual), must still see every input
    complete."""
    monkeypatch.setattr(decode_linear, "PDL", True)
    assert torch.cuda.get_device_capability()[0] < 9 or decode_linear._pdl_capable(
        torch.cuda.current_device()
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(512, 512, device="cuda", generator=g) / 512**0.5).bfloat16() for _ in range(8)]
    x0 = torch.randn(1, 512, device="cuda", generator=g).bfloat16()

    def chain(x):
        for w in ws:
            x = decode_linear.run(x, w, act="gelu", residual=x)
        return x

    with torch.inference_mode():
        chain(x0)  # autotune outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(x0)
        graph.replay()
        ref = x0.float()
        for w in ws:
            ref = F.gelu(F.linear(ref.bfloat16().float(), w.float())) + ref.bfloat16().float()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)
