"""PEFT's LoRA adapter folder, both ways: what `PeftModel.from_pretrained` reads and `PeftModel.save_pretrained`
writes for a transformers model of the same HF folder.

    adapter_config.json          peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules,
                                 modules_to_save, base_model_name_or_path, bias none, use_rslora, ...
    adapter_model.safetensors    base_model.model.{HF module name}.lora_A.weight / .lora_B.weight, and the
                                 modules_to_save's own tensors as base_model.model.{HF module name}.{weight|bias}
Options smalto does not compute (DoRA, biases, per-layer ranks, fan_in_fan_out, …) are refused by key, as are
tensors that name no layer of the base or have another shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smalto.adapters.lora import (
    LoRA,
    LoraConfig,
    adapters,
    apply_lora,
    hf_layers,
    match_targets,
    saved_modules,
    unwrapped_name,
)
from smalto.errors import CheckpointError, ConfigError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json keys whose value must be the neutral one (what smalto computes), with that value
NEUTRAL: dict[str, Any] = {
    "bias": "none",
    "use_dora": False,
    "fan_in_fan_out": False,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "target_parameters": None,
    "exclude_modules": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "velora_config": None,
}
PEFT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None,
    "inference_mode": True,
    "init_lora_weights": True,
    "revision": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "loftq_config": {},
}


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def adapter_config_dict(config: LoraConfig, names: list[str], base: str | None) -> dict[str, Any]:
    """adapter_config.json for adapters on the HF layers `names`."""
    if isinstance(config.targets, str):
        targets: list[str] | str = config.targets
    else:  # the short names when they select exactly these layers (PEFT writes them so), else the full names
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        targets = short if sorted(match_targets(names, short)) == sorted(names) else sorted(names)
    return {
        **PEFT_DEFAULTS,
        **NEUTRAL,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": targets,
        "modules_to_save": config.modules_to_save,
    }


def peft_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], modules_to_save: list[str] | None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, taken from `tensors` (the model's, by unwrapped name)."""
    out: dict[str, torch.Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, LoRA):
            for ab in ("lora_A", "lora_B"):
                out[f"{PREFIX}{m.name}.{ab}.weight"] = tensors[f"{unwrapped_name(path)}.{ab}.weight"]
    layers = hf_layers(model)
    for hf in saved_modules(model, modules_to_save):
        prefix = layers[hf][0] + "."
        for key, t in tensors.items():
            if key.startswith(prefix) and "." not in key[len(prefix) :]:
                out[f"{PREFIX}{hf}.{key[len(prefix) :]}"] = t
    return out


def adapter_state(model: nn.Module, modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (float32 LoRA pairs; modules_to_save in their own dtype)."""
    tensors = {unwrapped_name(n): p.detach() for n, p in model.named_parameters()}
    return peft_state(model, tensors, modules_to_save)


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    config: LoraConfig,
    *,
    base: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write PEFT's adapter folder (atomically per file). `state`: the tensors when already gathered (FSDP)."""
    from safetensors.torch import save as save_bytes

    from smalto.train.durable import replace_durably

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(model, config.modules_to_save) if state is None else state
    names = sorted({a.name for a in adapters(model)})
    data = save_bytes({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt"})
    replace_durably(folder / WEIGHTS, data)
    replace_durably(folder / CONFIG, json.dumps(adapter_config_dict(config, names, base), indent=2) + "\n")


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict[str, Any]]:
    """The LoraConfig an adapter folder describes (and the raw JSON), refusing what smalto does not compute."""
    file = Path(folder) / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a PEFT adapter folder (no {CONFIG})")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{file}: peft_type = {raw.get('peft_type')!r} is not supported; smalto reads LORA adapters"
        )
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{file}: task_type = {raw['task_type']!r}; smalto reads CAUSAL_LM adapters")
    for key, neutral in NEUTRAL.items():
        value = raw.get(key, neutral)
        if value != neutral and not (neutral in ({}, None) and not value):
            raise CheckpointError(
                f"{file}: {key} = {value!r} is not supported (smalto computes plain LoRA: {key} = {neutral!r})"
            )
    try:
        config = LoraConfig(
            r=int(raw["r"]),
            alpha=float(raw.get("lora_alpha", 8)),
            rslora=bool(raw.get("use_rslora", False)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            targets=raw.get("target_modules"),
            modules_to_save=raw.get("modules_to_save"),
        )
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    return config, raw


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Add the adapter in `folder` to `model` (unmerged) with its weights; refuses an adapter of another base."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config, _ = read_adapter_config(folder)
    try:
        apply_lora(
            model, config, (f"{folder / CONFIG}: target_modules", f"{folder / CONFIG}: modules_to_save")
        )
    except ConfigError as e:
        raise CheckpointError(f"{e}; is the adapter for another model?") from None
    file = folder / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS}")
    tensors = load_file(str(file))
    expected = adapter_state(model, config.modules_to_save)
    for key, t in tensors.items():
        if key not in expected:
            near = next(iter(expected))
            raise CheckpointError(
                f"{file}: tensor {key} names no adapted layer of this base (keys look like {near}); "
                "is the adapter for another model?"
            )
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{file}: {key} has shape {tuple(t.shape)}, this base needs {tuple(expected[key].shape)}; "
                "the adapter is for another model"
            )
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise CheckpointError(f"{file} lacks {missing[0]} (adapter_config.json targets it)")
    with torch.no_grad():
        for key, t in tensors.items():
            expected[key].copy_(t)
    return config
