"""Quantized HF-style folders: write one, read one, and decide what `smalto.load(path, quantize=...)` does.

A quantized folder is an HF folder (smalto/hf/save.py) whose config.json carries
    "quantization_config": {"quant_method": "smalto", "format": "int8" | "int4", "group_size": 128, "symmetric": false}
and whose safetensors hold, for each linear layer of the blocks, `<layer>.qweight`, `<layer>.scales` (and int4
asymmetric's `<layer>.zeros`) instead of `<layer>.weight`; every other tensor as a 16-bit folder holds it. Its
model_type is `smalto_mpt` without remote code: transformers cannot compute these weights, and says so instead of
loading something else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smalto.errors import CheckpointError, ConfigError
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM
from smalto.quant.formats import QuantSpec
from smalto.quant.linear import QuantLinear, head_skeleton, linear_names, quant_spec_of


def stored_spec(folder: Path) -> QuantSpec | None:
    """The QuantSpec of an HF folder's config.json (None: a 16-bit folder)."""
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # the loader reports an unreadable config.json
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return None if qc is None else QuantSpec.from_config(qc, str(path))


def check_device(spec: QuantSpec, device: torch.device) -> None:
    """Refuse a device that has no kernel for quantized decoding. CPU runs the plain path (dequantize, then
    multiply) by design; CUDA needs Triton for smalto's kernel, without which decoding would run the plain path
    at a fraction of 16-bit speed."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        from smalto.kernels import decode_linear

        if decode_linear.prepare():
            return
        raise ConfigError(
            f"--quantize {spec.format} on {device}: smalto's quantized decode kernel needs Triton, which is not "
            "installed; install triton (pip install triton), or load the model without --quantize"
        )
    raise ConfigError(
        f"--quantize {spec.format} on {device}: smalto has no quantized kernel for {device.type}; "
        "run it on cuda (with Triton) or cpu"
    )


def resolve(
    folder: Path | None, quantize: str | QuantSpec | None, device: torch.device, source: str | Path
) -> tuple[QuantSpec | None, QuantSpec | None]:
    """(the folder's stored spec, the spec to quantize to at load time), refusing a second quantization and a
    device without a kernel before any weight is read."""
    stored = stored_spec(folder) if folder is not None else None
    wanted = QuantSpec(format=quantize) if isinstance(quantize, str) else quantize
    if stored is not None and wanted is not None:
        raise ConfigError(
            f"{source} is already quantized ({stored.describe()}); load it without --quantize "
            "(or quantize its 16-bit source instead)"
        )
    if stored is not None or wanted is not None:
        check_device(stored or wanted, device)  # type: ignore[arg-type]
    return stored, wanted


def skeleton(config: MPTConfig, spec: QuantSpec, dtype: torch.dtype) -> MPTForCausalLM:
    """The model on the meta device with QuantLinears where the blocks' linear layers are (and the quantized
    head where the output matrix is, with `spec.head`)."""
    model = MPTForCausalLM(config, device="meta")
    modules = dict(model.named_modules())
    for name in linear_names(model):
        lin = modules[name]
        assert isinstance(lin, nn.Linear)
        parent, _, attr = name.rpartition(".")
        q = QuantLinear(
            lin.in_features, lin.out_features, spec, bias=lin.bias is not None, dtype=dtype, device="meta"
        )
        setattr(modules[parent], attr, q)
    if spec.head:
        head_skeleton(model, spec, dtype)
    return model


def load_quantized(
    folder: Path, config: MPTConfig, spec: QuantSpec, dtype: torch.dtype | None, device: torch.device
) -> MPTForCausalLM:
    """A quantized folder into a model of QuantLinears: integer tensors as stored, scales and zero points in their
    stored dtype (part of the format), other tensors in `dtype` (default: the folder's torch_dtype)."""
    from smalto.hf.load import iter_tensors, parse_dtype, read_config, weight_files

    raw = read_config(folder)[1]
    target = dtype or parse_dtype(raw.get("torch_dtype")) or torch.bfloat16
    model = skeleton(config, spec, target)
    expected = dict(model.state_dict(keep_vars=True))
    modules = dict(model.named_modules())
    problems: list[str] = []
    unexpected: list[str] = []
    loaded: set[str] = set()
    for file in weight_files(folder):
        for name, t in iter_tensors(file):
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            want = expected[name]
            if tuple(t.shape) != tuple(want.shape) or t.is_floating_point() != want.is_floating_point():
                problems.append(
                    f"{name}: stored {tuple(t.shape)} {t.dtype} vs {tuple(want.shape)} {want.dtype}"
                )
                continue
            if not t.is_floating_point() and t.dtype != want.dtype:
                problems.append(f"{name}: stored {t.dtype}, the format needs {want.dtype}")
                continue
            parent, _, attr = name.rpartition(".")
            keep = attr in ("scales", "zeros") or not t.is_floating_point()
            value = t.to(device) if keep else t.to(device=device, dtype=target)
            module = modules[parent]
            if attr in module._parameters:
                setattr(module, attr, nn.Parameter(value, requires_grad=False))
            else:
                setattr(module, attr, value)
            loaded.add(name)
    missing = [n for n in expected if n not in loaded]
    if problems or missing or unexpected:
        parts = problems[:6]
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:6])}")
        raise CheckpointError(
            f"{folder} does not match its config.json's {spec.describe()} quantization: " + "; ".join(parts)
        )
    return model.eval()


def save_quantized(
    model: MPTForCausalLM, path: str | Path, *, tokenizer: Any = None, shard_size: str | int = "5GB"
) -> Path:
    """Write a quantized model as a folder `smalto.load` reads (atomically, as `smalto.hf.save` does)."""
    from smalto.hf.save import (
        _swap_into_place,
        _write_tokenizer,
        _write_weights,
        generation_ids,
        hf_config_dict,
        parse_size,
    )

    spec = quant_spec_of(model)
    if spec is None:
        raise ConfigError("save_quantized needs a quantized model (smalto.quant.quantize)")
    dest = Path(path)
    limit = parse_size(shard_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        token_ids = _write_tokenizer(tokenizer, tmp) if tokenizer is not None else {}
        state = dict(model.state_dict(keep_vars=True))
        _write_weights(state, tmp, model.dtype, limit, True)  # floating tensors stay in the model's dtype
        config = hf_config_dict(model.config, model.dtype, token_ids=token_ids)
        config.pop("auto_map", None)  # the remote code computes 16-bit weights only
        why = ["quantized weights (smalto int8 / int4)", *config["smalto"]["why_not_native"]]
        config.update(model_type="smalto_mpt", quantization_config=spec.to_config())
        config["smalto"].update(native_transformers=False, why_not_native=why)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        gen = {"use_cache": True, **generation_ids(model, token_ids)}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
