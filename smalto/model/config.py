"""`MPTConfig`: the full configuration surface of MPT.

Names and defaults follow the `config.json` of `mosaicml/mpt-7b` and llm-foundry's `MPTConfig`, so a hub config maps
field by field. The nested `attn_config`, `ffn_config` and `init_config` are dataclasses here and plain dicts in JSON.
Validation lives in one place (`MPTConfig.__post_init__`) and raises `ConfigError` naming the key, the value and
what is allowed. Legacy values found in hub checkpoints (`attn_impl: torch|flash|triton`, `attn_type`, `prefix_lm`,
`verbose`, ...) are accepted and mapped, never silently ignored when they would change the computation.

Why one file of this size: it is the whole published MPT surface plus the LLaMA-style options, one documented
field each, with the one validation step that relates them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from smalto.errors import ConfigError, build, check_choice, check_keys

NORM_TYPES = ("layernorm", "low_precision_layernorm", "rmsnorm", "low_precision_rmsnorm")
ATTN_IMPLS = ("auto", "flex", "cudnn", "sdpa", "eager")
# attn_impl values written by llm-foundry / the hub. They chose an implementation of one computation, and every smalto
# kernel computes that same attention (tests/model), so all of them map to `auto`, the fast kernel for the job: a
# `mosaicml/mpt-7b` folder (`attn_impl: torch`) must not generate or evaluate through the materialised softmax.
# `eager` stays available by name.
LEGACY_ATTN_IMPLS = {"torch": "auto", "flash": "auto", "triton": "auto"}
ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")
FFN_TYPES = ("mptmlp", "mptglu")
FFN_ACTS = ("gelu", "silu", "relu", "gelu_tanh")
INIT_NAMES = (
    "kaiming_normal_",
    "kaiming_uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "baseline_",
    "small_init_",
    "neox_init_",
)
FAN_MODES = ("fan_in", "fan_out")

# keys an HF config.json carries that describe the file, not the model
HF_METADATA_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",
        "torch_dtype",
        "dtype",
        "quantization_config",  # how the weights are stored (smalto/quant/folder.py reads it)
        "transformers_version",
        "_name_or_path",
        "use_cache",
        "tokenizer_name",
        "verbose",
        "fc_type",
        "use_pad_tok_in_ffn",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_return_dict",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "chunk_size_feed_forward",
        "tie_encoder_decoder",
        "pruned_heads",
        "id2label",
        "label2id",
        "problem_type",
        "task_specific_params",
        "finetuning_task",
        "tf_legacy_loss",
        "cross_attention_hidden_size",
        "initializer_range",
        "hidden_size",
        "n_positions",
        "num_attention_heads",
        "num_hidden_layers",
        "transformers.js_config",
        "smalto",
        "attn_impl_note",
        "_attn_implementation_autoset",
        "generation_config",
    }
)

# Keys of llm-foundry / hub MPT configs that change the computation in a way smalto does not implement: refused
# unless they hold the value that leaves it unchanged (key → (such values, why)). Any other key smalto does not know
# is dropped from a config.json with one warning, as transformers ignores it; a recipe refuses it.
UNSUPPORTED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "attn_config.prefix_lm": ((False, None), "prefix-LM MPT variants were never released"),
    "attn_config.fused_qkv": ((True,), "smalto always uses a fused Wqkv"),
    "attn_config.attn_logit_softcapping": ((None,), "attention logit soft-capping is not implemented"),
    "attn_config.reuse_kv_layer_idx": (
        (None,),
        "sharing one layer's keys/values with another is not implemented",
    ),
    "final_logit_softcapping": ((None,), "logit soft-capping is not implemented"),
    "block_overrides": ((None, {}), "per-layer overrides of the block config are not implemented"),
    "ffn_config.ffn_type": (FFN_TYPES, "TransformerEngine's te_ln_mlp and the MoE FFNs are not implemented"),
}


def _check_supported(key: str, value: Any) -> None:
    neutral, why = UNSUPPORTED_KEYS[key]
    if value not in neutral:
        raise ConfigError(f"{key} = {json.dumps(value, default=str)} is not supported: {why}")


@dataclass(kw_only=True)
class AttnConfig:
    attn_impl: str = "auto"
    """Kernel: `flex` (FlexAttention), `sdpa` (scaled_dot_product_attention), `eager` (reference), or `auto`."""
    attn_pdrop: float = 0.0
    qk_ln: bool = False
    """LayerNorm (of `norm_type`) on queries and keys before the dot product."""
    qk_gn: bool = False
    """Per-head norm on queries and keys (shared weights of size head_dim)."""
    clip_qkv: float | None = None
    """Clamp the fused QKV projection to [-clip_qkv, clip_qkv]."""
    softmax_scale: float | None = None
    """Defaults to 1/sqrt(head_dim)."""
    attn_uses_sequence_id: bool = False
    """Mask attention across packed documents using `sequence_id`."""
    sliding_window_size: int = -1
    """Each query sees at most this many keys (itself included); -1 for unlimited."""
    alibi: bool = False
    alibi_bias_max: int = 8
    rope: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling as transformers defines it (`ROPE_SCALING`): {'rope_type': 'linear' | 'dynamic' |
    'llama3' | 'yarn', 'factor': ..., ...}; None: plain RoPE."""
    kv_n_heads: int | None = None
    """Key/value heads (GQA); None = n_heads (multi-head), 1 = multi-query."""
    head_dim: int | None = None
    """Width of one head; None = d_model / n_heads (LLaMA-family checkpoints may set another)."""
    bias: bool | None = None
    """Biases in Wqkv and out_proj; None follows `no_bias` (LLaMA's attention_bias)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class FFNConfig:
    ffn_type: str = "mptmlp"
    """`mptmlp` (up, act, down) or `mptglu` (gated: act(gate) * up, then down; SwiGLU with act silu)."""
    ffn_hidden_size: int | None = None
    """Defaults to expansion_ratio * d_model."""
    ffn_act_fn: dict[str, Any] | None = None
    """{'name': 'gelu'|'silu'|'relu', 'approximate': 'none'|'tanh'} (exact GELU by default)."""
    bias: bool | None = None
    """Biases in the feed-forward linears; None follows `no_bias` (LLaMA's mlp_bias)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"ffn_type": self.ffn_type}
        if self.ffn_hidden_size is not None:
            d["ffn_hidden_size"] = self.ffn_hidden_size
        if self.ffn_act_fn is not None:
            d["ffn_act_fn"] = dict(self.ffn_act_fn)
        if self.bias is not None:
            d["bias"] = self.bias
        return d


@dataclass(kw_only=True)
class InitConfig:
    name: str = "kaiming_normal_"
    fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    init_div_is_residual: bool | float | int = True
    """Divide the init of residual output projections by sqrt(2 * n_layers) (True) or by this number."""
    emb_init_std: float | None = None
    emb_init_uniform_lim: float | list[float] | None = None
    init_std: float | None = None
    """Std for `baseline_` (required there)."""
    init_gain: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(kw_only=True)
class MPTConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True
    """Learned absolute positions (`transformer.wpe`); switched off when ALiBi or RoPE is on, as llm-foundry does."""
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    ffn_config: FFNConfig = field(default_factory=FFNConfig)
    init_config: InitConfig = field(default_factory=InitConfig)
    init_device: str = "cpu"
    logit_scale: float | str | None = None
    """Multiply logits by this number, or by 1/sqrt(d_model) with 'inv_sqrt_d_model'."""
    no_bias: bool = False
    embedding_fraction: float = 1.0
    """Scale the embedding's gradient by this fraction (GLM-130B's stabiliser); the forward value is unchanged."""
    norm_type: str = "low_precision_layernorm"
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name, cls in (
            ("attn_config", AttnConfig),
            ("ffn_config", FFNConfig),
            ("init_config", InitConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _nested_from_dict(name, cls, value))
        self._validate()

    # ---- derived values, computed in one place ----
    @property
    def head_dim(self) -> int:
        return self.attn_config.head_dim or self.d_model // self.n_heads

    @property
    def attn_bias(self) -> bool:
        """Whether Wqkv and out_proj have biases."""
        b = self.attn_config.bias
        return not self.no_bias if b is None else b

    @property
    def ffn_bias(self) -> bool:
        """Whether the feed-forward linears have biases."""
        b = self.ffn_config.bias
        return not self.no_bias if b is None else b

    @property
    def kv_n_heads(self) -> int:
        return self.attn_config.kv_n_heads or self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_config.ffn_hidden_size is not None:
            return self.ffn_config.ffn_hidden_size
        return int(self.d_model * self.expansion_ratio)

    @property
    def logit_scale_value(self) -> float | None:
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return None if self.logit_scale is None else float(self.logit_scale)

    @property
    def softmax_scale(self) -> float:
        s = self.attn_config.softmax_scale
        return float(s) if s is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def uses_wpe(self) -> bool:
        return self.learned_pos_emb and not (self.attn_config.alibi or self.attn_config.rope)

    def num_params(self) -> int:
        """All parameters, tied embedding counted once (llm-foundry's N for MFU)."""
        d, L, V = self.d_model, self.n_layers, self.vocab_size
        q, kv = self.n_heads * self.head_dim, self.kv_n_heads * self.head_dim
        per_norm = 1 if self.no_bias or self.norm_type.endswith("rmsnorm") else 2  # RMSNorm has no bias
        norm = per_norm * d
        attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if self.attn_bias else 0)
        if self.attn_config.qk_ln:
            attn += (q + kv) * per_norm
        elif self.attn_config.qk_gn:
            attn += 2 * self.head_dim * per_norm
        f = self.ffn_hidden_size
        n_up = 2 if self.ffn_config.ffn_type == "mptglu" else 1
        ffn = n_up * d * f + f * d + (n_up * f + d if self.ffn_bias else 0)
        block = 2 * norm + attn + ffn
        emb = (
            V * d
            + (self.max_seq_len * d if self.uses_wpe else 0)
            + (0 if self.tie_word_embeddings else V * d)
        )
        return L * block + emb + norm

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """llm-foundry's training FLOPs per token: 6·N + 12·n_layers·d_model·seq."""
        s = seq_len or self.max_seq_len
        return 6 * self.num_params() + 12 * self.n_layers * self.d_model * s

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True) -> MPTConfig:
        """Build from a dict (a recipe's `model` section: unknown keys and values of the wrong type are refused,
        named `model.<key>`). `strict=False` reads an HF config.json: metadata keys are dropped, legacy keys mapped,
        and keys smalto does not know are dropped with one warning unless `UNSUPPORTED_KEYS` refuses them."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"model must be a mapping, got {d!r}")
        d = dict(d)
        if not strict:
            if d.get("model_type", "mpt") != "mpt":
                raise ConfigError(
                    f"config.json has model_type {d['model_type']!r}; smalto loads MPT models (model_type 'mpt')"
                )
            d = _map_hf_keys(d)  # maps the legacy attention keys too
        elif isinstance(d.get("attn_config"), Mapping):
            d["attn_config"] = _map_legacy_attn(dict(d["attn_config"]))
        return build(cls, d, "model")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["attn_config"] = self.attn_config.to_dict()
        d["ffn_config"] = self.ffn_config.to_dict()
        d["init_config"] = self.init_config.to_dict()
        return d

    def replace(self, **changes: Any) -> MPTConfig:
        d = self.to_dict()
        for k, v in changes.items():
            if k in ("attn_config", "ffn_config", "init_config") and isinstance(v, dict):
                d[k] = {**d[k], **v}
            else:
                d[k] = v
        return MPTConfig.from_dict(d)

    # ---- validation ----
    def _validate(self) -> None:
        a = self.attn_config
        for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{key} = {v!r} must be a positive integer")
        if a.head_dim is not None and (not isinstance(a.head_dim, int) or a.head_dim <= 0):
            raise ConfigError(f"attn_config.head_dim = {a.head_dim!r} must be a positive integer or null")
        if a.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or set attn_config.head_dim"
            )
        if a.kv_n_heads is not None and (a.kv_n_heads <= 0 or self.n_heads % a.kv_n_heads):
            raise ConfigError(
                f"attn_config.kv_n_heads ({a.kv_n_heads}) must be a positive divisor of n_heads ({self.n_heads})"
            )
        check_choice("norm_type", self.norm_type, NORM_TYPES)
        check_choice("attn_config.attn_impl", a.attn_impl, ATTN_IMPLS)
        check_choice("ffn_config.ffn_type", self.ffn_config.ffn_type, FFN_TYPES)
        check_choice("init_config.name", self.init_config.name, INIT_NAMES)
        check_choice("init_config.fan_mode", self.init_config.fan_mode, FAN_MODES)
        act = self.ffn_config.ffn_act_fn
        if act is not None:
            check_keys("ffn_config.ffn_act_fn", act, ("approximate", "name"))
            check_choice("ffn_config.ffn_act_fn.name", act.get("name"), FFN_ACTS)
            check_choice(
                "ffn_config.ffn_act_fn.approximate", act.get("approximate", "none"), ("none", "tanh")
            )
        if a.alibi and a.rope:
            raise ConfigError(
                "attn_config.alibi and attn_config.rope are both true; pick one position scheme"
            )
        if a.qk_ln and a.qk_gn:
            raise ConfigError("attn_config.qk_ln and attn_config.qk_gn are both true; pick one")
        if a.rope and self.head_dim % 2:
            raise ConfigError(f"attn_config.rope needs an even head dim, not {self.head_dim}")
        if a.rope_scaling is not None:
            check_rope_scaling(a.rope_scaling)
        if a.clip_qkv is not None and a.clip_qkv <= 0:
            raise ConfigError(f"attn_config.clip_qkv = {a.clip_qkv} must be positive or null")
        if a.sliding_window_size != -1 and a.sliding_window_size < 1:
            raise ConfigError(
                f"attn_config.sliding_window_size = {a.sliding_window_size} must be -1 (off) or >= 1"
            )
        for key in ("resid_pdrop", "emb_pdrop"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} = {getattr(self, key)} must be in [0, 1)")
        if not 0.0 <= a.attn_pdrop < 1.0:
            raise ConfigError(f"attn_config.attn_pdrop = {a.attn_pdrop} must be in [0, 1)")
        if not 0.0 < self.embedding_fraction <= 1.0:
            raise ConfigError(f"embedding_fraction = {self.embedding_fraction} must be in (0, 1]")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            raise ConfigError(f"logit_scale = {self.logit_scale!r}: use a number, null or 'inv_sqrt_d_model'")
        f = self.d_model * self.expansion_ratio
        if self.ffn_config.ffn_hidden_size is None and f != int(f):
            raise ConfigError(
                f"d_model * expansion_ratio = {f} is not an integer; set ffn_config.ffn_hidden_size"
            )
        if self.init_config.name == "baseline_" and self.init_config.init_std is None:
            raise ConfigError("init_config.name 'baseline_' needs init_config.init_std")
        if not (self.init_device in ("cpu", "meta", "mixed") or self.init_device.startswith("cuda")):
            raise ConfigError(f"init_device = {self.init_device!r}; use cpu, meta, cuda or cuda:N")
        if self.learned_pos_emb and (a.alibi or a.rope):
            # llm-foundry's behaviour: the position scheme wins, and there is no wpe table in the checkpoint
            self.learned_pos_emb = False


# RoPE scaling types as transformers defines them (modeling_rope_utils): type → (required keys, optional keys).
# `original_max_position_embeddings` is the context the model was pretrained with (transformers falls back to
# max_position_embeddings; smalto writes it out, since max_seq_len may be overridden at load).
ROPE_SCALING: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor", "original_max_position_embeddings"), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), ()),
    "yarn": (
        ("factor", "original_max_position_embeddings"),
        ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    ),
}


def check_rope_scaling(d: Mapping[str, Any]) -> None:
    """Refuse a rope_scaling dict smalto does not compute: an unknown type, a missing or unknown key."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"attn_config.rope_scaling must be a mapping or null, got {d!r}")
    check_choice("attn_config.rope_scaling.rope_type", d.get("rope_type"), tuple(ROPE_SCALING))
    required, optional = ROPE_SCALING[d["rope_type"]]
    check_keys("attn_config.rope_scaling", d, ("rope_type", *required, *optional))
    for key in required:
        if not isinstance(d.get(key), int | float) or isinstance(d.get(key), bool):
            raise ConfigError(f"attn_config.rope_scaling.{key} = {d.get(key)!r} must be a number")


def _nested_from_dict(name: str, cls: type, d: dict[str, Any]) -> Any:
    return build(cls, _map_legacy_attn(dict(d)) if cls is AttnConfig else d, name)


# llm-foundry attention keys that only choose an implementation of the same computation: dropped
_IMPLEMENTATION_KEYS = ("flex_attn_mod_list", "flex_attn_compile", "flex_attn_config", "verbose", "rope_impl")


def _map_legacy_attn(d: dict[str, Any]) -> dict[str, Any]:
    """Map the attention keys that hub checkpoints and llm-foundry write onto ours; refuse the ones that would
    change the computation in a way smalto does not implement (never drop them in silence)."""
    if d.get("attn_impl") in LEGACY_ATTN_IMPLS:
        d["attn_impl"] = LEGACY_ATTN_IMPLS[d["attn_impl"]]
    attn_type = d.pop("attn_type", None)
    if attn_type is not None:
        check_choice("attn_config.attn_type", attn_type, ATTN_TYPES)
        if attn_type == "multihead_attention":
            d["kv_n_heads"] = None
        elif attn_type == "multiquery_attention":
            d["kv_n_heads"] = 1
    for key in ("prefix_lm", "fused_qkv", "attn_logit_softcapping"):
        if key in d:
            _check_supported(f"attn_config.{key}", d.pop(key))
    rope_impl = d.get("rope_impl")
    dail = d.pop("rope_dail_config", None) or {}
    hf = d.pop("rope_hf_config", None) or {}
    if d.get("rope"):
        if rope_impl not in (None, "hf", "dail"):
            raise ConfigError(f"attn_config.rope_impl = {rope_impl!r}; supported: hf, dail")
        if rope_impl == "dail" and (dail.get("type", "original") != "original" or dail.get("interleaved")):
            raise ConfigError(
                "attn_config.rope_dail_config: only type 'original', not interleaved, is supported"
            )
        if rope_impl == "hf" and hf.get("type", "no_scaling") not in ("no_scaling", None):
            raise ConfigError(
                f"attn_config.rope_hf_config.type = {hf.get('type')!r}: only no_scaling is supported"
            )
    for key in _IMPLEMENTATION_KEYS:
        d.pop(key, None)
    return d


def _map_hf_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A config.json's keys mapped onto ours; see `HF_METADATA_KEYS` and `UNSUPPORTED_KEYS`."""
    if "layer_norm_epsilon" in d:  # transformers' native MptConfig calls norm_eps this
        eps = d.pop("layer_norm_epsilon")
        d.setdefault("norm_eps", eps)
    d = {k: v for k, v in d.items() if k not in HF_METADATA_KEYS}
    if d.get("norm_type") == "triton_rmsnorm":
        d["norm_type"] = "rmsnorm"
    if "attn_config" not in d:
        # transformers' native MptConfig without an attn_config is multi-head attention with ALiBi
        d["attn_config"] = {"alibi": True}
    if isinstance(d.get("attn_config"), Mapping):
        d["attn_config"] = _map_legacy_attn(dict(d["attn_config"]))
    if isinstance(d.get("ffn_config"), Mapping) and "ffn_type" in d["ffn_config"]:
        _check_supported("ffn_config.ffn_type", d["ffn_config"]["ffn_type"])
    ignored: list[str] = []

    def known(where: str, section: dict[str, Any], cls: type) -> dict[str, Any]:
        names = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for k, v in section.items():
            key = f"{where}{k}"
            if k in names:
                out[k] = v
            elif key in UNSUPPORTED_KEYS:
                _check_supported(key, v)
            elif where and (k in HF_METADATA_KEYS or k.startswith("_")):
                pass  # transformers 5 nests PretrainedConfig keys in the nested configs
            else:
                ignored.append(key)
        return out

    d = known("", d, MPTConfig)
    for name, cls in (("attn_config", AttnConfig), ("ffn_config", FFNConfig), ("init_config", InitConfig)):
        if isinstance(d.get(name), Mapping):
            d[name] = known(f"{name}.", dict(d[name]), cls)
    if ignored:
        warnings.warn(
            f"config.json: ignoring keys smalto does not know (none of them is known to change the model): "
            f"{', '.join(ignored)}",
            stacklevel=3,
        )
    return d
