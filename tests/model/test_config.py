import warnings

import pytest

from smalto.errors import ConfigError, UserError
from smalto.model.config import MPTConfig
from tests.model.helpers import MPT_7B_CONFIG_JSON


def test_hub_config_loads_and_maps_legacy_keys():
    c = MPTConfig.from_dict(MPT_7B_CONFIG_JSON, strict=False)
    assert (c.d_model, c.n_heads, c.n_layers, c.vocab_size) == (4096, 32, 32, 50432)
    assert c.attn_config.attn_impl == "auto"  # the hub's 'torch' names an implementation, not a computation
    assert c.attn_config.alibi and c.kv_n_heads == 32
    assert not c.uses_wpe  # alibi wins over learned_pos_emb, as in llm-foundry
    # MPT-7B has 6.7B parameters (the model card's figure)
    assert 6.6e9 < c.num_params() < 6.8e9


def test_defaults_follow_llm_foundry():
    c = MPTConfig()
    assert (c.d_model, c.n_heads, c.n_layers, c.expansion_ratio, c.max_seq_len) == (2048, 16, 24, 4, 2048)
    assert c.norm_type == "low_precision_layernorm" and c.norm_eps == 1e-5
    assert c.init_config.name == "kaiming_normal_" and c.init_config.init_div_is_residual is True
    assert c.attn_config.alibi_bias_max == 8 and c.attn_config.sliding_window_size == -1
    assert c.ffn_hidden_size == 4 * 2048 and c.softmax_scale == pytest.approx(128**-0.5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"d_model": 100, "n_heads": 3}, "d_model (100) must be divisible by n_heads (3)"),
        (
            {"attn_config": {"kv_n_heads": 3}, "n_heads": 4, "d_model": 64},
            "kv_n_heads (3) must be a positive divisor of n_heads (4)",
        ),
        ({"attn_config": {"alibi": True, "rope": True}}, "pick one position scheme"),
        (
            {"norm_type": "batchnorm"},
            "choose one of: layernorm, low_precision_layernorm, rmsnorm, low_precision_rmsnorm",
        ),
        ({"attn_config": {"attn_impl": "flash2"}}, "choose one of: auto, flex, cudnn, sdpa, eager"),
        ({"ffn_config": {"ffn_type": "moe"}}, "choose one of: mptmlp, mptglu"),
        ({"attn_config": {"alibbi": True}}, "unknown key model.attn_config.alibbi"),
        ({"logit_scale": "sqrt"}, "inv_sqrt_d_model"),
        ({"expansion_ratio": 1.3, "d_model": 64, "n_heads": 4}, "set ffn_config.ffn_hidden_size"),
        ({"init_config": {"name": "baseline_"}}, "needs init_config.init_std"),
        (
            {"attn_config": {"rope": True, "rope_impl": "dail", "rope_dail_config": {"type": "xpos"}}},
            "only type 'original'",
        ),
        ({"attn_config": {"prefix_lm": True}}, "prefix_lm = true is not supported"),
        ({"attn_config": {"attn_type": "cross_attention"}}, "choose one of: multihead_attention"),
    ],
)
def test_bad_configs_name_the_key(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        MPTConfig.from_dict(kwargs)
    assert needle in str(e.value)
    assert isinstance(e.value, UserError)


def test_unknown_top_level_key_lists_allowed():
    with pytest.raises(ConfigError, match=r"unknown key model.dmodel; allowed keys: .*d_model"):
        MPTConfig.from_dict({"dmodel": 5})


def test_non_mpt_config_refused():
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        MPTConfig.from_dict({"model_type": "llama"}, strict=False)


def test_attn_type_multiquery_maps_to_one_kv_head():
    c = MPTConfig.from_dict(
        {"d_model": 64, "n_heads": 4, "attn_config": {"attn_type": "multiquery_attention"}}
    )
    assert c.kv_n_heads == 1


def test_round_trip_through_dict():
    c = MPTConfig(
        d_model=64, n_heads=4, n_layers=2, attn_config={"qk_ln": True, "kv_n_heads": 2, "rope": True}
    )
    assert MPTConfig.from_dict(c.to_dict()) == c


def test_flops_per_token_is_llm_foundry_formula():
    c = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=100)
    assert c.flops_per_token(32) == 6 * c.num_params() + 12 * 2 * 64 * 32


def test_hf_config_with_harmless_unknown_keys_loads_with_one_warning():
    """transformers loads a config.json with keys it does not know; so does smalto, naming them once."""
    raw = {
        **MPT_7B_CONFIG_JSON,
        "quantization_note": "none",
        "attn_config": {**MPT_7B_CONFIG_JSON["attn_config"], "kernel_hint": "fast"},
        "_private": 1,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = MPTConfig.from_dict(raw, strict=False)
    assert c == MPTConfig.from_dict(MPT_7B_CONFIG_JSON, strict=False)
    assert [str(w.message) for w in caught] == [
        "config.json: ignoring keys smalto does not know (none of them is known to change the model): "
        "quantization_note, _private, attn_config.kernel_hint"
    ]
    with pytest.raises(ConfigError, match=r"unknown key model\.quantization_note"):
        MPTConfig.from_dict({k: v for k, v in raw.items() if k in ("d_model", "quantization_note")})


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping = 30.0 is not supported"),
        ({"block_overrides": {"order": ["x"]}}, "block_overrides = {"),
        ({"attn_config": {"reuse_kv_layer_idx": -1}}, "attn_config.reuse_kv_layer_idx = -1 is not supported"),
        ({"ffn_config": {"ffn_type": "te_ln_mlp"}}, 'ffn_config.ffn_type = "te_ln_mlp" is not supported'),
        (
            {"attn_config": {"alibi": "yes"}},
            "model.attn_config.alibi = 'yes' has the wrong type; expected bool",
        ),
    ],
)
def test_hf_config_with_unsupported_or_mistyped_values_is_refused(extra, needle):
    raw = {**MPT_7B_CONFIG_JSON, **extra}
    if "attn_config" in extra:
        raw["attn_config"] = {**MPT_7B_CONFIG_JSON["attn_config"], **extra["attn_config"]}
    with pytest.raises(ConfigError) as e:
        MPTConfig.from_dict(raw, strict=False)
    assert needle in str(e.value)
    # the neutral value of each key smalto does not implement is accepted
    MPTConfig.from_dict(
        {**MPT_7B_CONFIG_JSON, "final_logit_softcapping": None, "block_overrides": None}, strict=False
    )
