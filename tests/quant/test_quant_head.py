"""`--quantize-head` (`QuantSpec(head=True)`): the output matrix stored quantized once. A tied model's lookup
returns the dequantized rows and its logits are the model of the dequantized matrix; the decoders run the head
through the quantized linear path; a quantized folder round-trips it exactly; the CLI takes the flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smalto import load
from smalto.errors import ConfigError
from smalto.generate import generate, get_decoder
from smalto.hf import save_pretrained
from smalto.kernels import decode_linear
from smalto.model.mpt import MPTForCausalLM
from smalto.quant import QuantLinear, QuantSpec, quantize
from smalto.quant.folder import save_quantized
from smalto.quant.linear import QuantEmbedding, QuantHead, quant_head
from smalto.tokenizer import load_tokenizer
from tests import forkrun
from tests.helpers import greedy_generate_args, tiny_config
from tests.model.helpers import tiny, tokens, use_triton_interpreter

use_triton_interpreter()

SPECS = {
    "int8": QuantSpec(format="int8", head=True),
    "int4": QuantSpec(format="int4", group_size=32, head=True),
    "int4-sym": QuantSpec(format="int4", group_size=64, symmetric=True, head=True),
}


def dequantized_twin(model: MPTForCausalLM, **overrides) -> MPTForCausalLM:
    """The float model whose weights are the quantized model's dequantized ones."""
    twin = tiny(**overrides)
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear):
                twin.get_submodule(n).weight.copy_(m.dequantize(torch.float32))
    return twin


@pytest.mark.parametrize("name", SPECS)
def test_tied_head_is_stored_once_and_computes_the_dequantized_model(name):
    model = tiny()
    ids = tokens(2, 12)
    with torch.no_grad():
        ref = model(ids).logits
        quantize(model, SPECS[name])
        got = model(ids).logits
        emb = model.transformer.wte
        assert isinstance(emb, QuantEmbedding) and not hasattr(model, "lm_head")
        assert {n for n, _ in emb.named_buffers()} <= {"qweight", "scales", "zeros"}  # no 16-bit copy kept
        assert not any(n.startswith("transformer.wte.") and n.endswith(".weight") for n in model.state_dict())
        w = emb.weight
        assert w.shape == (model.config.vocab_size, model.config.d_model)
        assert torch.equal(emb(ids), w[ids])  # the lookup: the gathered rows, dequantized alone, bit for bit
        torch.testing.assert_close(got, dequantized_twin(model)(ids).logits, atol=1e-5, rtol=1e-5)
    rel = float((got - ref).norm() / ref.norm())  # random weights: see test_quant_model's bounds
    assert rel < {"int8": 0.05, "int4": 0.4, "int4-sym": 0.5}[name], rel
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_untied_lm_head_is_quantized_and_the_embedding_stays():
    model = tiny(tie_word_embeddings=False)
    ids = tokens(2, 8)
    quantize(model, SPECS["int8"])
    assert isinstance(model.lm_head, QuantHead) and not isinstance(model.lm_head, QuantEmbedding)
    assert type(model.transformer.wte) is torch.nn.Embedding
    twin = dequantized_twin(model, tie_word_embeddings=False)
    with torch.no_grad():
        twin.transformer.wte.weight.copy_(model.transformer.wte.weight)
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, atol=1e-5, rtol=1e-5)


def test_head_logits_through_the_decode_kernel(monkeypatch):
    """A decode step's rows go through the decode-linear kernel reading the packed matrix (Triton's interpreter)."""
    model = quantize(tiny(), SPECS["int4"])
    head = quant_head(model)
    assert head is model.transformer.wte
    assert decode_linear.prepare()
    monkeypatch.setattr(
        decode_linear, "supports_quant", lambda x, q, max_rows=16: 0 < x.numel() // x.shape[-1] <= max_rows
    )
    launches = []
    real = decode_linear.linear
    monkeypatch.setattr(
        decode_linear, "linear", lambda x, w, *a, **k: launches.append(w) or real(x, w, *a, **k)
    )
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = head.logits(h)
    assert len(launches) == 1 and launches[0].qweight is head.qweight
    torch.testing.assert_close(got, h @ head.weight.T, atol=1e-4, rtol=1e-4)


def test_greedy_decode_with_a_quantized_head_follows_the_full_forward(monkeypatch):
    model = quantize(tiny(), SPECS["int8"])
    calls = []
    real = QuantHead.logits
    monkeypatch.setattr(QuantHead, "logits", lambda self, h: calls.append(h.shape) or real(self, h))
    prompt = tokens(1, 5)[0].tolist()
    (out,) = generate(model, None, [prompt], max_new_tokens=6, temperature=0, eos_token_id=[])
    assert len(calls) == 6  # the prefill and 5 decode steps read the quantized head
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert out.token_ids == ids[len(prompt) :]
    assert get_decoder(model, 1, 11, False).quant_head is model.transformer.wte


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, neox_tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50432, max_seq_len=64, no_bias=True, attn_config={"alibi": True})
    model = MPTForCausalLM(cfg).to(torch.bfloat16)
    return save_pretrained(model, tmp_path_factory.mktemp("qhead") / "tiny", tokenizer=neox_tokenizer_dir)


@pytest.mark.parametrize("spec", [SPECS["int8"], SPECS["int4"]], ids=["int8", "int4"])
def test_folder_round_trip_is_exact(model_dir: Path, tmp_path: Path, spec: QuantSpec) -> None:
    model = load(model_dir, quantize=spec)
    out = save_quantized(model, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quantize_head"] is True
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"transformer.wte.qweight", "transformer.wte.scales"} <= names
    assert not {"transformer.wte.weight", "lm_head.weight", "lm_head.qweight"} & names
    back = load(out)
    assert isinstance(back.transformer.wte, QuantEmbedding) and back.dtype == torch.bfloat16
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def smalto(*args: str) -> subprocess.CompletedProcess:
    return forkrun.run([sys.executable, "-m", "smalto", *args], capture_output=True, text=True, timeout=180)


def test_cli_quantize_head(model_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(model_dir)
    model = load(model_dir, quantize=QuantSpec(format="int8", head=True))
    (ref,) = generate(model, tok, ["Hello world"], max_new_tokens=8, temperature=0)
    r = smalto(*greedy_generate_args(model_dir, "--quantize", "int8", "--quantize-head"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.text + "\n"

    dst = tmp_path / "int8-head"
    r = smalto("convert", str(model_dir), str(dst), "--quantize", "int8", "--quantize-head")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"wrote {dst}: 1 weight file(s), int8 (per-row scales, head too); smalto loads it (not transformers)"
    )
    assert isinstance(load(dst).transformer.wte, QuantEmbedding)


def test_quantize_head_without_quantize_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from smalto.cli import _quant_spec
    from smalto.convert import convert

    message = "--quantize-head quantizes the head too: give it with --quantize int8|int4"
    with pytest.raises(ConfigError, match=message):
        _quant_spec(None, 128, True)
    with pytest.raises(ConfigError, match=message):
        convert(model_dir, tmp_path / "x", quantize_head=True)
    assert not (tmp_path / "x").exists()
