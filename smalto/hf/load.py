"""Load a Hugging Face MPT or LLaMA-family folder into smalto's `MPTForCausalLM`.

Accepted layouts (what the hub and transformers write):
    config.json                      model_type `mpt` (or `smalto_mpt`), nested attn_config / init_config, legacy
                                     keys; or `llama` / `mistral` (mapped by smalto/hf/llama.py)
    model.safetensors                one file, or
    model-0000N-of-0000M.safetensors + model.safetensors.index.json, or
    pytorch_model.bin                one file, or
    pytorch_model-0000N-of-0000M.bin + pytorch_model.bin.index.json
Composer checkpoints prefix every key with `model.`; it is stripped. A tied model's `lm_head.weight` (transformers
writes it) is accepted and dropped when it equals the embedding.

Memory: the model is built on the meta device and every tensor is assigned as it is read, one shard at a time
(safetensors reads tensor by tensor; .bin shards are memory-mapped and read with `weights_only=True`, so no
arbitrary object is ever unpickled). No second full copy of the weights exists at any point.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smalto.errors import CheckpointError, ConfigError
from smalto.hf.llama import MODEL_TYPES as LLAMA_MODEL_TYPES
from smalto.hf.llama import config_from_llama, tensors_from_llama
from smalto.model.config import MPTConfig
from smalto.model.mpt import MPTForCausalLM

MODEL_TYPES = ("mpt", "smalto_mpt")
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / 'torch.bfloat16' / torch.bfloat16 → torch.bfloat16; None and 'auto' → None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ConfigError(
            f"dtype {dtype!r} is not supported; use one of: bf16 (bfloat16), fp16 (float16), fp32 (float32) or auto"
        )
    return DTYPES[name]


def parse_device(device: str | torch.device | None) -> torch.device:
    """'cpu' / 'cuda' / 'cuda:N' / 'mps' → torch.device; None and 'auto' → cuda when available, else cpu.

    Refuses (ConfigError) a name torch does not know and an accelerator this machine lacks.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device {str(device)!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(device)!r}: this machine (or this torch build) has no CUDA; use cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 …)"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {str(device)!r}: MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or auto")
    return dev


def read_config(folder: str | Path) -> tuple[MPTConfig, dict[str, Any]]:
    """The folder's config.json as an `MPTConfig`, and the raw dict (for the stored dtype and token ids)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type in LLAMA_MODEL_TYPES:
        return config_from_llama(raw, str(path)), raw
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type {model_type!r}; smalto loads MPT (mpt, smalto_mpt) and LLaMA-family "
            f"({', '.join(LLAMA_MODEL_TYPES)}) models"
        )
    try:
        config = MPTConfig.from_dict({**raw, "model_type": "mpt"}, strict=False)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return config, raw


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in the order to read them; refuses a folder without any."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(absent[:5])}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder} holds no weights: expected model.safetensors, pytorch_model.bin, or sharded files with "
        "model.safetensors.index.json / pytorch_model.bin.index.json"
    )


def iter_tensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one weight file, read lazily where the format allows."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                names = list(f.keys())
                for name in names:
                    tensor = f.get_tensor(name)
                    yield name, tensor
        except (SafetensorError, OSError) as e:  # truncated or corrupt file
            raise CheckpointError(
                f"cannot read {file}: it is truncated or not a safetensors file ({e})"
            ) from None
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {file} as a tensor state dict ({e})") from None
    except Exception as e:  # weights_only refuses pickled objects: we never run them
        raise CheckpointError(f"cannot read {file} as a tensor state dict ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    while state:  # pop as we go so each tensor is released once assigned
        name = next(iter(state))
        yield name, state.pop(name)


def load_pretrained(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    config: MPTConfig | None = None,
) -> MPTForCausalLM:
    """Load an HF MPT / LLaMA / Mistral folder as an `MPTForCausalLM` in eval mode (`smalto.load` reads HF folders with it).

    dtype: None/'auto' keeps the checkpoint's `torch_dtype` (float32 when the config names none).
    device: where the weights land (default cpu).
    config: the config to build instead of the folder's config.json: `smalto.load` passes it with the caller's
    overrides applied (e.g. a longer max_seq_len for an ALiBi model); its tensors must have the folder's shapes.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(
            f"{path} is not a folder; pass a Hugging Face model folder (config.json + weights)"
        )
    stored, raw = read_config(folder)
    if config is None:
        config = stored
    target = parse_dtype(dtype) or parse_dtype(raw.get("torch_dtype") or raw.get("dtype")) or torch.float32
    dev = parse_device(device) if device is not None else torch.device("cpu")
    files = weight_files(folder)

    model = MPTForCausalLM(config, device="meta")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    problems: list[str] = []
    unexpected: list[str] = []
    extra_head: Tensor | None = None
    prefix: str | None = None
    tensors: Iterator[tuple[str, Tensor]] = (pair for file in files for pair in iter_tensors(file))
    if raw.get("model_type") in LLAMA_MODEL_TYPES:  # HF LLaMA names → ours, q/k/v stacked into Wqkv
        tensors, prefix = tensors_from_llama(tensors, config), ""
    for name, tensor in tensors:
        if prefix is None:  # Composer checkpoints: every key starts with "model."
            prefix = "model." if name.startswith("model.") and name not in params else ""
        name = name.removeprefix(prefix)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            extra_head = tensor.to(target)
            continue
        if name not in params:
            unexpected.append(name)
            continue
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            problems.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {expected}")
            continue
        module_name, _, attr = name.rpartition(".")
        value = tensor.to(device=dev, dtype=target) if tensor.is_floating_point() else tensor.to(dev)
        setattr(modules[module_name], attr, nn.Parameter(value, requires_grad=params[name].requires_grad))
        loaded.add(name)
    missing = [n for n in params if n not in loaded]
    if problems:
        raise CheckpointError(
            f"{folder}: {len(problems)} tensor(s) have the wrong shape for its config.json: "
            + "; ".join(problems[:8])
        )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}")
        raise CheckpointError(f"{folder} does not match its config.json: " + "; ".join(parts))
    if extra_head is not None and not torch.equal(extra_head.to(dev), model.transformer.wte.weight.data):
        raise CheckpointError(
            f"{folder}: lm_head.weight differs from transformer.wte.weight but config.json ties them; "
            "set tie_word_embeddings: false in config.json"
        )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # an invariant: every parameter was assigned above
        raise CheckpointError(f"{folder}: tensors left unmaterialised: {', '.join(left[:8])}")
    return model.eval()
