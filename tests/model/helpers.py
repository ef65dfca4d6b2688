import torch

from smalto.model.mpt import MPTForCausalLM
from tests.helpers import tiny_config

VOCAB = 128

# config.json of mosaicml/mpt-7b as published on the hub (the keys that matter; auto_map trimmed)
MPT_7B_CONFIG_JSON = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {
        "alibi": True,
        "alibi_bias_max": 8,
        "attn_impl": "torch",
        "attn_pdrop": 0,
        "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False,
        "clip_qkv": None,
        "prefix_lm": False,
        "qk_ln": False,
        "softmax_scale": None,
    },
    "auto_map": {
        "AutoConfig": "configuration_mpt.MPTConfig",
        "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
    },
    "d_model": 4096,
    "emb_pdrop": 0,
    "embedding_fraction": 1.0,
    "expansion_ratio": 4,
    "init_config": {
        "emb_init_std": None,
        "emb_init_uniform_lim": None,
        "fan_mode": "fan_in",
        "init_div_is_residual": True,
        "init_gain": 0,
        "init_nonlinearity": "relu",
        "init_std": 0.02,
        "name": "kaiming_normal_",
        "verbose": 0,
    },
    "init_device": "cpu",
    "learned_pos_emb": True,
    "logit_scale": None,
    "max_seq_len": 2048,
    "model_type": "mpt",
    "n_heads": 32,
    "n_layers": 32,
    "no_bias": True,
    "norm_type": "low_precision_layernorm",
    "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.28.1",
    "use_cache": False,
    "verbose": 0,
    "vocab_size": 50432,
}


def tiny(seed: int = 0, **overrides) -> MPTForCausalLM:
    """A 2-layer, d_model-64 MPT in float32 with the given config overrides."""
    base: dict = {
        "max_seq_len": 64,
        "vocab_size": VOCAB,
        "no_bias": True,
        "attn_config": {"alibi": True, "attn_impl": "eager"},
    }
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    torch.manual_seed(seed)
    model = MPTForCausalLM(tiny_config(**base))
    # break the symmetry of init (norm weights 1, zero biases) so every parameter matters in comparisons
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "_ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t), generator=g)


def with_impl(model: MPTForCausalLM, impl: str, modes=("score", "prefill", "decode")) -> MPTForCausalLM:
    """Set `attn_impl` and apply the plans `smalto.kernels.plans` chooses for `modes` on the model's device (the
    other modes run the reference plan)."""
    from smalto.kernels import apply, select

    model.config.attn_config.attn_impl = impl
    model.transformer.plans.clear()
    return apply(model, {m: select(model.config, m, device=model.device, dtype=model.dtype) for m in modes})


def use_triton_interpreter() -> None:
    """For a test module of Triton kernel logic: skip where Triton has no wheels, insist on it elsewhere (a dev
    dependency), and run kernels built from now on on CPU tensors (Triton's interpreter). Call at import time."""
    import importlib.util
    import os
    import platform

    import pytest

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("Triton ships wheels for Linux x86-64 only", allow_module_level=True)
    assert importlib.util.find_spec("triton"), (
        "Triton is missing: install the dev extras (pip install -e '.[dev]')"
    )
    os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is built
