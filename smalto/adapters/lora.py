"""LoRA: a frozen linear layer plus a trainable low-rank update, y = base(x) + B·A·dropout(x)·scaling.

Hu et al. (2021), as PEFT computes it: A (r × in) starts Kaiming-uniform and B (out × r) at zero, so the model is
unchanged at step 0; scaling is α/r, or α/√r with rsLoRA; A and B are float32 whatever the base's dtype.

`apply_lora(model, config)` freezes every parameter, then, for each layer whose **HF module name** the targets
match (as PEFT matches them: a list of names or dotted suffixes, a regex matched in full, or `all-linear`), gives
the layer a `lora` ModuleDict of `LoRA` pairs and makes its class a subclass of its own class (`LoRAFoo` of `Foo`)
whose forward adds them. The base layer may be any module with `in_features` and `out_features` (nn.Linear, the
NF4 layer of QLoRA): its parameters keep their names, so loading the base, the HF export and FSDP2 see a plain model.

HF module names are those of the folder the base is written as (smalto.hf.save): MPT's are smalto's own
(`transformer.blocks.{i}.attn.Wqkv`, `attn.out_proj`, `ffn.up_proj`, `ffn.down_proj`); a LLaMA's are
`model.layers.{i}.self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`, where q/k/v are row slices of smalto's
fused `Wqkv`: each is a `LoRA` over its rows (`LoRA.rows`), so a PEFT adapter for q_proj and v_proj is exactly
two pairs on one Wqkv.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smalto.errors import ConfigError, check_choice

# PEFT's default target_modules per model_type (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"mpt": ["Wqkv"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"]}
BASE_DTYPES = ("bf16", "nf4")


@dataclass(kw_only=True)
class LoraConfig:
    r: int = 8
    """Rank of the update."""
    alpha: float = 8.0
    """Scaling numerator (PEFT's lora_alpha): the update is scaled by alpha / r (alpha / √r with rslora)."""
    rslora: bool = False
    """Scale by alpha / √r (rank-stabilised LoRA, PEFT's use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (PEFT's lora_dropout)."""
    targets: list[str] | str | None = None
    """HF module names the adapters go on, as PEFT's target_modules: names or dotted suffixes (`[Wqkv, out_proj]`),
    one regex matched against the full name, or `all-linear` (every linear layer but the output head); default:
    PEFT's for the model type (`Wqkv` for MPT, `q_proj, v_proj` for LLaMA)."""
    modules_to_save: list[str] | None = None
    """Other modules trained in full and saved with the adapter (PEFT's modules_to_save), by HF name or suffix."""
    base_dtype: str = "bf16"
    """How the frozen base is stored for training: `bf16`, or `nf4` (QLoRA: 4-bit NormalFloat, smalto.adapters.nf4)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r = {self.r} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout = {self.dropout} must be in [0, 1)")
        if (isinstance(self.targets, list) and not self.targets) or self.targets == "":
            raise ConfigError(
                "lora.targets is empty; name the layers (e.g. [Wqkv, out_proj]) or leave it out"
            )
        check_choice("lora.base_dtype", self.base_dtype, BASE_DTYPES)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoRA(nn.Module):
    """One update B·A·dropout(x)·scaling, added to the base output's rows `rows` (all of them when None).
    `name` is the HF module name it stands for (its key in PEFT's files)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int,
        scaling: float,
        dropout: float,
        name: str,
        rows: tuple[int, int] | None = None,
        device: Any = None,
    ):
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling, self.name, self.rows = scaling, name, rows
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        # as PEFT under autocast: the adapters are stored in float32 and their matmuls run in the activations'
        # dtype (bf16 in training), so dropout and the products read and write 16-bit tensors; the gradients reach
        # the float32 weights through the cast
        if torch.is_autocast_enabled(x.device.type) or x.dtype == self.lora_A.weight.dtype:
            return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def delta_weight(self) -> Tensor:
        """The update as a weight: scaling · B·A, (rows, in_features) in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"name={self.name}, scaling={self.scaling:g}, rows={self.rows}"


class LoRALayer:
    """The forward that a targeted layer's class gains: its own forward, plus each of its enabled `LoRA`s."""

    lora: nn.ModuleDict
    lora_enabled: bool = True
    lora_merged: bool = False

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = super().forward(x)  # type: ignore[misc]
        if self.lora_merged or not self.lora_enabled:
            return out
        adapter: Any
        for adapter in self.lora.values():
            d = adapter(x).to(out.dtype)
            rows: tuple[int, int] | None = adapter.rows
            if rows is not None:  # a slice of a fused layer (a LLaMA's q_proj in Wqkv): zeros elsewhere
                d = F.pad(d, (rows[0], out.shape[-1] - rows[1]))
            out = out + d
        return out


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if issubclass(cls, LoRALayer):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALayer, cls), {})
    return _CLASSES[cls]


# ---- names ----


def model_type(model: nn.Module) -> str:
    """The model_type of the HF folder this model is written as (`mpt`, or `llama` with the LLaMA options)."""
    from smalto.hf.llama import llama_incompatibilities

    config: Any = model.config
    return "llama" if not llama_incompatibilities(config) else "mpt"


def hf_layers(model: nn.Module) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """HF module name → (smalto module name, output rows or None) for every layer with parameters, in the
    naming of the HF folder the model is written as (a LLaMA's q/k/v are row slices of `Wqkv`)."""
    config: Any = model.config
    out: dict[str, tuple[str, tuple[int, int] | None]] = {}
    llama = model_type(model) == "llama"
    from smalto.hf.llama import llama_tensor_name

    q, kv = config.n_heads * config.head_dim, config.kv_n_heads * config.head_dim
    for name, module in model.named_modules():
        if not name or next(module.parameters(recurse=False), None) is None or isinstance(module, LoRA):
            continue
        name = unwrapped_name(name)
        if name.endswith((".lora_A", ".lora_B")):
            continue
        if not llama:
            out[name] = (name, None)
            continue
        m = re.fullmatch(r"transformer\.blocks\.(\d+)\.attn\.Wqkv", name)
        if m:
            prefix = f"model.layers.{m.group(1)}.self_attn"
            for part, rows in zip("qkv", [(0, q), (q, q + kv), (q + kv, q + 2 * kv)], strict=True):
                out[f"{prefix}.{part}_proj"] = (name, rows)
            continue
        hf = llama_tensor_name(f"{name}.weight")
        if hf is not None:
            out[hf.removesuffix(".weight")] = (name, None)
    return out


def unwrapped_name(name: str) -> str:
    """A module's name without the prefixes of activation checkpointing and compile (as in the model's files)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def match_targets(names: list[str], targets: list[str] | str) -> list[str]:
    """The names PEFT's target matching selects: a string is a regex matched in full; a list matches a name equal
    to an entry or ending in `.entry`."""
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"lora.targets = {targets!r} is not a valid regex ({e})") from None
        return [n for n in names if pattern.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]


def _suffixes(names: list[str]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(short)


def resolve_targets(
    model: nn.Module, targets: list[str] | str | None, key: str = "lora.targets"
) -> list[str]:
    """The HF names of the linear layers `targets` selects (default: PEFT's for the model type); refuses targets
    that match nothing or a layer that is not linear, naming what would match."""
    layers = hf_layers(model)
    modules = {unwrapped_name(n): m for n, m in model.named_modules()}
    linear = [n for n, (s, _) in layers.items() if _is_linear(modules[s])]
    kind = model_type(model)
    if targets is None:
        targets = DEFAULT_TARGETS[kind]
    if targets == "all-linear":
        return [n for n in linear if n != "lm_head"]
    found = match_targets(list(layers), targets)
    if not found:
        raise ConfigError(
            f"{key} = {targets!r} matches no layer of this {kind} model; its linear layers are named "
            f"{linear[0]} … and end in: {_suffixes(linear)} (or use a regex, or all-linear)"
        )
    other = [n for n in found if n not in linear]
    if other:
        raise ConfigError(
            f"{key} = {targets!r} matches {other[0]}, which is not a linear layer; LoRA goes on layers ending in: "
            f"{_suffixes(linear)}"
        )
    return found


# ---- applying ----


def apply_lora(
    model: nn.Module, config: LoraConfig, keys: tuple[str, str] = ("lora.targets", "lora.modules_to_save")
) -> list[str]:
    """Freeze `model` and add LoRA to the layers `config.targets` selects (and make `modules_to_save` trainable);
    returns the HF names of the adapted layers. Apply before activation checkpointing, compile and FSDP. `keys`
    name the targets and modules_to_save in messages."""
    names = resolve_targets(model, config.targets, keys[0])
    layers = hf_layers(model)
    model.requires_grad_(False)
    for hf in names:
        smalto_name, rows = layers[hf]
        layer: Any = model.get_submodule(smalto_name)
        out = layer.out_features if rows is None else rows[1] - rows[0]
        device = _device(layer)
        adapter = LoRA(
            layer.in_features,
            out,
            r=config.r,
            scaling=config.scaling,
            dropout=config.dropout,
            name=hf,
            rows=rows,
            device=device,
        )
        if not isinstance(layer, LoRALayer):
            layer.__class__ = _lora_class(type(layer))
            layer.lora = nn.ModuleDict()
        adapter.train(layer.training)
        layer.lora[hf.rsplit(".", 1)[-1]] = adapter
    for hf in saved_modules(model, config.modules_to_save, keys[1]):
        model.get_submodule(layers[hf][0]).requires_grad_(True)
    return names


def saved_modules(model: nn.Module, names: list[str] | None, key: str = "lora.modules_to_save") -> list[str]:
    """The HF names `modules_to_save` selects (trained in full beside the adapters), refusing what matches nothing
    or only part of a fused layer."""
    if not names:
        return []
    layers = hf_layers(model)
    found = match_targets(list(layers), names)
    missing = [n for n in names if not match_targets(found, [n])]
    if missing:
        raise ConfigError(
            f"{key}: {missing[0]!r} matches no module of this model; modules with parameters end in: "
            f"{_suffixes(list(layers))}"
        )
    sliced = [n for n in found if layers[n][1] is not None]
    if sliced:
        raise ConfigError(f"{key}: {sliced[0]} is part of smalto's fused Wqkv and cannot be trained alone")
    return found


def _device(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    """(module name, layer) for every layer carrying LoRA."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            yield name, m


def adapters(model: nn.Module) -> Iterator[LoRA]:
    for m in model.modules():
        if isinstance(m, LoRA):
            yield m


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """`with adapters_disabled(model):` the base model alone (DPO's reference); the adapters come back after."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.lora_merged for m in layers):
        raise ValueError("the adapters are merged into the weights: unmerge(model) before disabling them")
    for m in layers:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.lora_enabled = True


# ---- merging ----


def _weight(layer: nn.Module) -> Tensor:
    w = getattr(layer, "weight", None)
    if not isinstance(w, Tensor) or w.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.float64,
    ):
        raise ValueError(
            f"{type(layer).__name__} stores no float weight to merge into: dequantize it first (merged_model)"
        )
    return w


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Add every adapter's update into its base weight (the forward then skips the adapters); `unmerge` undoes it
    up to rounding in the weight's dtype."""
    for _, layer in lora_layers(model):
        if layer.lora_merged:
            continue
        w = _weight(layer)
        for a in layer.lora.values():
            rows = a.rows or (0, w.shape[0])
            w[rows[0] : rows[1]] += a.delta_weight().to(w.dtype)
        layer.lora_merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        if not layer.lora_merged:
            continue
        w = _weight(layer)
        for a in layer.lora.values():
            rows = a.rows or (0, w.shape[0])
            w[rows[0] : rows[1]] -= a.delta_weight().to(w.dtype)
        layer.lora_merged = False


@torch.no_grad()
def merged_model(model: nn.Module) -> list[str]:
    """Make `model` plain again with the updates in its weights: layers without a float weight (NF4) are first
    replaced by an `nn.Linear` of their dequantized weight; returns the names of those dequantized."""
    dequantized = []
    for name, layer in list(lora_layers(model)):
        if not isinstance(getattr(layer, "weight", None), nn.Parameter) and hasattr(layer, "dequantize"):
            plain = nn.Linear(
                layer.in_features, layer.out_features, bias=getattr(layer, "bias", None) is not None
            )
            w = layer.dequantize()
            plain.to(device=w.device, dtype=w.dtype)
            plain.weight.copy_(w)
            if plain.bias is not None:
                plain.bias.copy_(layer.bias)
            plain.__class__ = _lora_class(nn.Linear)
            plain.lora = layer.lora  # type: ignore[assignment]
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
            dequantized.append(name)
    merge(model)
    remove_lora(model)
    return dequantized


def remove_lora(model: nn.Module) -> None:
    """Drop the adapters (merged or not): every adapted layer becomes its own class again."""
    for _, layer in list(lora_layers(model)):
        del layer.lora
        for attr in ("lora_enabled", "lora_merged"):
            layer.__dict__.pop(attr, None)
        layer.__class__ = type(layer).__mro__[2]  # LoRAFoo → (LoRALayer, Foo): back to Foo
