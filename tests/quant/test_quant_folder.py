"""Quantized folders: `smalto convert --quantize` writes one that `smalto.load` reads back exactly; `--quantize` at
load time gives the same model; bad input (a second quantization, a group size that does not divide, a device
without a kernel) is a message and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smalto import load
from smalto.convert import convert
from smalto.errors import ConfigError
from smalto.generate import generate
from smalto.hf import save_pretrained
from smalto.kernels import decode_linear
from smalto.model.mpt import MPTForCausalLM
from smalto.quant import QuantLinear, QuantSpec, quantize
from smalto.quant.folder import check_device, save_quantized
from smalto.tokenizer import load_tokenizer
from tests import forkrun
from tests.helpers import greedy_generate_args, tiny_config


def smalto(*args: str) -> subprocess.CompletedProcess:
    return forkrun.run([sys.executable, "-m", "smalto", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, neox_tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=50432, max_seq_len=64, no_bias=True, attn_config={"alibi": True})
    model = MPTForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(8)
    return save_pretrained(model, tmp_path_factory.mktemp("quant") / "tiny", tokenizer=neox_tokenizer_dir)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="int8"),
        QuantSpec(format="int4", group_size=32),
        QuantSpec(format="int4", symmetric=True, group_size=64),
    ],
    ids=lambda s: s.describe(),
)
def test_save_load_round_trip_is_exact(model_dir: Path, tmp_path: Path, spec: QuantSpec) -> None:
    model = quantize(load(model_dir), spec)
    out = save_quantized(model, tmp_path / "q")
    back = load(out)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(
        isinstance(back.get_submodule(n), QuantLinear)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_load_time_quantization_equals_quantizing_the_loaded_model(model_dir: Path) -> None:
    direct = load(model_dir, quantize=QuantSpec(format="int4", group_size=32))
    after = quantize(load(model_dir), QuantSpec(format="int4", group_size=32))
    for (k, a), b in zip(direct.state_dict().items(), after.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_convert_quantize_writes_a_folder_smalto_loads(model_dir: Path, tmp_path: Path) -> None:
    dst = tmp_path / "int4"
    r = smalto("convert", str(model_dir), str(dst), "--quantize", "int4", "--group-size", "32")
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.strip()
        == f"wrote {dst}: 1 weight file(s), int4 (groups of 32, asymmetric); smalto loads it (not transformers)"
    )
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "smalto",
        "format": "int4",
        "group_size": 32,
        "symmetric": False,
    }
    assert cfg["model_type"] == "smalto_mpt" and "auto_map" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert (dst / "tokenizer.json").is_file() and not (dst / "modeling_mpt.py").exists()
    from safetensors import safe_open

    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("transformer.blocks.0.ffn.up_proj.qweight").dtype == torch.uint8
        assert f.get_tensor("transformer.blocks.0.ffn.up_proj.scales").shape == (256, 2)
    assert "transformer.blocks.0.ffn.up_proj.weight" not in names and "transformer.wte.weight" in names

    # quantizing it again: a message and exit status 2, nothing written
    r = smalto("convert", str(dst), str(tmp_path / "again"), "--quantize", "int8")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    said = " ".join(r.stderr.split())
    assert "is already quantized (int4 (groups of 32, asymmetric)); load it without --quantize" in said
    assert not (tmp_path / "again").exists()


def test_generate_with_quantize_prints_the_quantized_models_completion(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    model = load(model_dir, quantize="int8")
    (ref,) = generate(model, tok, ["Hello world"], max_new_tokens=8, temperature=0)
    r = smalto(*greedy_generate_args(model_dir, "--quantize", "int8"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.text + "\n"


def test_bad_group_size_and_quantizing_twice_are_refused(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"group_size 128 does not divide the input size 64 of transformer\.blocks\.0\.attn\.Wqkv",
    ):
        convert(model_dir, tmp_path / "x", quantize="int4")
    assert not (tmp_path / "x").exists()
    q = save_quantized(load(model_dir, quantize="int8"), tmp_path / "q8")
    with pytest.raises(ConfigError, match="already quantized"):
        load(q, quantize="int8")


def test_devices_without_a_kernel_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec(format="int4")
    check_device(spec, torch.device("cpu"))  # the plain path: dequantize, then multiply
    with pytest.raises(ConfigError, match=r"--quantize int4 on mps: smalto has no quantized kernel for mps"):
        check_device(spec, torch.device("mps"))
    monkeypatch.setattr(decode_linear, "prepare", lambda: False)  # CUDA without Triton
    with pytest.raises(
        ConfigError, match=r"--quantize int4 on cuda: smalto's quantized decode kernel needs Triton"
    ):
        check_device(spec, torch.device("cuda"))
