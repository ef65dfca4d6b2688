"""smalto/quant/formats.py: every stored weight within its format's error bound, the int4 byte layout, the spec's
checks, and `QuantLinear` computing x · ŵᵀ + b on the plain path."""

import pytest
import torch

from smalto.errors import ConfigError
from smalto.quant import QuantLinear, QuantSpec
from smalto.quant.formats import dequantize_weight, error_bound, quantize_weight, unpack_int4

SPECS = [
    QuantSpec(format="int8"),
    QuantSpec(format="int4", group_size=32),
    QuantSpec(format="int4", group_size=64, symmetric=True),
]


def weights(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = 0.02 * torch.randn(48, 128, generator=g)
    w[3] *= 40  # a row of outliers
    w[5, 7] = 3.0  # one outlier in a group
    w[7] = 0.0  # an all-zero row
    w[9] += 0.5  # a row far from zero (the asymmetric zero point's case)
    return w.to(dtype)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantized_weights_within_the_format_bound(spec, dtype):
    w = weights(dtype)
    t = quantize_weight(w, spec)
    back = dequantize_weight(t["qweight"], t["scales"], t.get("zeros"), spec, torch.float32)
    err = (back - w.float()).abs()
    bound = error_bound(w, t, spec)
    assert bool((err <= bound * (1 + 1e-3) + 1e-7).all()), float((err - bound).max())
    assert back[7].abs().max() == 0  # zeros stay exactly zero
    # the bound is tight enough to mean something: half a step of the 8-bit / 4-bit grid
    steps = 254 if spec.format == "int8" else (14 if spec.symmetric else 15)
    assert float(bound[0].max()) <= 1.01 * float(w[0].float().abs().max()) * 2 / steps
    assert t["scales"].dtype == (dtype if dtype != torch.float32 else torch.float32)


def test_int8_stores_signed_bytes_with_per_row_scales():
    w = torch.tensor([[1.27, -0.635, 0.0, 0.01], [-2.54, 1.0, 0.5, 0.0]])
    t = quantize_weight(w, QuantSpec(format="int8"))
    assert t["qweight"].dtype == torch.int8
    assert t["qweight"].tolist() == [[127, -63, 0, 1], [-127, 50, 25, 0]]
    torch.testing.assert_close(t["scales"], torch.tensor([0.01, 0.02]), rtol=2**-8, atol=0)


def test_int4_packs_two_inputs_per_byte_low_nibble_first():
    # symmetric, one group: max |w| = 7 → scale 1, q − 8 = round(w)
    w = torch.tensor([[1.0, -2.0, 7.0, -7.0, 0.0, 3.0, -1.0, 2.0] * 4])
    t = quantize_weight(w, QuantSpec(format="int4", group_size=32, symmetric=True))
    assert t["qweight"].dtype == torch.uint8 and t["qweight"].shape == (1, 16)
    # (1+8) | (−2+8)<<4 = 9 | 96 = 105; (7+8) | (−7+8)<<4 = 31; 8 | 11<<4 = 184; 7 | 10<<4 = 167
    assert t["qweight"][0, :4].tolist() == [105, 31, 184, 167]
    assert unpack_int4(t["qweight"])[0, :8].tolist() == [9, 6, 15, 1, 8, 11, 7, 10]
    assert t["scales"].tolist() == [[1.0]] and "zeros" not in t


def test_int4_asymmetric_zero_point_centres_a_shifted_group():
    w = torch.linspace(10.0, 11.5, 32)[None, :]  # min 10, max 11.5: scale 0.1, zero = 10 + 8·0.1
    t = quantize_weight(w, QuantSpec(format="int4", group_size=32))
    s, z = float(t["scales"]), float(t["zeros"])
    assert s == pytest.approx(0.1, rel=2**-7) and z == pytest.approx(10.8, rel=2**-8)
    q = unpack_int4(t["qweight"])[0]
    assert int(q[0]) == 0 and int(q[-1]) == 15


def test_spec_checks_name_the_value_and_the_choices():
    with pytest.raises(ConfigError, match=r"quantize = 'int3' is not allowed; choose one of: int8, int4"):
        QuantSpec(format="int3")
    with pytest.raises(
        ConfigError, match=r"group_size = 100 is not allowed; choose one of: 32, 64, 128, 256"
    ):
        QuantSpec(format="int4", group_size=100)
    assert QuantSpec(format="int8", group_size=100).to_config() == {
        "quant_method": "smalto",
        "format": "int8",
    }


def test_a_group_size_that_does_not_divide_the_layer_is_refused_by_name():
    lin = torch.nn.Linear(96, 8)
    with pytest.raises(
        ConfigError, match=r"group_size 64 does not divide the input size 96 of blocks.0.ffn; .*32"
    ):
        QuantLinear.from_linear(lin, QuantSpec(format="int4", group_size=64), "blocks.0.ffn")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_quant_linear_computes_with_the_dequantized_weight(spec):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 40, bias=True)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, q.dequantize(torch.float32), lin.bias)
        torch.testing.assert_close(q(x), ref)
        rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert float(rel) < (0.01 if spec.format == "int8" else 0.12)
