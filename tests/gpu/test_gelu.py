"""The training GELU (smalto/kernels/gelu.py) on CUDA: compiled by inductor as training compiles it, against eager
and against F.gelu, in the dtypes training uses it for; and inside compiled blocks under bf16 autocast, where
`use_poly_gelu` puts it (the model's own activation is F.gelu)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from smalto.kernels import gelu
from tests.model.helpers import tiny, tokens, with_impl

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_equals_eager_and_f_gelu(dtype):
    x = (torch.randn(4096, 512, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 2).to(
        dtype
    )
    gy = torch.randn_like(x)
    out = {}
    for name, fn in (("eager", gelu.gelu), ("compiled", torch.compile(gelu.gelu)), ("F", F.gelu)):
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward(gy)
        out[name] = (y.detach().float(), xx.grad.float())
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for a, b in (("compiled", "eager"), ("compiled", "F"), ("eager", "F")):
        torch.testing.assert_close(out[a][0], out[b][0], atol=1e-5, rtol=ulp, msg=f"forward {a} vs {b}")
        torch.testing.assert_close(out[a][1], out[b][1], atol=1e-3, rtol=2 * ulp, msg=f"backward {a} vs {b}")
    torch._dynamo.reset()


def test_compiled_blocks_under_autocast_take_it_and_match_f_gelu():
    base = tiny(max_seq_len=512).cuda().train()
    x = tokens(2, 256).cuda()

    def grads(model, poly: bool):
        if poly:  # as bf16 training builds the model (smalto/train/parallel.py); else the model's F.gelu
            assert gelu.use_poly_gelu(model) == model.config.n_layers
            assert all(isinstance(b.ffn.act, gelu.PolyGELU) for b in model.transformer.blocks)
        for block in model.transformer.blocks:
            block.compile()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, labels=x).loss.backward()
        torch._dynamo.reset()
        return {n: p.grad.float() for n, p in model.named_parameters()}

    poly = grads(with_impl(copy.deepcopy(base), "flex", modes=("train",)), poly=True)
    exact = grads(with_impl(copy.deepcopy(base), "flex", modes=("train",)), poly=False)
    for n in poly:
        # bf16 activations: the two differ by roundings, not by a wrong derivative (that showed as |Δ| ≈ |g|)
        err = (poly[n] - exact[n]).abs().max().item() / exact[n].abs().max().item()
        assert err < 0.05, (n, err)
