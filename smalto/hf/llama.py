"""LLaMA-family HF folders (`model_type: llama` / `mistral`) in and out of smalto's `MPTConfig` and parameters.

A LLaMA is an MPT with the LLaMA options (smalto/model/config.py): RoPE in HF's `rotate_half` layout (the q/k rows
of an HF checkpoint are already in it: no permutation), RMSNorm, SwiGLU (`mptglu` + silu), grouped-query attention,
an untied head unless tied. The config maps key by key (`LLAMA_KEYS`); the weights map by the table `TENSORS`, with
q_proj | k_proj | v_proj stacked into smalto's fused `Wqkv` (rows Q|K|V) and split again on the way out.

What smalto does not compute is refused by field and value before any weights are read: another model_type,
a rope type other than linear / dynamic / llama3 / yarn, partial rotary, experts (MoE). Mistral's sliding window is
smalto's `sliding_window_size` (the same rule: a query sees the `sliding_window` keys ending at itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import Tensor

from smalto.errors import ConfigError
from smalto.model.config import ROPE_SCALING, MPTConfig

MODEL_TYPES = ("llama", "mistral")
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "relu": "relu",
    "gelu_pytorch_tanh": "gelu_tanh",
}

# LLaMA config.json keys smalto reads (the rest of a config.json is metadata: token ids, dtype, architectures…)
LLAMA_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "sliding_window",
)
# keys of mixture-of-experts configs (Mixtral, ...): refused when they ask for experts
MOE_KEYS = ("num_local_experts", "num_experts")

# smalto parameter ← HF parameter; {i} is the layer. Wqkv is the three HF projections stacked.
TENSORS = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.norm_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "transformer.blocks.{i}.norm_1.weight": "model.layers.{i}.input_layernorm.weight",
    "transformer.blocks.{i}.norm_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "transformer.blocks.{i}.attn.out_proj.{p}": "model.layers.{i}.self_attn.o_proj.{p}",
    "transformer.blocks.{i}.ffn.gate_proj.{p}": "model.layers.{i}.mlp.gate_proj.{p}",
    "transformer.blocks.{i}.ffn.up_proj.{p}": "model.layers.{i}.mlp.up_proj.{p}",
    "transformer.blocks.{i}.ffn.down_proj.{p}": "model.layers.{i}.mlp.down_proj.{p}",
}
QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
# buffers older transformers versions saved into LLaMA checkpoints; recomputed from the config, never read
SKIPPED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(
        "^"
        + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        + "$"
    )


_FROM_HF = [(_pattern(hf), ours) for ours, hf in TENSORS.items()]
_TO_HF = [(_pattern(ours), hf) for ours, hf in TENSORS.items()]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def llama_tensor_name(name: str) -> str | None:
    """The HF LLaMA name of one of smalto's tensors (None for Wqkv, which is three: `tensors_to_llama`)."""
    return _rename(name, _TO_HF)


# ---------------------------------------------------------------- config


def _rope_scaling(raw: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, smalto's rope_scaling) from a config.json: transformers 4's rope_theta + rope_scaling or
    transformers 5's rope_parameters; the pretrained context is written out (transformers' fallbacks applied)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    key = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    theta = float(params.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0)
    legacy = params.pop("type", None)  # transformers < 4.45 wrote `type`; some versions wrote both
    kind = params.pop("rope_type", None) or legacy or "default"
    partial = params.pop("partial_rotary_factor", None) or raw.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ConfigError(
            f"{where}: partial_rotary_factor = {partial}: RoPE on part of a head is not implemented"
        )
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING:
        raise ConfigError(
            f"{where}: {key}.rope_type = {kind!r} is not supported; smalto computes: default, "
            f"{', '.join(ROPE_SCALING)}"
        )
    required, optional = ROPE_SCALING[kind]
    if kind == "dynamic":  # transformers scales from max_position_embeddings, whatever the dict says
        params["original_max_position_embeddings"] = raw["max_position_embeddings"]
    if "original_max_position_embeddings" in required:
        params.setdefault("original_max_position_embeddings", raw["max_position_embeddings"])
    else:  # transformers 5 writes it for every type; linear scaling does not read it
        params.pop("original_max_position_embeddings", None)
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = raw["max_position_embeddings"] / params["original_max_position_embeddings"]
    scaling = {
        "rope_type": kind,
        **{k: params[k] for k in (*required, *optional) if params.get(k) is not None},
    }
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise ConfigError(
            f"{where}: {key} keys {', '.join(unknown)} are not part of rope_type {kind!r} as smalto computes it"
        )
    return theta, scaling


def config_from_llama(raw: dict[str, Any], where: str) -> MPTConfig:
    """smalto's config for a LLaMA / Mistral config.json (`where` names the file in messages)."""
    kind = raw.get("model_type")
    if kind not in MODEL_TYPES:
        raise ConfigError(f"{where}: model_type {kind!r}; this reader takes {', '.join(MODEL_TYPES)}")
    for key in MOE_KEYS:
        if raw.get(key):
            raise ConfigError(f"{where}: {key} = {raw[key]!r}: mixture-of-experts layers are not implemented")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in raw:
            raise ConfigError(f"{where} has no {key}; it is not a complete {kind} config.json")
    raw = {"max_position_embeddings": 2048 if kind == "llama" else 4096 * 32, **raw}
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(
            f"{where}: hidden_act = {act!r} is not supported; smalto computes: {', '.join(ACTIVATIONS)}"
        )
    theta, scaling = _rope_scaling(raw, where)
    # MistralConfig's defaults where a key is missing: a 4096-token window, 8 key/value heads (null: no window)
    window = raw.get("sliding_window", 4096) if kind == "mistral" else None
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"{where}: sliding_window = {window!r} must be a positive integer or null")
    heads = raw["num_attention_heads"]
    attn: dict[str, Any] = {
        "rope": True,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "kv_n_heads": raw.get("num_key_value_heads") or (8 if kind == "mistral" else heads),
        "attn_pdrop": float(raw.get("attention_dropout") or 0.0),
        "sliding_window_size": window or -1,
    }
    if raw.get("head_dim") not in (None, raw["hidden_size"] // heads):
        attn["head_dim"] = raw["head_dim"]
    if kind == "llama" and raw.get("attention_bias"):  # Mistral has no biases
        attn["bias"] = True
    ffn: dict[str, Any] = {
        "ffn_type": "mptglu",
        "ffn_hidden_size": raw["intermediate_size"],
        "ffn_act_fn": {"name": "gelu", "approximate": "tanh"}
        if ACTIVATIONS[act] == "gelu_tanh"
        else {"name": ACTIVATIONS[act]},
    }
    if kind == "llama" and raw.get("mlp_bias"):
        ffn["bias"] = True
    try:
        return MPTConfig.from_dict(
            {
                "d_model": raw["hidden_size"],
                "n_heads": heads,
                "n_layers": raw["num_hidden_layers"],
                "max_seq_len": raw["max_position_embeddings"],
                "vocab_size": raw["vocab_size"],
                "learned_pos_emb": False,
                "no_bias": True,
                "norm_type": "rmsnorm",
                "norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
                "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
                "attn_config": attn,
                "ffn_config": ffn,
            }
        )
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def llama_incompatibilities(config: MPTConfig) -> list[str]:
    """Why transformers' LlamaForCausalLM (MistralForCausalLM for a sliding window) would compute something else
    for this config ([] if it computes it exactly)."""
    a, f = config.attn_config, config.ffn_config
    act = f.ffn_act_fn or {"name": "gelu"}
    name = "gelu_tanh" if act.get("name") == "gelu" and act.get("approximate") == "tanh" else act.get("name")
    window = 0 < a.sliding_window_size < config.max_seq_len
    checks = {
        "rope is off": not a.rope,
        f"norm_type {config.norm_type} (LLaMA: rmsnorm)": config.norm_type != "rmsnorm",
        f"ffn_type {f.ffn_type} (LLaMA: mptglu)": f.ffn_type != "mptglu",
        f"ffn activation {name}": name not in ACTIVATIONS.values(),
        "qk_ln": a.qk_ln,
        "qk_gn": a.qk_gn,
        f"clip_qkv {a.clip_qkv}": a.clip_qkv is not None,
        f"softmax_scale {a.softmax_scale}": a.softmax_scale is not None
        and abs(a.softmax_scale - config.head_dim**-0.5) > 1e-12,
        f"logit_scale {config.logit_scale}": config.logit_scale is not None,
        "learned positions": config.uses_wpe,
        "Mistral (sliding window) has no biases": window and (config.attn_bias or config.ffn_bias),
    }
    return [why for why, bad in checks.items() if bad]


def llama_config_dict(config: MPTConfig) -> dict[str, Any]:
    """The config.json keys of `config` as a LlamaConfig (MistralConfig with a sliding window)."""
    a = config.attn_config
    act = (config.ffn_config.ffn_act_fn or {}).get("name", "silu")
    if act == "gelu" and (config.ffn_config.ffn_act_fn or {}).get("approximate") == "tanh":
        act = "gelu_pytorch_tanh"
    window = a.sliding_window_size if 0 < a.sliding_window_size < config.max_seq_len else None
    scaling = dict(a.rope_scaling) if a.rope_scaling else None
    max_pos = config.max_seq_len
    if scaling and scaling["rope_type"] == "dynamic":  # transformers grows theta past max_position_embeddings
        max_pos = scaling.pop("original_max_position_embeddings")
    rope = {"rope_type": "default", "rope_theta": a.rope_theta, **(scaling or {})}
    d: dict[str, Any] = {
        "model_type": "mistral" if window else "llama",
        "architectures": ["MistralForCausalLM" if window else "LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_n_heads,
        "head_dim": config.head_dim,
        "hidden_act": act,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": a.rope_theta,  # transformers 4 reads these two
        "rope_scaling": scaling,
        "rope_parameters": rope,  # transformers 5 reads this
        "attention_dropout": a.attn_pdrop,
        "use_cache": True,
    }
    if window:
        d["sliding_window"] = window
    else:
        d.update(attention_bias=config.attn_bias, mlp_bias=config.ffn_bias)
    return d


# ---------------------------------------------------------------- tensors


def tensors_from_llama(
    tensors: Iterator[tuple[str, Tensor]], config: MPTConfig
) -> Iterator[tuple[str, Tensor]]:
    """HF (name, tensor) pairs → smalto's; each layer's q, k, v are held until all three are read (they may sit in
    different shards), then given as one Wqkv. A name outside the table is given unchanged (the loader names it)."""
    import torch

    pending: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, tensor in tensors:
        if SKIPPED.match(name):
            continue
        m = QKV.match(name)
        if m is None:
            ours = _rename(name, _FROM_HF)
            yield (ours or name), tensor
            continue
        layer, part, kind = int(m.group(1)), m.group(2), m.group(3)
        parts = pending.setdefault((layer, kind), {})
        parts[part] = tensor
        if len(parts) == 3:
            del pending[(layer, kind)]
            yield f"transformer.blocks.{layer}.attn.Wqkv.{kind}", torch.cat([parts[p] for p in "qkv"])
    for (layer, kind), parts in pending.items():  # a projection without its siblings: the loader reports it
        for p, tensor in parts.items():
            yield f"model.layers.{layer}.self_attn.{p}_proj.{kind}", tensor


def tensors_to_llama(state: dict[str, Tensor], config: MPTConfig) -> dict[str, Tensor]:
    """smalto's state dict with HF LLaMA names: Wqkv split into q_proj, k_proj, v_proj (views, no copies)."""
    q, kv = config.n_heads * config.head_dim, config.kv_n_heads * config.head_dim
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        m = re.match(r"^transformer\.blocks\.(\d+)\.attn\.Wqkv\.(weight|bias)$", name)
        if m:
            prefix = f"model.layers.{m.group(1)}.self_attn"
            for part, piece in zip("qkv", t.split([q, kv, kv]), strict=True):
                out[f"{prefix}.{part}_proj.{m.group(2)}"] = piece
            continue
        hf = _rename(name, _TO_HF)
        if hf is None:  # an invariant: llama_incompatibilities refused configs with other tensors
            raise ValueError(f"no LLaMA name for {name}")
        out[hf] = t
    return out
