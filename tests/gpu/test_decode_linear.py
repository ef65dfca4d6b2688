"""The autotuned decode-linear kernel (smalto/kernels/decode_linear.py) equals a float32 matmul, and the decode
step's fused blocks (smalto/kernels/decode_block.py) run it on a few CUDA rows while training does not (run on a
GPU: `pytest -m gpu tests/gpu`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from smalto.generate import generate
from smalto.kernels import DecodeOptions, decode_linear
from smalto.kernels.decode_block import FusedDecodeBlock, decode_blocks
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
     (16, "layernorm", "gelu", torch.bfloat16), (5, "rmsnorm", None, torch.float16)],  # the few-row norm (norm_rows)
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
        assert not decode_linear.supports(x, w, max_rows=1)  # more rows than the options allow
        assert not decode_linear.supports(x.float(), w.float())  # float32: cuBLAS
        assert not decode_linear.supports(
            torch.randn(17, 64, device="cuda", dtype=torch.bfloat16), w
        )  # a prefill
        assert not decode_linear.supports(x.cpu(), w.cpu())
        torch.testing.assert_close(  # F.linear where the kernel does not apply
            decode_linear.linear_or_matmul(x, w, max_rows=0), F.linear(x, w)
        )
    assert not decode_linear.supports(x, w.requires_grad_())  # training


def _decode_path(model, blocks, ids, max_rows: int):
    """What the decoder's step computes over `blocks` (and its unembedding), for a forward without a cache."""
    tr = model.transformer
    x, inputs = tr.embed(ids)
    for block in blocks:
        x = block(x, inputs, None)
    h = tr.norm_f(x)
    return model.scale_logits(decode_linear.linear_or_matmul(h, model.unembedding, max_rows=max_rows))


def test_bf16_generation_runs_the_kernel_and_matches_cublas():
    model = tiny(max_seq_len=256, d_model=128).cuda().to(torch.bfloat16)
    prompts = [tokens(1, 20)[0].tolist(), tokens(1, 7, seed=3)[0].tolist()]
    kw = dict(max_new_tokens=16, temperature=0)  # no tokenizer: no EOS, every row runs to the end
    cublas = DecodeOptions(linear_rows=0)
    ids = tokens(1, 9).cuda()
    fused = decode_blocks(model, DecodeOptions())
    assert all(isinstance(b, FusedDecodeBlock) for b in fused)
    assert decode_blocks(model, cublas) == list(model.transformer.blocks)  # linear_rows 0: the plain blocks
    norms = []
    hooks = [b.norm_1.register_forward_hook(lambda *a: norms.append(1)) for b in model.transformer.blocks]
    with torch.inference_mode():
        assert _ran_kernel(lambda: _decode_path(model, fused, ids[:, :1], 16))  # one row: the kernel
        assert not norms  # norm_1 ran inside Wqkv's kernel
        many = torch.cat([ids, ids, ids])
        assert not _ran_kernel(lambda: _decode_path(model, fused, many, 16))  # 27 rows: cuBLAS
        assert norms  # and the norm as a module
        norms.clear()
        assert not _ran_kernel(lambda: model(ids[:, :1]))  # the model itself: plain nn.Linear, cuBLAS
        assert norms
        fast = _decode_path(model, fused, ids[:, :1], 16).float()
        ref = model(ids[:, :1]).logits.float()
    torch.testing.assert_close(fast, ref, atol=3e-2, rtol=2e-2)
    for h in hooks:
        h.remove()
    ref_tokens: list = []
    assert not _ran_kernel(
        lambda: ref_tokens.extend(generate(model, None, prompts, compile=True, options=cublas, **kw))
    )  # cuBLAS
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
