"""A model quantized from outside: logits near the float model's, the cached decode equal to the full forward, and
the decode step's fused blocks reading int8 / int4 through the decode-linear kernel (Triton's CPU interpreter)
equal to the quantized model's own blocks. On a GPU, bench/bench_quant.py runs the compiled step."""

import pytest
import torch

from smalto.errors import ConfigError
from smalto.kernels import DecodeOptions, decode_linear
from smalto.kernels.decode_block import FusedDecodeBlock, decode_blocks
from smalto.model.cache import KVCache
from smalto.quant import QuantLinear, QuantSpec, quantize
from tests.model.helpers import tiny, tokens, use_triton_interpreter

use_triton_interpreter()

SPECS = {
    "int8": QuantSpec(format="int8"),
    "int4": QuantSpec(format="int4", group_size=32),
    "int4-sym": QuantSpec(format="int4", group_size=64, symmetric=True),
}
GLU = {
    "norm_type": "rmsnorm",
    "no_bias": False,
    "ffn_config": {"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}},
}


@pytest.mark.parametrize("name", SPECS)
def test_quantized_model_computes_the_float_model_of_its_dequantized_weights(name):
    """Exactly the float model with ŵ in place of w, and near the float model itself: on random weights (no
    outliers to protect, every layer's error adding up) int8 moves the logits ~2%, int4 ~20–30%; the quality
    gate on a trained model is `smalto eval --quantize` (docs/quantize.md)."""
    model = tiny(d_model=128, n_heads=4)
    ids = tokens(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
        quantize(model, SPECS[name])
        got = model(ids).logits
        twin = tiny(d_model=128, n_heads=4)
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear):
                twin.get_submodule(n).weight.copy_(m.dequantize(torch.float32))
        torch.testing.assert_close(got, twin(ids).logits, atol=1e-5, rtol=1e-5)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4  # Wqkv, out_proj, up_proj, down_proj per block
    assert type(model.transformer.wte) is torch.nn.Embedding  # the tied embedding / head stays 16-bit
    rel = float((got - ref).norm() / ref.norm())
    assert rel < {"int8": 0.04, "int4": 0.35, "int4-sym": 0.45}[name], rel
    if name == "int8":
        assert bool((got.argmax(-1) == ref.argmax(-1)).all())


def test_quantize_refuses_a_quantized_model_and_a_group_that_does_not_divide():
    model = tiny()  # d_model 64: every input is 64 or 256 wide
    with pytest.raises(
        ConfigError,
        match=r"group_size 128 does not divide the input size 64 of transformer\.blocks\.0\.attn\.Wqkv",
    ):
        quantize(model, "int4", group_size=128)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before changing anything
    quantize(model, "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(model, "int8")


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_cached_decode_equals_the_full_forward(name):
    model = quantize(tiny(**GLU), SPECS[name])
    ids = tokens(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model.config, 2, 16, model.dtype, model.device)
        out = [model(ids[:, :6], past_key_values=cache).logits]
        for t in range(6, 10):
            out.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


# int8 both ways to floats (the conversion instruction, the 2²³ trick), whatever the rows; int4 has one way
VARIANTS = [("int8", "base"), ("int8", "magic"), ("int4", "auto"), ("int4-sym", "auto")]


@pytest.mark.parametrize(("name", "kernel"), VARIANTS, ids=[f"{n}-{k}" for n, k in VARIANTS])
@pytest.mark.parametrize(
    ("M", "norm", "act", "residual"),
    [
        (1, "layernorm", "gelu", False),
        (1, None, None, True),
        (3, "layernorm", None, False),
        (16, "rmsnorm", "silu", True),
    ],
)
def test_kernel_reads_quantized_weights_as_dequantized(name, kernel, M, norm, act, residual):
    """Every way of the kernel with every format, one row (CUDA cores) and 2–16 rows (tensor cores), with a
    LayerNorm (and its bias) or an RMSNorm folded in."""
    assert decode_linear.prepare()
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(128, 72, bias=True)
    q = QuantLinear.from_linear(lin, SPECS[name])
    x = 2 * torch.randn(M, 128, generator=g) + 0.5
    nw = 1 + 0.1 * torch.randn(128, generator=g)
    nb = 0.1 * torch.randn(128, generator=g) if norm == "layernorm" else None
    r = torch.randn(M, 72, generator=g) if residual else None
    w = q.dequantize(torch.float32)
    h = x
    if norm == "layernorm":
        h = torch.nn.functional.layer_norm(x, (128,), nw, nb, 1e-5)
    elif norm == "rmsnorm":
        h = torch.nn.functional.rms_norm(x, (128,), nw, 1e-5)
    ref = torch.nn.functional.linear(h, w, q.bias)
    ref = torch.nn.functional.gelu(ref) if act == "gelu" else (torch.nn.functional.silu(ref) if act else ref)
    ref = ref + r if r is not None else ref
    spec = (norm, nw, nb, 1e-5) if norm else None
    with torch.no_grad():
        got = decode_linear.linear(
            x, q.weight_args(), q.bias, norm=spec, act=act, residual=r, quant_kernel=kernel
        )
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["int4", "int4-sym"])
def test_int4_over_several_input_tiles(name):
    """One row of int4 over inputs longer than one BLOCK_K tile (the loop after the first tile, each group's scale
    found from the tile's offset, and a last tile with groups past the inputs), with a LayerNorm and its bias."""
    assert decode_linear.prepare()
    g = torch.Generator().manual_seed(3)
    K = 1024 + 192  # every tile BLOCK_K (512 or 1024) is a multiple of the group; the last one part empty
    q = QuantLinear.from_linear(torch.nn.Linear(K, 24, bias=False), SPECS[name])
    x = 2 * torch.randn(1, K, generator=g) + 0.5
    nw, nb = 1 + 0.1 * torch.randn(K, generator=g), 0.1 * torch.randn(K, generator=g)
    h = torch.nn.functional.layer_norm(x, (K,), nw, nb, 1e-5)
    ref = torch.nn.functional.linear(h, q.dequantize(torch.float32))
    with torch.no_grad():
        got = decode_linear.linear(x, q.weight_args(), norm=("layernorm", nw, nb, 1e-5))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_auto_takes_the_mantissa_trick_for_int8_at_one_row_only(monkeypatch):
    """The default (auto) is the faster way on an H200 per row count: the 2²³ trick for one row, the conversion
    instruction for 2–16; base and magic hold for every row count; int4 has one way. Each call still computes
    the product with the dequantized weight."""
    assert decode_linear.prepare()
    magic = []
    real = decode_linear._QOP
    monkeypatch.setattr(decode_linear, "_QOP", lambda *a: magic.append(a[-1]) or real(*a))
    lin = torch.nn.Linear(128, 40, bias=False)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    for name, kernel, rows, want in [
        ("int8", "auto", 1, 1),
        ("int8", "auto", 3, 0),
        ("int8", "base", 1, 0),
        ("int8", "magic", 3, 1),
        ("int4", "auto", 1, 0),
        ("int4", "magic", 1, 0),
    ]:
        q = QuantLinear.from_linear(lin, SPECS[name])
        with torch.no_grad():
            got = decode_linear.linear(x[:rows], q.weight_args(), quant_kernel=kernel)
        assert magic.pop() == want, (name, kernel, rows)
        ref = torch.nn.functional.linear(x[:rows], q.dequantize(torch.float32))
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert DecodeOptions().quant_kernel == "auto"
    with pytest.raises(
        ConfigError, match="quant_kernel = 'fold' is not allowed; choose one of: auto, base, magic"
    ):
        DecodeOptions(quant_kernel="fold")


def _decode_path(model, blocks, ids):
    tr = model.transformer
    x, inputs = tr.embed(ids)
    for block in blocks:
        x = block(x, inputs, None)
    return model.unembed(tr.norm_f(x))


@pytest.mark.parametrize(
    ("name", "overrides", "kernel"),
    [("int8", {}, "auto"), ("int4", GLU, "auto"), ("int8", GLU, "base")],
    ids=["int8-mpt", "int4-glu", "int8-glu-base"],
)
def test_fused_decode_blocks_read_the_quantized_weights(name, overrides, kernel, monkeypatch):
    """The decoder's fused blocks take QuantLinears (not bypassed), with the kernel variant of their options, and
    compute what the quantized blocks compute, for one row (norm inside the kernel) and a few rows (tensor-core
    path)."""
    model = quantize(tiny(**overrides), SPECS[name])
    blocks = decode_blocks(model, DecodeOptions(quant_kernel=kernel))
    assert decode_linear.prepare() and all(isinstance(b, FusedDecodeBlock) for b in blocks)
    launches = []
    real = decode_linear.linear
    monkeypatch.setattr(
        decode_linear,
        "linear",
        lambda x, w, *a, **k: launches.append((type(w), k["quant_kernel"])) or real(x, w, *a, **k),
    )
    with torch.no_grad():
        for ids in (tokens(1, 1), tokens(3, 2)):
            ref = model(ids).logits
            launches.clear()
            monkeypatch.setattr(
                decode_linear,
                "supports_quant",
                lambda x, q, max_rows=16: 0 < x.numel() // x.shape[-1] <= max_rows,
            )
            got = _decode_path(model, blocks, ids)
            monkeypatch.setattr(decode_linear, "supports_quant", lambda *a, **k: False)
            assert launches and set(launches) == {(decode_linear.QuantWeight, kernel)}
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
