"""MPT configuration for `trust_remote_code` loading (copied by smalto into every saved model folder).

Self-contained: imports only transformers. Field names follow `mosaicml/mpt-7b`'s config.json; `attn_config`,
`ffn_config` and `init_config` stay plain dicts so the published usage code (`config.attn_config['attn_impl'] = ...`)
works. `MPTConfig` (model_type `mpt`) is used for folders that transformers' native `MptForCausalLM` also computes
exactly; `SmaltoMPTConfig` (model_type `smalto_mpt`) for the others, so that native loading refuses them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from transformers import PretrainedConfig

ATTN_DEFAULTS: dict[str, Any] = {
    "attn_impl": "torch",
    "attn_pdrop": 0.0,
    "qk_ln": False,
    "qk_gn": False,
    "clip_qkv": None,
    "softmax_scale": None,
    "attn_uses_sequence_id": False,
    "sliding_window_size": -1,
    "alibi": False,
    "alibi_bias_max": 8,
    "rope": False,
    "rope_theta": 10000.0,
    "kv_n_heads": None,
}
FFN_DEFAULTS: dict[str, Any] = {"ffn_type": "mptmlp", "ffn_hidden_size": None, "ffn_act_fn": None}
TOP_DEFAULTS: dict[str, Any] = {
    "expansion_ratio": 4,
    "max_seq_len": 2048,
    "resid_pdrop": 0.0,
    "emb_pdrop": 0.0,
    "learned_pos_emb": True,
    "logit_scale": None,
    "no_bias": False,
    "embedding_fraction": 1.0,
    "norm_type": "low_precision_layernorm",
    "tie_word_embeddings": True,
    "use_cache": False,
    "init_device": "cpu",
}


def resolve(config: PretrainedConfig) -> SimpleNamespace:
    """Every setting the model reads, defaults filled in. The model reads the config through this, never
    directly: transformers 5 builds remote configs without running `__init__`, so a key absent from config.json
    is absent from the object, and users edit `config.attn_config` after loading."""
    s = SimpleNamespace(**{k: getattr(config, k, v) for k, v in TOP_DEFAULTS.items()})
    s.d_model, s.n_heads, s.n_layers, s.vocab_size = (
        config.d_model,
        config.n_heads,
        config.n_layers,
        config.vocab_size,
    )
    eps = getattr(config, "norm_eps", None)
    s.norm_eps = eps if eps is not None else getattr(config, "layer_norm_epsilon", 1e-5)
    attn = dict(getattr(config, "attn_config", None) or {})
    if not isinstance(attn, dict):  # a native MptAttentionConfig object
        attn = attn.to_dict()
    if attn.get("attn_type") == "multiquery_attention" and attn.get("kv_n_heads") is None:
        attn["kv_n_heads"] = 1
    s.attn = {**ATTN_DEFAULTS, **{k: v for k, v in attn.items() if k in ATTN_DEFAULTS}}
    s.ffn = {**FFN_DEFAULTS, **(getattr(config, "ffn_config", None) or {})}
    return s


class MPTConfig(PretrainedConfig):
    model_type = "mpt"
    attribute_map = {  # noqa: RUF012 - transformers' own convention for this class attribute
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }

    def __init__(
        self,
        d_model: int = 2048,
        n_heads: int = 16,
        n_layers: int = 24,
        expansion_ratio: float = 4,
        max_seq_len: int = 2048,
        vocab_size: int = 50368,
        resid_pdrop: float = 0.0,
        emb_pdrop: float = 0.0,
        learned_pos_emb: bool = True,
        attn_config: dict | None = None,
        ffn_config: dict | None = None,
        init_config: dict | None = None,
        init_device: str = "cpu",
        logit_scale: float | str | None = None,
        no_bias: bool = False,
        embedding_fraction: float = 1.0,
        norm_type: str = "low_precision_layernorm",
        norm_eps: float | None = None,
        use_cache: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ):
        # transformers' native MptConfig names the norm epsilon layer_norm_epsilon; accept both
        eps = kwargs.pop("layer_norm_epsilon", None)
        self.d_model, self.n_heads, self.n_layers = d_model, n_heads, n_layers
        self.expansion_ratio, self.max_seq_len, self.vocab_size = expansion_ratio, max_seq_len, vocab_size
        self.resid_pdrop, self.emb_pdrop, self.learned_pos_emb = resid_pdrop, emb_pdrop, learned_pos_emb
        attn = dict(attn_config or {})
        if attn.get("attn_type") == "multiquery_attention":
            attn.setdefault("kv_n_heads", 1)
        self.attn_config = {**ATTN_DEFAULTS, **attn}
        self.ffn_config = {**FFN_DEFAULTS, **(ffn_config or {})}
        self.init_config = dict(init_config or {})
        self.init_device, self.logit_scale, self.no_bias = init_device, logit_scale, no_bias
        self.embedding_fraction, self.norm_type = embedding_fraction, norm_type
        self.norm_eps = norm_eps if norm_eps is not None else (eps if eps is not None else 1e-5)
        self.layer_norm_epsilon = self.norm_eps
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class SmaltoMPTConfig(MPTConfig):
    model_type = "smalto_mpt"
