"""smalto/kernels/gelu.py: the polynomial-erf GELU training uses, against torch's exact erf GELU (F.gelu)."""

import pytest
import torch
import torch.nn.functional as F

from smalto.kernels import gelu
from smalto.model.layers import Activation


def _inputs(n: int = 200_001, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # the range a pre-activation spans, and far tails where erf saturates and the density underflows
    x = torch.cat(
        [torch.linspace(-12, 12, n), torch.randn(n, generator=torch.Generator().manual_seed(0)) * 3]
    )
    return x.to(dtype)


def test_erf_within_the_published_bound_of_torch_erf():
    z = _inputs(dtype=torch.float64)
    err = (gelu.erf(z) - torch.erf(z)).abs().max().item()
    assert err <= 1.5e-7  # Abramowitz & Stegun 7.1.26
    assert err > 1e-9  # it is the polynomial, not torch.erf again


def _errors(x: torch.Tensor, fn) -> tuple[float, float]:
    """Largest |output − exact| and |input gradient − exact|, exact = F.gelu in float64 on the same inputs."""
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    xg = x.clone().requires_grad_()
    y = fn(xg)
    y.backward(gy)
    x64 = x.double().requires_grad_()
    y64 = F.gelu(x64)
    y64.backward(gy.double())
    assert y.dtype == x.dtype and xg.grad is not None and xg.grad.dtype == x.dtype
    return (y.double() - y64).abs().max().item(), (xg.grad.double() - x64.grad).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_and_backward_as_accurate_as_f_gelu(dtype):
    x = _inputs(dtype=dtype)
    y_err, g_err = _errors(x, gelu.gelu)
    y_ref, g_ref = _errors(x, F.gelu)  # torch's own exact-erf GELU, same inputs and dtype
    if dtype == torch.float32:
        # GELU = x·Φ(x): the published erf bound halved in Φ, plus float32 roundings of Φ's few operations (each at
        # most half an ulp of a value ≤ 1: 2^-24, four of them), times |x|; then the rounding of the product
        x64 = x.double()
        exact = F.gelu(x64)
        bound = x64.abs() * (1.5e-7 / 2 + 4 * 2**-24) + exact.abs() * 2**-24 + 1e-12
        assert bool(((gelu.gelu(x).double() - exact).abs() <= bound).all())
    assert y_err <= 1.01 * y_ref + 5e-7
    assert g_err <= 1.01 * g_ref + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_outputs_equal_f_gelu_but_for_rare_roundings(dtype):
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(4)).to(dtype)  # an activation's range
    y, y_ref = gelu.gelu(x.requires_grad_()), F.gelu(x)
    assert 0 < (y != y_ref).float().mean().item() < 1e-3
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=2**-7)


def test_gradcheck_in_float64():
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    # the analytic backward is the derivative of the polynomial forward up to the polynomial's own error
    torch.autograd.gradcheck(gelu.gelu, (x.requires_grad_(),), eps=1e-6, atol=1e-5)


def test_compiled_equals_eager():
    x = _inputs(4097).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    y = gelu.gelu(x)
    y.backward(gy)
    y2 = torch.compile(gelu.gelu, backend="inductor")(x2)
    y2.backward(gy)
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=1e-6)


def test_poly_gelu_takes_the_polynomial_only_for_half_precision_training():
    act = gelu.PolyGELU()
    x = torch.linspace(-4, 4, 100_001)
    # float32 (CPU training) and inference: torch's exact GELU, bit for bit
    assert torch.equal(act(x.clone().requires_grad_()).detach(), F.gelu(x))
    for dtype in gelu.DTYPES:
        xh = x.to(dtype)
        assert torch.equal(act(xh), F.gelu(xh))
        with torch.no_grad():
            assert torch.equal(act(xh.clone().requires_grad_()), F.gelu(xh))
        y = act(xh.clone().requires_grad_())  # mixed-precision training: the polynomial
        assert y.grad_fn is not None and "PolyGELU" in type(y.grad_fn).__name__
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(y.detach(), F.gelu(xh), atol=1e-5, rtol=ulp)
    # the model's own activation is torch's, always; the other activations are untouched
    xg = x.clone().requires_grad_()
    for dtype in gelu.DTYPES:
        xh = x.to(dtype).requires_grad_()
        assert torch.equal(Activation("gelu")(xh).detach(), F.gelu(xh.detach()))
    assert torch.equal(Activation("gelu_tanh")(xg).detach(), F.gelu(x, approximate="tanh"))
    assert torch.equal(Activation("silu")(xg).detach(), F.silu(x))


def test_use_poly_gelu_swaps_exact_gelu_only():
    from tests.model.helpers import tiny

    model = tiny()
    assert gelu.use_poly_gelu(model) == model.config.n_layers
    assert all(isinstance(b.ffn.act, gelu.PolyGELU) for b in model.transformer.blocks)
    silu = tiny(ffn_config={"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}})
    assert gelu.use_poly_gelu(silu) == 0
