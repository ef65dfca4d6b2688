"""Quantized weights on CUDA: the decode-linear kernel reading int8 / int4 equals a float32 product with the
dequantized weight, a quantized model's compiled decode runs it, and `smalto.load(quantize=...)` puts the model on
the GPU quantized (run on a GPU: `pytest -m gpu tests/gpu`)."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from smalto.generate import generate, get_decoder
from smalto.kernels import decode_linear
from smalto.kernels.decode_block import FusedDecodeBlock
from smalto.quant import QuantLinear, QuantSpec, quantize
from tests.model.helpers import tiny, tokens

pytestmark = pytest.mark.gpu
SPECS = [
    QuantSpec(format="int8"),
    QuantSpec(format="int4", group_size=128),
    QuantSpec(format="int4", group_size=64, symmetric=True),
]


@pytest.fixture(autouse=True)
def _built():
    assert decode_linear.prepare(), "the decode-linear kernel needs Triton"


def _kernel_ran(fn) -> bool:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return any("skinny_matmul_kernel" in e.key for e in prof.key_averages())


@pytest.mark.parametrize(
    ("spec", "kernel"),
    [(SPECS[0], "base"), (SPECS[0], "magic"), (SPECS[1], "auto"), (SPECS[2], "auto")],
    ids=lambda v: v if isinstance(v, str) else v.describe(),
)
@pytest.mark.parametrize(
    ("rows", "N", "norm"), [(1, 1000, "layernorm"), (1, 384, None), (4, 640, None), (16, 200, "rmsnorm")]
)
def test_kernel_equals_float32_product_with_the_dequantized_weight(spec, kernel, rows, N, norm):
    K = 1536
    g = torch.Generator(device="cuda").manual_seed(0)
    lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=K**-0.5, generator=g)
    q = QuantLinear.from_linear(lin, spec)
    x = (2 * torch.randn(rows, K, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(torch.bfloat16)
    h = x.float()
    if norm == "layernorm":
        h = F.layer_norm(h, (K,), nw.float(), None, 1e-5)
    elif norm == "rmsnorm":
        h = F.rms_norm(h, (K,), nw.float(), 1e-5)
    ref = F.linear(h, q.dequantize(torch.float32))
    with torch.inference_mode():
        assert decode_linear.supports_quant(x, q.weight_args())
        got = decode_linear.linear(
            x, q.weight_args(), norm=(norm, nw, None, 1e-5) if norm else None, quant_kernel=kernel
        )
        assert _kernel_ran(lambda: q(x))  # the layer itself takes the kernel on a few rows
        assert not decode_linear.supports_quant(
            torch.randn(17, K, device="cuda", dtype=torch.bfloat16), q.weight_args()
        )
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("spec", SPECS[:2], ids=lambda s: s.describe())
def test_compiled_decode_of_a_quantized_model_runs_the_kernel(spec):
    model = quantize(tiny(max_seq_len=256, d_model=128).cuda().to(torch.bfloat16), spec)
    prompts = [tokens(1, 20)[0].tolist(), tokens(1, 7, seed=3)[0].tolist()]
    kw = dict(max_new_tokens=16, temperature=0)
    eager = generate(model, None, prompts, compile=False, **kw)
    out: list = []
    assert _kernel_ran(lambda: out.extend(generate(model, None, prompts, compile=True, **kw)))
    dec = get_decoder(model, 2, 20 + 16, True)
    assert dec.compiled and all(isinstance(b, FusedDecodeBlock) for b in dec.blocks)
    agree = sum(
        a == b for o, e in zip(out, eager, strict=True) for a, b in zip(o.token_ids, e.token_ids, strict=True)
    )
    assert agree >= 0.8 * 2 * 16  # greedy paths may part after a near tie (fused vs unfused rounding)


def test_load_quantizes_onto_the_gpu(tmp_path):
    from smalto import load
    from smalto.hf import save_pretrained

    folder = save_pretrained(tiny(d_model=128).to(torch.bfloat16), tmp_path / "m")
    model = load(folder, device="cuda", quantize="int8")
    qs = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert qs and all(m.qweight.is_cuda and m.qweight.dtype == torch.int8 for m in qs)
    assert model.transformer.wte.weight.is_cuda
